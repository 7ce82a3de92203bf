"""Diagnosis (H100): why the per-token FP8 activation quantization is slow at large M, and what is faster.

    python scripts/diag_actquant.py --json benchmarks/results/actquant-diag-h100.json

Variants of the kernel are defined here (the winner moves into kernels/gemm_w4a8.py): the shipped one
(one row a program), rows per program with a 2-D tile, the division replaced by a reciprocal multiply
(speed probe only: not bit-exact), and warp counts. A bf16 copy of x times the memory floor.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, env_info, table, write_json  # noqa: E402


@triton.jit
def _rows2d(x_ptr, q_ptr, s_ptr, M, K, stride_x, stride_q, BR: tl.constexpr, BLOCK: tl.constexpr,
            RECIP: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    offs = tl.arange(0, BLOCK)
    ok = (rows < M)[:, None] & (offs < K)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=1) / 448.0, 1.1754943508222875e-38)
    tl.store(s_ptr + rows, s, mask=rows < M)
    if RECIP:
        y = x * (1.0 / s)[:, None]
    else:
        y = tl.math.div_rn(x, tl.broadcast_to(s[:, None], (BR, BLOCK)))
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_q + offs[None, :], y.to(tl.float8e4nv), mask=ok)


def rows2d(x, br, warps, recip=False):
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    _rows2d[(triton.cdiv(m, br),)](x, q, s, m, k, x.stride(0), q.stride(0), BR=br, BLOCK=triton.next_power_of_2(k),
                                   RECIP=recip, num_warps=warps)
    return q, s


def main():
    from fireq_kernels.gemm_w4a8 import quantize_fp8_rows_triton
    from fireq_kernels.reference import quantize_fp8_rows_ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    env = env_info()
    rows = []
    for m, k in ((1, 4096), (16, 4096), (256, 14336), (4096, 4096), (8192, 4096), (4096, 14336)):
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        qr, sr = quantize_fp8_rows_ref(xs[0])
        t_copy = bench_graph([lambda x=x: x.clone() for x in xs])
        variants = [("shipped", lambda x: quantize_fp8_rows_triton(x))]
        for br in (1, 2, 4, 8):
            for w in (4, 8):
                if br * triton.next_power_of_2(k) // (32 * w) > 128:  # too many values a thread
                    continue
                variants.append((f"2d br{br} w{w}", lambda x, br=br, w=w: rows2d(x, br, w)))
        variants.append(("2d br4 w4 recip", lambda x: rows2d(x, 4, 4, True)))
        for name, fn in variants:
            try:
                q, s = fn(xs[0])
                exact = bool(torch.equal(q.float(), qr.float()) and torch.equal(s, sr))
                t = bench_graph([lambda x=x: fn(x) for x in xs])
            except Exception as ex:
                print("failed", m, k, name, type(ex).__name__, str(ex)[:200], flush=True)
                continue
            rows.append(dict(m=m, k=k, variant=name, us=t * 1e3, copy_us=t_copy * 1e3, exact=exact,
                             tbps=m * k * 3 / t / 1e9))
            print(rows[-1], flush=True)
    print(table(rows, ["m", "k", "variant", "us", "copy_us", "exact", "tbps"]))
    write_json(a.json, dict(env=env, rows=rows))


if __name__ == "__main__":
    main()
