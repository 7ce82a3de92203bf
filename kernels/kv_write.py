"""The INT4 KV cache write in one Triton kernel: K or V (..., D) -> packed codes, scales, zero points.

Same semantics, bit for bit, as fireq.formats.kv.quantize_kv (its PyTorch twin): per token per head, in
groups of G channels; symmetric s = max|x| / 7, q = clamp(round(x / s), -8, 7); asymmetric
s = (max - min) / 15, z = clamp(round(-min / s), 0, 15), q = clamp(round(x / s) + z, 0, 15); s cast to
FP8 E4M3 (saturating at 448) or BF16 before it divides; torch.round's ties-to-even; IEEE division.
Codes are packed in the cache layout (byte j of a group: channels j and j + G/2). One program per block
of rows: read x once, write codes + scales (+ zero points).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_w4a8 import _interpreting, _round_to_fp8_grid

_MAGIC = 12582912.0  # 1.5 * 2^23: (y + M) - M rounds |y| < 2^22 to the nearest integer, ties to even


@triton.jit
def _rne(y):
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_to_bf16_grid(y):
    """y (fp32, finite, >= 0) rounded to the nearest BF16 value, ties to even, still fp32 (the CPU
    interpreter's fp32 -> bf16 cast does not round to nearest)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kv_write_kernel(x_ptr, q_ptr, s_ptr, z_ptr, R, stride_x, D: tl.constexpr, G: tl.constexpr,
                     BR: tl.constexpr, SYM: tl.constexpr, FP8_SCALE: tl.constexpr, EXACT_ROUND: tl.constexpr):
    NG: tl.constexpr = D // G
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < R
    offs = tl.arange(0, D)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + offs[None, :], mask=ok[:, None], other=0.0)
    xg = tl.reshape(x.to(tl.float32), (BR, NG, G))
    if SYM:
        s = tl.math.div_rn(tl.max(tl.abs(xg), axis=2), tl.full((BR, NG), 7.0, tl.float32))
    else:
        lo = tl.min(xg, axis=2)
        s = tl.math.div_rn(tl.max(xg, axis=2) - lo, tl.full((BR, NG), 15.0, tl.float32))
    if FP8_SCALE:
        s = tl.minimum(s, 448.0)
        if EXACT_ROUND:
            s = _round_to_fp8_grid(s)
        s8 = s.to(tl.float8e4nv)
        s = s8.to(tl.float32)
    else:
        if EXACT_ROUND:
            s = _round_to_bf16_grid(s)
        s8 = s.to(tl.bfloat16)
        s = s8.to(tl.float32)
    pos = s > 0.0
    safe = tl.where(pos, s, 1.0)
    q = _rne(tl.math.div_rn(xg, safe[:, :, None]))
    if SYM:
        q = tl.where(pos[:, :, None], tl.minimum(tl.maximum(q, -8.0), 7.0), 0.0)
    else:
        z = tl.where(pos, tl.minimum(tl.maximum(_rne(tl.math.div_rn(-lo, safe)), 0.0), 15.0), 0.0)
        q = tl.where(pos[:, :, None], tl.minimum(tl.maximum(q + z[:, :, None], 0.0), 15.0), z[:, :, None])
        offs_g = tl.arange(0, NG)
        tl.store(z_ptr + rows[:, None].to(tl.int64) * NG + offs_g[None, :], z.to(tl.uint8), mask=ok[:, None])
    qi = q.to(tl.int32) & 0xF
    lo_n, hi_n = tl.split(tl.permute(tl.reshape(qi, (BR, NG, 2, G // 2)), (0, 1, 3, 2)))
    packed = tl.reshape(lo_n | (hi_n << 4), (BR, D // 2)).to(tl.uint8)
    offs_h = tl.arange(0, D // 2)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * (D // 2) + offs_h[None, :], packed, mask=ok[:, None])
    offs_g = tl.arange(0, NG)
    tl.store(s_ptr + rows[:, None].to(tl.int64) * NG + offs_g[None, :], s8, mask=ok[:, None])


def quantize_kv_triton(x: torch.Tensor, spec):
    """x (..., D) on an FP8 GPU (or under TRITON_INTERPRET=1) -> fireq.formats.kv.QuantizedKV."""
    from fireq.formats.kv import QuantizedKV

    d = x.shape[-1]
    g = spec.group(d)
    if d % g or d & (d - 1) or g & (g - 1):
        raise ValueError(f"quantize_kv_triton: power-of-two head_dim and group needed, got {d} and {g}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r = x2.shape[0]
    lead = x.shape[:-1]
    packed = torch.empty((*lead, d // 2), dtype=torch.uint8, device=x.device)
    sdt = torch.float8_e4m3fn if spec.scale_dtype == "fp8" else torch.bfloat16
    scales = torch.empty((*lead, d // g), dtype=sdt, device=x.device)
    zeros = None if spec.symmetric else torch.empty((*lead, d // g), dtype=torch.uint8, device=x.device)
    if r:
        br = max(1, min(64, 4096 // d))
        _kv_write_kernel[(triton.cdiv(r, br),)](
            x2, packed, scales, zeros if zeros is not None else packed, r, x2.stride(0), D=d, G=g, BR=br,
            SYM=spec.symmetric, FP8_SCALE=spec.scale_dtype == "fp8", EXACT_ROUND=_interpreting(), num_warps=4)
    return QuantizedKV(packed, scales, zeros)
