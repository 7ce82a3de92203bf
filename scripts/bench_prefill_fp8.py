"""The FP8 prefill path (kernels/w4_fp8.py: INT4 -> FP8 row re-rounding, then cuBLAS's rowwise-scaled FP8
GEMM) against the INT4 GEMM (tuned configs), cuBLAS BF16 and cuBLAS FP8 (per-tensor scales), in one run.

    python scripts/bench_prefill_fp8.py --json OUT.json [--ms 1024,4096,8192]

Llama-3-8B linear shapes, g128 FP8 group scales, weights in the kernel layout (repack_half, 128), rotated
past 2x L2; CUDA-graph timing (do_bench medians). Correctness first at every shape: the conversion equals
its twin bit for bit, the path is within 2x of its twin's error against float64 (plus the FP8 MMA's).
Rows also time the conversion alone and the rowwise GEMM alone (weights converted beforehand).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, copies_for, env_info, geomean, int4_weight_copies, table, write_json  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default="1024,4096,8192")
    args = ap.parse_args()
    from fireq_kernels.gemm_w4a8 import FP8_MMA_ACC_RTOL, load_tuned, quantize_fp8_rows_triton, repack_half, w4a8_gemm_triton
    from fireq_kernels.reference import int4_to_fp8_ref, w4a8_prefill_fp8_ref
    from fireq_kernels.w4_fp8 import int4_to_fp8_triton, w4a8_prefill_fp8

    print(f"tuned configs loaded: {load_tuned()}", flush=True)
    env = env_info()
    l2 = env.get("l2_bytes")
    torch.manual_seed(0)
    rows = []
    t0 = time.time()
    for n, k in SHAPES:
        qws = int4_weight_copies(n, k, l2)
        half = [repack_half(q, k, 128) for q, _, _ in qws]
        # correctness at this shape
        q0, s0, e0 = qws[0]
        w8r, rsr = int4_to_fp8_ref(q0, s0, e0, k, 128)
        w8, rs = int4_to_fp8_triton(half[0], s0, e0, k, 128, 128)
        exact = torch.equal(w8.view(torch.uint8), w8r.view(torch.uint8)) and torch.equal(rs, rsr)
        assert exact, "conversion differs from its twin"
        w8s = [int4_to_fp8_triton(h, s, e, k, 128, 128) for h, (_, s, e) in zip(half, qws)]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies_for(n * k * 2, l2))]
        wf8 = [w.to(torch.float8_e4m3fn) for w in wb[:len(qws)]]
        for m in [int(v) for v in args.ms.split(",")]:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            x8 = [quantize_fp8_rows_triton(x) for x in xs]
            xa, sa = x8[0]
            ref = w4a8_prefill_fp8_ref(xa, sa, q0, s0, e0, 128, None, torch.float64, torch.float64)
            twin = w4a8_prefill_fp8_ref(xa, sa, q0, s0, e0, 128, None, torch.bfloat16, torch.float32)
            got = w4a8_prefill_fp8(xa, sa, half[0], s0, e0, 128, None, torch.bfloat16, 128)
            err = ((got.double() - ref).norm() / ref.norm()).item()
            e_twin = ((twin.double() - ref).norm() / ref.norm()).item()
            assert err <= 2 * e_twin + FP8_MMA_ACC_RTOL, (err, e_twin)
            one = torch.ones((), device="cuda")
            sets = range(max(len(qws), len(wb)))
            t = dict(
                int4_gemm=bench_graph([lambda i=i: w4a8_gemm_triton(
                    x8[i % 2][0], x8[i % 2][1], half[i % len(qws)], qws[i % len(qws)][1], qws[i % len(qws)][2], 128,
                    None, torch.bfloat16, layout_block=128) for i in sets]),
                fp8_path=bench_graph([lambda i=i: w4a8_prefill_fp8(
                    x8[i % 2][0], x8[i % 2][1], half[i % len(qws)], qws[i % len(qws)][1], qws[i % len(qws)][2], 128,
                    None, torch.bfloat16, 128) for i in sets]),
                convert=bench_graph([lambda i=i: int4_to_fp8_triton(half[i % len(qws)], qws[i % len(qws)][1],
                                                                    qws[i % len(qws)][2], k, 128, 128) for i in sets]),
                rowwise_gemm=bench_graph([lambda i=i: torch._scaled_mm(
                    x8[i % 2][0], w8s[i % len(qws)][0].t(), scale_a=x8[i % 2][1],
                    scale_b=w8s[i % len(qws)][1].reshape(1, n), out_dtype=torch.bfloat16) for i in sets]),
                bf16=bench_graph([lambda i=i: torch.matmul(xs[i % 2], wb[i % len(wb)].t()) for i in sets]),
                fp8=bench_graph([lambda i=i: torch._scaled_mm(
                    x8[i % 2][0], wf8[i % len(wf8)].t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
                    for i in sets]),
            )
            row = dict(N=n, K=k, M=m, **{f"{a}_us": v * 1e3 for a, v in t.items()},
                       path_vs_bf16=t["bf16"] / t["fp8_path"], path_vs_fp8=t["fp8"] / t["fp8_path"],
                       int4_vs_bf16=t["bf16"] / t["int4_gemm"], int4_vs_fp8=t["fp8"] / t["int4_gemm"],
                       path_tflops=2.0 * m * n * k / t["fp8_path"] / 1e9, err=err, err_twin=e_twin)
            rows.append(row)
            print({a: (round(v, 3) if isinstance(v, float) else v) for a, v in row.items()},
                  f"[{time.time() - t0:.0f}s]", flush=True)
            del xs, x8
        del qws, half, w8s, wb, wf8
        torch.cuda.empty_cache()
        write_json(args.json + ".partial", dict(env=env, rows=rows))

    def gm(key):
        return geomean([r[key] for r in rows if r["M"] in (4096, 8192)])

    summary = dict(prefill_vs_bf16=gm("path_vs_bf16"), prefill_vs_fp8=gm("path_vs_fp8"),
                   int4_prefill_vs_bf16=gm("int4_vs_bf16"), int4_prefill_vs_fp8=gm("int4_vs_fp8"))
    print(table(rows, ["N", "K", "M", "int4_gemm_us", "fp8_path_us", "convert_us", "rowwise_gemm_us", "bf16_us",
                       "fp8_us", "path_vs_bf16", "path_vs_fp8", "path_tflops"]))
    print({a: round(v, 3) for a, v in summary.items()})
    write_json(args.json, dict(env=env, group_size=128, layout_block=128, timing="cuda_graph", rows=rows,
                               summary=summary))


if __name__ == "__main__":
    main()
