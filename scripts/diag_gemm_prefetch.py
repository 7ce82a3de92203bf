"""The W4A8 GEMM's tiled (SWAP) schedule with its group scales loaded one K tile ahead (GEMM_SCALE_PREFETCH)
against the same kernel loading them in their own iteration, with cuBLAS BF16 in the same run.

Why: on sm_90 the scale load of each K tile is a byte a row gathered across rows (64 B over 128 threads),
too narrow for Triton's asynchronous copies, so it is a plain load waited on inside every iteration
(scripts/diag_sass.py swap); the attention kernels' equivalent loads moved one tile ahead paid on the H200
(attn-decode-prefetch-diag-h200.json, attn-alibi-prefetch-diag-h200.json).

    python scripts/diag_gemm_prefetch.py --check          # CPU (interpreter) or GPU: outputs bit-identical
    python scripts/diag_gemm_prefetch.py --json FILE      # GPU: timings (tuned configs, kernel layout)

Llama-3-8B shapes, M in {4, 16, 64, 256, 4096} (the GEMV takes M = 1 and has no such load), weights rotated
past L2, CUDA-graph timing; off and on timed in alternation (PAIRS pairs, medians).
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
MS = (4, 16, 64, 256, 4096)
PAIRS = 3


def _gemm(prefetch, xq, xs, w, qw, cfg):
    from _bench_util import gemm_kernel_layout

    return gemm_kernel_layout(xq, xs, w, qw, cfg, prefetch=prefetch)


def check(dev):
    from _bench_util import check_scale_prefetch

    check_scale_prefetch(dev, ((5, 64, 640, 2, 1), (16, 96, 384, 2, 1)) if dev == "cpu" else
                         ((16, 4096, 4096, 2, 1), (256, 6144, 4096, 2, 1)))


def bench(path):
    from _bench_util import bench_graph, finish, gemm_bench_setup, gemm_sets, geomean, kernel_layout_weights
    from fireq_kernels.gemm_w4a8 import pick_config

    env = gemm_bench_setup()
    rows = []
    for n, k in SHAPES:
        kw = kernel_layout_weights(n, k, env.get("l2_bytes"))
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(len(kw), 4))]
        for m in MS:
            cfg = pick_config(m, n, k, 128)
            if cfg.get("GEMV"):
                continue
            sets = gemm_sets(m, k, kw, env.get("l2_bytes"))
            fns = {p: [lambda x=x, w=w, q=q, p=p: _gemm(p, x[0], x[1], w, q, cfg) for x, w, q in sets]
                   for p in (False, True)}
            assert torch.equal(fns[False][0](), fns[True][0]())
            pairs = [(bench_graph(fns[False]), bench_graph(fns[True])) for _ in range(PAIRS)]
            t_off = statistics.median(p[0] for p in pairs)
            t_on = statistics.median(p[1] for p in pairs)
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = bench_graph([lambda w=w: torch.matmul(xb, w.t()) for w in wb])
            rows.append(dict(N=n, K=k, M=m, off_us=t_off * 1e3, on_us=t_on * 1e3, gain=t_off / t_on,
                             off_vs_bf16=t_bf16 / t_off, on_vs_bf16=t_bf16 / t_on, config=cfg))
            print(rows[-1], flush=True)
        del kw, wb
        torch.cuda.empty_cache()
    summary = {"gain_decode": geomean([r["gain"] for r in rows if r["M"] <= 16]),
               "gain_prefill": geomean([r["gain"] for r in rows if r["M"] >= 4096]),
               "gain_all": geomean([r["gain"] for r in rows])}
    finish(path, env, rows, summary, ["N", "K", "M", "off_us", "on_us", "gain", "off_vs_bf16", "on_vs_bf16"])


def main():
    from _bench_util import diag_main

    diag_main(check, bench)


if __name__ == "__main__":
    main()
