"""RMSNorm in one Triton kernel (transformers' eager RMSNorm is six to eight small kernels a call: at decode,
where a row is a few kilobytes, each is pure launch latency).

Two variants, each the same arithmetic as its transformers module (twin: reference.rmsnorm_ref):
- Llama family: y = x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, then times the weight
  (rounded to the promoted dtype of the two);
- Gemma (plus_one): y = x * rsqrt(mean(x^2) + eps) * (1 + w) in fp32, rounded to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .gemm_w4a8 import _interpreting, fp8_row_codes, fp8_row_scale


@triton.jit
def _bf16_rne(y):
    """y (fp32, finite) rounded to the nearest BF16 value, ties to even, still fp32 (the CPU interpreter's
    fp32 -> bf16 cast truncates)."""
    bits = y.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, q_ptr, s_ptr, D, stride_x, stride_o, eps, BLOCK: tl.constexpr,
                    PLUS_ONE: tl.constexpr, X_BF16_RNE: tl.constexpr, OUT_BF16_RNE: tl.constexpr,
                    FP8: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """One program a row: x (R, D) -> out (R, D). *_BF16_RNE: round explicitly (interpreter, BF16).
    FP8: also the output row (as stored) quantized to FP8 E4M3 per token, q (R, D) with s (R,), exactly as
    gemm_w4a8.quantize_fp8_rows_triton would quantize out (the next quantized linear's activations)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if PLUS_ONE:
        y = x * r * (1.0 + w)
    else:
        y = x * r
        if X_BF16_RNE:
            y = _bf16_rne(y)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32) * w
    if OUT_BF16_RNE:
        y = _bf16_rne(y)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + offs, y, mask=m)
    if FP8:  # quantize_fp8_rows_triton's one-pass arithmetic on the row as stored
        yf = y.to(tl.float32)
        sc = fp8_row_scale(tl.max(tl.abs(yf), axis=0))
        tl.store(s_ptr + row, sc)
        tl.store(q_ptr + row * D + offs, fp8_row_codes(yf, sc, EXACT_ROUND), mask=m)


@on_tensor_device
def rmsnorm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False,
                   fp8: bool = False):
    """x: (..., D) float; weight: (D,). Output dtype: x's (plus_one) or promote(x, weight) (Llama family).
    fp8: also return the output's FP8 per-token quantization (q (R, D) float8_e4m3fn, s (R, 1) fp32, R the
    rows of x), equal to quantize_fp8_rows_triton(out) bit for bit: (out, q, s)."""
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rmsnorm_triton: weight {tuple(weight.shape)} does not match the last dim {d}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    dt = x.dtype if plus_one else torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty((x2.shape[0], d), dtype=dt, device=x.device)
    q = torch.empty((x2.shape[0], d), dtype=torch.float8_e4m3fn, device=x.device) if fp8 else out
    s = torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device) if fp8 else out
    if x2.shape[0]:
        block = triton.next_power_of_2(d)
        interp = not x.is_cuda
        _rmsnorm_kernel[(x2.shape[0],)](x2, weight, out, q, s, d, x2.stride(0), out.stride(0), eps, BLOCK=block,
                                        PLUS_ONE=plus_one, X_BF16_RNE=interp and x.dtype == torch.bfloat16,
                                        OUT_BF16_RNE=interp and dt == torch.bfloat16, FP8=fp8,
                                        EXACT_ROUND=fp8 and _interpreting(),
                                        num_warps=max(1, min(16, block // 256)))
    out = out.reshape(x.shape)
    return (out, q, s) if fp8 else out
