"""The CUDA-core GEMV for a few tokens (M = 2-8, rows sharing each converted weight tile) against the tuned
pick (the split-K MMA schedule on Hopper), and the read roof of the weights on this GPU: a flat Triton
stream and torch's sum over the same bytes. cuBLAS BF16 in the same run.

    python scripts/diag_gemv_rows.py --json OUT.json [--ms 2,4,8]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, env_info, geomean, int4_weight_copies, table, write_json  # noqa: E402
from diag_decode_tiled import _flat_probe  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default="2,4,8")
    args = ap.parse_args()
    from fireq_kernels.gemm_w4a8 import load_tuned, pick_config, quantize_fp8_rows_triton, repack_half, w4a8_gemm_triton
    from fireq_kernels.reference import w4a8_gemm_ref

    load_tuned()
    env = env_info()
    l2 = env.get("l2_bytes")
    torch.manual_seed(0)
    gemv = [dict(GEMV=True, BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=1)
            for bn, bk, sk, w in itertools.product((4, 8), (512, 1024), (1, 2), (4, 8))]
    rows, roofs = [], {}
    for n, k in SHAPES:
        qws = [(repack_half(q, k, 128), s, e) for q, s, e in int4_weight_copies(n, k, l2)]
        words = [q[0].view(torch.int32).reshape(-1) for q in qws]
        roof = {}
        for pm, blk, st in itertools.product((1, 4), (2048, 8192), (1, 3)):
            progs = pm * env["sms"]
            per = triton.cdiv(triton.cdiv(words[0].numel(), progs), blk) * blk
            o = torch.empty(progs, dtype=torch.int32, device="cuda")
            t = bench_graph([lambda wd=wd: _flat_probe[(progs,)](wd, o, wd.numel(), per, BLOCK=blk, num_warps=8,
                                                                 num_stages=st) for wd in words], warmup=5, rep=20)
            roof[f"flat_P{pm}_B{blk}_S{st}"] = n * k / 2 / t / 1e9
        t = bench_graph([lambda wd=wd: wd.sum() for wd in words], warmup=5, rep=20)
        roof["torch_sum"] = n * k / 2 / t / 1e9
        roofs[f"{n}x{k}"] = roof
        print(f"N={n} K={k} read roofs TB/s {({a: round(b, 2) for a, b in roof.items()})}", flush=True)
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(len(qws) // 4 + 2)]
        for m in [int(x) for x in args.ms.split(",")]:
            xs = [quantize_fp8_rows_triton(torch.randn(m, k, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
            q0 = qws[0]
            from fireq_kernels.gemm_w4a8 import unpack_half
            from fireq.formats.int4 import pack_int4
            ck = pack_int4(unpack_half(q0[0], k, 128))
            ref = w4a8_gemm_ref(xs[0][0], xs[0][1], ck, q0[1], q0[2], 128, None, torch.float64, torch.float64)
            twin = w4a8_gemm_ref(xs[0][0], xs[0][1], ck, q0[1], q0[2], 128, None, torch.float32, torch.float32)
            e_twin = ((twin.double() - ref).norm() / ref.norm()).item()

            def fns(cfg):
                return [lambda i=i, q=q: w4a8_gemm_triton(xs[i % 4][0], xs[i % 4][1], q[0], q[1], q[2], 128,
                                                          config=cfg, layout_block=128) for i, q in enumerate(qws)]

            t_bf16 = bench_graph([lambda i=i: torch.matmul(xs[i % 4][0].to(torch.bfloat16), wb[i % len(wb)].t())
                                  for i in range(len(qws))], warmup=5, rep=20)
            cur = pick_config(m, n, k, 128)
            t_cur = bench_graph(fns(cur), warmup=5, rep=20)
            res = []
            for cfg in gemv:
                try:
                    got = w4a8_gemm_triton(xs[0][0], xs[0][1], q0[0], q0[1], q0[2], 128, out_dtype=torch.float32,
                                           config=cfg, layout_block=128)
                    e = ((got.double() - ref).norm() / ref.norm()).item()
                    if not e <= 2 * e_twin + 1e-6:
                        print(f"  WRONG {cfg}: {e:.2e} vs twin {e_twin:.2e}", flush=True)
                        continue
                    res.append((bench_graph(fns(cfg), warmup=5, rep=20), cfg))
                except Exception as ex:
                    print(f"  failed {cfg}: {type(ex).__name__} {str(ex)[:100]}", flush=True)
            t_g, best = min(res, key=lambda r: r[0])
            row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3, tuned_us=t_cur * 1e3, gemv_us=t_g * 1e3,
                       gemv_vs_tuned=t_cur / t_g, gemv_tbps=(n * k / 2 + n * k / 128) / t_g / 1e9,
                       tuned_tbps=(n * k / 2 + n * k / 128) / t_cur / 1e9, roof_tbps=max(roof.values()),
                       gemv_cfg=best, tuned_cfg=cur, err_twin=e_twin)
            rows.append(row)
            print({a: (round(b, 3) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
    summary = dict(gemv_vs_tuned=geomean([r["gemv_vs_tuned"] for r in rows]))
    print(table(rows, ["N", "K", "M", "bf16_us", "tuned_us", "gemv_us", "gemv_vs_tuned", "gemv_tbps", "tuned_tbps",
                       "roof_tbps"]))
    print(summary)
    write_json(args.json, dict(env=env, rows=rows, roofs=roofs, summary=summary))


if __name__ == "__main__":
    main()
