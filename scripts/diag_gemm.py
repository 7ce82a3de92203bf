"""Where the W4A8 GEMM's time goes: the same Triton skeleton with (a) FP8 weights loaded directly
(no unpack; the ceiling of this tiling in Triton), (b) INT4 unpack + convert but one chained accumulator
(no per-group scaling), (c) the full kernel (per-group scaling on each K tile). M = N = K = 4096-8192.

    python scripts/diag_gemm.py
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench


@triton.jit
def _k(x_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
       BK: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    pid_m = pid // num_n
    pid_n = pid % num_n
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    offs_kh = tl.arange(0, BK // 2)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    prev = tl.zeros((BM, BN), dtype=tl.float32)
    s_prev = tl.zeros((BN,), dtype=tl.float32)
    for k0 in range(0, K, BK):
        x = tl.load(x_ptr + offs_m[:, None] * K + (k0 + offs_k)[None, :])
        if MODE == 0:
            w8 = tl.load(w_ptr + offs_n[:, None] * K + (k0 + offs_k)[None, :])
            acc = tl.dot(x, tl.trans(w8), acc)
        else:
            wb = tl.load(w_ptr + offs_n[:, None] * (K // 2) + (k0 // 2 + offs_kh)[None, :])
            wi = wb.to(tl.int8, bitcast=True)
            w = tl.join((wi << 4) >> 4, wi >> 4).reshape(BN, BK)
            w8 = w.to(tl.float16).to(tl.float8e4nv)
            if MODE == 1:
                acc = tl.dot(x, tl.trans(w8), acc)
            elif MODE == 2:
                s = tl.load(ws_ptr + offs_n * (K // 128) + k0 // 128).to(tl.float32)
                acc += tl.dot(x, tl.trans(w8)) * s[None, :]
            elif MODE == 3:  # deferred: scale-add the previous tile's product after issuing this one
                s = tl.load(ws_ptr + offs_n * (K // 128) + k0 // 128).to(tl.float32)
                part = tl.dot(x, tl.trans(w8))
                acc += prev * s_prev[None, :]
                prev = part
                s_prev = s
            else:  # fp16 operands with the scale folded into the weight, chained accumulator
                s = tl.load(ws_ptr + offs_n * (K // 128) + k0 // 128).to(tl.float16)
                w16 = w.to(tl.float16) * s[:, None]
                acc = tl.dot(x.to(tl.float16), tl.trans(w16), acc)
    if MODE == 3:
        acc += prev * s_prev[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.bfloat16))


def main():
    m = n = k = 8192
    x = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn)
    w8 = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
    w4 = torch.randint(0, 255, (n, k // 2), device="cuda", dtype=torch.uint8)
    ws = torch.rand(n, k // 128, device="cuda").to(torch.float8_e4m3fn)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * n * k
    wb = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    t = do_bench(lambda: xb @ wb.t(), return_mode="median")
    print(f"cuBLAS bf16: {flops / t / 1e9:.0f} TFLOP/s")
    for mode, name in ((0, "fp8 weights, chained acc"), (1, "int4 unpack, chained acc"), (2, "int4 + group scale"),
                       (3, "int4 + deferred group scale"), (4, "int4 -> fp16*scale, chained")):
        for bm, bn, bk, warps, stages in ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 128, 4, 4),
                                          (256, 128, 128, 8, 3)):
            try:
                f = lambda: _k[(triton.cdiv(m, bm) * triton.cdiv(n, bn),)](
                    x, w8 if mode == 0 else w4, ws, out, m, n, k, MODE=mode, BM=bm, BN=bn, BK=bk,
                    num_warps=warps, num_stages=stages)
                t = do_bench(f, return_mode="median")
                print(f"{name:28s} {bm}x{bn}x{bk} w{warps} s{stages}: {flops / t / 1e9:.0f} TFLOP/s", flush=True)
            except Exception as e:
                print(f"{name} {bm}x{bn}: {type(e).__name__} {str(e)[:80]}")


if __name__ == "__main__":
    main()
