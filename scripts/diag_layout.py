"""Checkpoint nibble layout (even k low, odd k high: needs a register interleave before the MMA) vs the
kernel layout of repack_half (byte j of a 128-channel block holds channels j and j + 64: two MMAs over the
block's halves, no interleave), same configs, H100, cuBLAS BF16 in the same run.

    python scripts/diag_layout.py --json OUT.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, env_info, gemm_reference, int4_weight_copies, table, write_json  # noqa: E402

SHAPES = [(4096, 4096), (28672, 4096), (4096, 14336)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default="1,4,16,64,4096")
    args = ap.parse_args()
    from fireq_kernels.gemm_w4a8 import (FP8_MMA_ACC_RTOL, load_tuned, pick_config, quantize_fp8_rows_triton,
                                         repack_half, w4a8_gemm_triton)

    load_tuned()
    env = env_info()
    torch.manual_seed(0)
    rows = []
    for n, k in SHAPES:
        qws = int4_weight_copies(n, k, env.get("l2_bytes"))
        ncopy = len(qws)
        halves = [repack_half(q[0], k, 128) for q in qws]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(max(2, ncopy // 4))]
        for m in [int(x) for x in args.ms.split(",")]:
            xs = [quantize_fp8_rows_triton(torch.randn(m, k, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
            xb = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            q0 = qws[0]
            ref, e_twin = gemm_reference(xs[0][0], xs[0][1], q0)
            t_bf16 = bench_graph([lambda i=i: torch.matmul(xb[i % 2], wb[i % len(wb)].t()) for i in range(ncopy)])
            cur = pick_config(m, n, k, 128)
            cands = [("ckpt", cur, 0), ("half", cur, 128)]
            if m == 1:
                cands += [("half", dict(GEMV=True, BN=bn, BK=bk, SPLIT_K=sk, num_warps=4, num_stages=4), 128)
                          for bn in (16, 32) for bk in (256, 512) for sk in (1, 4, 8)]
            if 1 < m <= 64:
                cands += [("half", dict(SWAP=True, BM=max(16, m), BN=bn, BK=128, SPLIT_K=sk, GROUP_M=8, num_warps=w,
                                        num_stages=st), 128)
                          for bn in (64, 128) for sk in (2, 4, 8) for w in (4,) for st in (3, 4)]
                cands += [("ckpt", dict(SWAP=True, BM=max(16, m), BN=128, BK=128, SPLIT_K=sk, GROUP_M=8, num_warps=4,
                                        num_stages=3), 0) for sk in (4, 8)]
            if m >= 1024:
                cands += [(lay, dict(SWAP=sw, BM=bm, BN=bn, BK=128, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st),
                           lb) for lay, lb in (("half", 128), ("ckpt", 0))
                          for sw, bm, bn, w in ((False, 128, 128, 8), (False, 128, 256, 8), (True, 128, 64, 4),
                                                (True, 128, 128, 8)) for st in (3, 4)]
            best = {}
            for lay, cfg, lb in cands:
                w_of = halves if lb else [q[0] for q in qws]
                try:
                    got = w4a8_gemm_triton(xs[0][0], xs[0][1], w_of[0], q0[1], q0[2], 128, out_dtype=torch.float32,
                                           config=cfg, layout_block=lb)
                    e = ((got.double() - ref).norm() / ref.norm()).item()
                    if not e <= 2 * e_twin + FP8_MMA_ACC_RTOL:
                        print(f"  WRONG {lay} {cfg}: {e:.2e}", flush=True)
                        continue
                    t = bench_graph([lambda i=i, w=w: w4a8_gemm_triton(
                        xs[i % 4][0], xs[i % 4][1], w, qws[i][1], qws[i][2], 128, config=cfg, layout_block=lb)
                        for i, w in enumerate(w_of)], warmup=5, rep=20)
                except Exception as ex:
                    print(f"  failed {lay} {cfg}: {type(ex).__name__} {str(ex)[:100]}", flush=True)
                    continue
                if lay not in best or t < best[lay][0]:
                    best[lay] = (t, cfg)
            row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3,
                       **{f"{lay}_us": v[0] * 1e3 for lay, v in best.items()},
                       **{f"{lay}_vs_bf16": t_bf16 / v[0] for lay, v in best.items()},
                       **{f"{lay}_cfg": v[1] for lay, v in best.items()})
            rows.append(row)
            print(f"N={n} K={k} M={m}: bf16 {t_bf16 * 1e3:.1f}us " + "  ".join(
                f"{lay} {v[0] * 1e3:.1f}us x{t_bf16 / v[0]:.2f} {v[1]}" for lay, v in best.items()), flush=True)
    print(table(rows, ["N", "K", "M", "bf16_us", "ckpt_us", "half_us", "ckpt_vs_bf16", "half_vs_bf16"]))
    write_json(args.json, dict(env=env, rows=rows))


if __name__ == "__main__":
    main()
