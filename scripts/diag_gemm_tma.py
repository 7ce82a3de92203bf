"""W4A8 GEMM: x and weight tiles by TMA descriptors vs pointer loads (tiled kernel, kernel layout), with
cuBLAS BF16 and FP8 in the same run (H100), CUDA-graph timing.

    python scripts/diag_gemm_tma.py --json benchmarks/results/gemm-tma-diag-h100.json

Llama-3-8B shapes, M in {1024, 4096, 8192} (prefill) and the decode Ms whose tuned config is the tiled
kernel; each point with its tuned config (kernels/tuned), then the prefill candidates of bench_gemm's
tuning re-timed with TMA (the pointer winners were tuned without it); weights rotated past L2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph as bench_rotating, env_info, geomean, int4_weight_copies, table, write_json  # noqa: E402

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))


def main():
    import fireq_kernels.gemm_w4a8 as gm
    from fireq.formats.fp8 import quantize_fp8_rows

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default="1024,4096,8192")
    args = ap.parse_args()
    env = env_info()
    rows = []
    for n, k in SHAPES:
        ws = int4_weight_copies(n, k, env.get("l2_bytes"))
        lb = 128
        kernel = [(gm.repack_half(q, k, lb), s, lm) for q, s, lm in ws]
        wbf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
        w8 = [w.to(torch.float8_e4m3fn) for w in wbf]
        for m in [int(x) for x in args.ms.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8_rows(x)
            cfg = gm.pick_config(m, n, k, 128)
            if cfg.get("GEMV"):
                continue
            res = {}
            ref = None
            for tma in (False, True):
                def mk(q, s, lm, tma=tma):
                    def f():
                        gm.GEMM_TMA = tma
                        return gm.w4a8_gemm_triton(xq, xs, q, s, lm, 128, layout_block=lb)
                    return f
                fns = [mk(*w) for w in kernel]
                o = fns[0]().float()
                if ref is None:
                    ref = o
                diff = ((o - ref).norm() / ref.norm()).item()
                res[tma] = (bench_rotating(fns), diff)
            one = torch.tensor(1.0, device="cuda")
            t_bf = bench_rotating([lambda w=w: x @ w.t() for w in wbf])
            t_f8 = bench_rotating([lambda w=w: torch._scaled_mm(xq, w.t(), one, one, out_dtype=torch.bfloat16)
                                   for w in w8])
            fl = 2 * m * n * k
            for tma, (t, diff) in res.items():
                rows.append(dict(n=n, k=k, m=m, loader="tma" if tma else "pointers", ms=t, vs_bf16=t_bf / t,
                                 vs_fp8=t_f8 / t, tflops=fl / t / 1e9, diff=diff, cfg={a: b for a, b in cfg.items()}))
                print({a: b for a, b in rows[-1].items() if a != "cfg"}, flush=True)
    summary = {}
    for ld in ("pointers", "tma"):
        sel = [r for r in rows if r["loader"] == ld and r["m"] >= 4096]
        summary[f"prefill_vs_bf16_{ld}"] = geomean([r["vs_bf16"] for r in sel])
        summary[f"prefill_vs_fp8_{ld}"] = geomean([r["vs_fp8"] for r in sel])
    print(table(rows, ["n", "k", "m", "loader", "ms", "vs_bf16", "vs_fp8", "tflops", "diff"]))
    print(summary)
    write_json(args.json, dict(env=env, rows=rows, summary=summary, note=__doc__.strip().splitlines()[0]))


if __name__ == "__main__":
    main()
