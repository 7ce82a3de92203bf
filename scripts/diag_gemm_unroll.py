"""Decode GEMM (M <= 16): the tiled SWAP schedule with its K loop unrolled (config UNROLL), against the tuned
configs, with cuBLAS BF16 and FP8 in the same run.

Why: the sm_90 SASS of the SWAP loop (scripts/diag_sass.py swap) is about 270 instructions an iteration for
64 weights a thread, half of it per-iteration bookkeeping (pipeline indices, predicates, addresses, the
group-scale load); at decode the 28672 x 4096 call issues about as many instructions as the SMs can issue in
the time of its read. Unrolling by U puts U K tiles (and U asynchronous copies) in one iteration.

    python scripts/diag_gemm_unroll.py --check          # CPU (interpreter) or GPU: unrolled == plain
    python scripts/diag_gemm_unroll.py --json FILE      # GPU: the sweep

Llama-3-8B shapes, M in {1, 4, 16}, weights rotated past L2, CUDA-graph timing. For each point: the tuned
config, the best SWAP config (BN, split, stages) for each UNROLL, and the best of the whole sweep (best_us,
sweep_gain_vs_tuned). --stages widens the pipeline depths swept (default 3,4):

    python scripts/diag_gemm_unroll.py --json FILE --stages 3,4,6,8,10 --unrolls 1,2 --ms 1,16
"""

from __future__ import annotations

import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
MS = (1, 4, 16)
UNROLLS = (1, 2, 4)


def _gemm(xq, xs, w, qw, cfg):
    from _bench_util import gemm_kernel_layout

    return gemm_kernel_layout(xq, xs, w, qw, cfg)


def sweep(k: int, small: bool = False, stages=(3, 4), unrolls=UNROLLS) -> list[dict]:
    """SWAP configs for M <= 16 with every UNROLL whose tiles a split holds whole (and no deeper pipeline than
    a split has iterations)."""
    out = []
    for bn, split, st, u in itertools.product((32,) if small else (64, 128), (1, 2, 4, 8), (2,) if small else stages,
                                             unrolls):
        tiles = k // 128
        if tiles % split or (tiles // split) % u or tiles // split < u or tiles // split // u < st - 1:
            continue
        out.append(dict(SWAP=True, BM=16, BN=bn, BK=128, SPLIT_K=split, GROUP_M=8, num_warps=4, num_stages=st,
                        UNROLL=u))
    return out


def check(dev):
    from _bench_util import decode_gemm_operands

    small = dev == "cpu"
    for m, n, k in ((3, 64, 1024), (16, 96, 512)) if small else ((4, 4096, 4096), (16, 6144, 4096)):
        xq, xs, w, qwt = decode_gemm_operands(dev, m, n, k)
        cfgs = sweep(k, small)
        if small:
            cfgs = [c for c in cfgs if c["SPLIT_K"] in (1, 2)]
        base = {}
        for cfg in cfgs:
            y = _gemm(xq, xs, w, qwt, cfg).float()
            key = cfg["SPLIT_K"]
            if key not in base:
                base[key] = y
            assert torch.equal(y, base[key]), (cfg, (y - base[key]).abs().max().item())
        print(f"M={m} N={n} K={k}: {len(cfgs)} configs, each UNROLL bit-identical to UNROLL=1 at its split")


def bench(path, stages=(3, 4), unrolls=UNROLLS, ms=MS, shapes=SHAPES):
    from _bench_util import (bench_graph, copies_for, finish, gemm_bench_setup, gemm_sets, geomean,
                             kernel_layout_weights)
    from fireq_kernels.gemm_w4a8 import pick_config

    env = gemm_bench_setup()
    rows = []
    for n, k in shapes:
        kw = kernel_layout_weights(n, k, env.get("l2_bytes"))
        nb = copies_for(n * k * 2, env.get("l2_bytes"), max_sets=4)
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(nb)]
        w8 = [t.to(torch.float8_e4m3fn) for t in wb]
        one = torch.ones((), device="cuda")
        for m in ms:
            sets = gemm_sets(m, k, kw, env.get("l2_bytes"))

            def timed(cfg):
                return bench_graph([lambda x=x, w=w, q=q: _gemm(x[0], x[1], w, q, cfg) for x, w, q in sets]) * 1e3

            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            x8 = torch.randn(max(16, m), k, device="cuda").to(torch.float8_e4m3fn)
            t_bf16 = bench_graph([lambda w=w: torch.matmul(xb, w.t()) for w in wb]) * 1e3
            t_fp8 = bench_graph([lambda w=w: torch._scaled_mm(x8, w.t(), one, one, out_dtype=torch.bfloat16)
                                 for w in w8]) * 1e3
            tuned = pick_config(m, n, k, 128)
            (x0, x0s), w0, q0 = sets[0]
            ref = _gemm(x0, x0s, w0, q0, tuned).float()
            row = dict(N=n, K=k, M=m, bf16_us=t_bf16, fp8_us=t_fp8, tuned_us=timed(tuned), tuned_cfg=tuned)
            allt = []
            for cfg in sweep(k, stages=stages, unrolls=unrolls):
                try:
                    y = _gemm(x0, x0s, w0, q0, cfg).float()
                except triton.runtime.errors.OutOfResources:  # too deep a pipeline for shared memory
                    continue
                err = ((y - ref).norm() / ref.norm()).item()
                assert err < 1e-3, (cfg, err)
                allt.append((timed(cfg), cfg))
            for u in unrolls:
                t, c = min((x for x in allt if x[1]["UNROLL"] == u), key=lambda x: x[0])
                row[f"u{u}_us"], row[f"u{u}_cfg"] = t, c
            best_t, best_c = min(allt, key=lambda x: x[0])
            best = min([row[f"u{u}_us"] for u in unrolls if u > 1] or [best_t])  # (the first run: U > 1 only)
            row.update(best_us=best_t, best_cfg=best_c, sweep_gain_vs_tuned=row["tuned_us"] / best_t,
                       gain_vs_u1=row["u1_us"] / best if 1 in unrolls else float("nan"),
                       gain_vs_tuned=row["tuned_us"] / min(best, row.get("u1_us", best)),
                       best_vs_bf16=t_bf16 / min(best, row["tuned_us"]), best_vs_fp8=t_fp8 / min(best, row["tuned_us"]),
                       tuned_vs_fp8=t_fp8 / row["tuned_us"],
                       sweep=[dict(us=t, **c) for t, c in allt])
            rows.append(row)
            print({kk: v for kk, v in row.items() if kk != "sweep"}, flush=True)
        del kw, wb, w8
        torch.cuda.empty_cache()
    summary = {"gain_vs_u1": geomean([r["gain_vs_u1"] for r in rows]),
               "sweep_gain_vs_tuned": geomean([r["sweep_gain_vs_tuned"] for r in rows]),
               "gain_vs_tuned": geomean([r["gain_vs_tuned"] for r in rows]),
               "tuned_vs_fp8": geomean([r["tuned_vs_fp8"] for r in rows]),
               "best_vs_fp8": geomean([r["best_vs_fp8"] for r in rows]),
               "best_vs_bf16": geomean([r["best_vs_bf16"] for r in rows])}
    finish(path, env, rows, summary, ["N", "K", "M", "bf16_us", "fp8_us", "tuned_us"] + [f"u{u}_us" for u in unrolls]
           + ["best_us", "sweep_gain_vs_tuned", "best_vs_fp8"])


def main():
    from _bench_util import check_then_bench, diag_parser

    ap = diag_parser()
    ap.add_argument("--stages", default="3,4", help="num_stages values swept")
    ap.add_argument("--unrolls", default="1,2,4")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--shapes", default=None, help="NxK,NxK (default: the four Llama-3-8B shapes)")
    args = ap.parse_args()
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    shapes = tuple(tuple(int(v) for v in p.split("x")) for p in args.shapes.split(",")) if args.shapes else SHAPES
    check_then_bench(args, check, lambda path: bench(path, ints(args.stages), ints(args.unrolls), ints(args.ms), shapes))


if __name__ == "__main__":
    main()
