"""Decode GEMM (M <= 16): what the group scales' loads cost the tiled SWAP schedule, and two ways to hide them.

Why: at decode the SWAP kernel takes about one loaded-memory latency an iteration (28672 x 4096, split 1: 32
iterations in ~29 us on the H200) although its weight tiles are copied asynchronously three deep. Each
iteration's group scales are a byte a row, too narrow for the asynchronous copies: a plain load waited on
inside the iteration. Variants, same configs and weights:

- off:      the shipped loop (the scales loaded in their iteration);
- prefetch: GEMM_SCALE_PREFETCH (loaded one iteration ahead);
- channel:  per-channel scales (no scale load in the loop at all): the bound on what hiding them can give.

    python scripts/diag_gemm_scales.py --check          # CPU (interpreter) or GPU: prefetch == off, bit for bit
    python scripts/diag_gemm_scales.py --json FILE      # GPU: timings

A third variant, all of a split's scales prefetched into L1 before the loop (prefetch.global.L1), was timed
at commit 7a33301 (gemm-scales-diag-h200.json, "touch": 1.00x) and removed.

Llama-3-8B shapes, M in {1, 4, 16}; at M = 1 the tuned GEMV is timed beside the SWAP config of M = 4.
Weights rotated past L2, CUDA-graph timing, cuBLAS FP8 in the same run.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
MS = (1, 4, 16)
VARIANTS = ("off", "prefetch", "channel")


def _gemm(variant, xq, xs, w, qw, cfg):
    from _bench_util import gemm_kernel_layout

    return gemm_kernel_layout(xq, xs, w, qw, cfg, prefetch=variant == "prefetch", per_channel=variant == "channel")


def check(dev):
    from _bench_util import check_scale_prefetch

    check_scale_prefetch(dev, ((3, 64, 1024, 2, 2), (16, 96, 640, 1, 1), (5, 64, 896, 3, 1)) if dev == "cpu" else
                         ((4, 4096, 4096, 1, 2), (16, 6144, 14336, 8, 1)))


def bench(path):
    from _bench_util import (bench_graph, copies_for, finish, gemm_bench_setup, gemm_sets, geomean,
                             kernel_layout_weights)
    from fireq_kernels.gemm_w4a8 import pick_config

    env = gemm_bench_setup()
    rows = []
    for n, k in SHAPES:
        kw = kernel_layout_weights(n, k, env.get("l2_bytes"))
        w8 = [torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn) for _ in range(copies_for(n * k,
                                                                                                  env.get("l2_bytes")))]
        one = torch.ones((), device="cuda")
        for m in MS:
            sets = gemm_sets(m, k, kw, env.get("l2_bytes"))
            x8 = torch.randn(16, k, device="cuda").to(torch.float8_e4m3fn)
            t_fp8 = bench_graph([lambda w=w: torch._scaled_mm(x8, w.t(), one, one, out_dtype=torch.bfloat16)
                                 for w in w8]) * 1e3
            cfgs = [pick_config(m, n, k, 128)]
            if cfgs[0].get("GEMV"):
                cfgs.append(pick_config(4, n, k, 128))
            for cfg in cfgs:
                row = dict(N=n, K=k, M=m, fp8_us=t_fp8, config=cfg)
                for v in VARIANTS if not cfg.get("GEMV") else ("off",):
                    if v == "prefetch":
                        assert torch.equal(_gemm("off", *sets[0][0], sets[0][1], sets[0][2], cfg),
                                           _gemm("prefetch", *sets[0][0], sets[0][1], sets[0][2], cfg))
                    row[f"{v}_us"] = bench_graph([lambda x=x, w=w, q=q, v=v: _gemm(v, x[0], x[1], w, q, cfg)
                                                  for x, w, q in sets]) * 1e3
                for v in VARIANTS[1:]:
                    if f"{v}_us" in row:
                        row[f"{v}_gain"] = row["off_us"] / row[f"{v}_us"]
                row["off_vs_fp8"] = t_fp8 / row["off_us"]
                rows.append(row)
                print(row, flush=True)
        del kw, w8
        torch.cuda.empty_cache()
    swap = [r for r in rows if "channel_us" in r]
    summary = {f"{v}_gain": geomean([r[f"{v}_gain"] for r in swap]) for v in VARIANTS[1:]}
    finish(path, env, rows, summary, ["N", "K", "M", "fp8_us", "off_us", "prefetch_us", "channel_us", "prefetch_gain",
                                      "channel_gain"])


def main():
    from _bench_util import diag_main

    diag_main(check, bench)


if __name__ == "__main__":
    main()
