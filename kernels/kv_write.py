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

from .device import on_tensor_device
from .gemm_w4a8 import _interpreting, _round_to_fp8_grid

@triton.jit
def _rne(y):
    """Round to the nearest integer, ties to even (torch.round), for |y| < 2^22: adding and subtracting
    1.5 * 2^23 in fp32 leaves no fraction bits."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_to_bf16_grid(y):
    """y (fp32, finite, >= 0) rounded to the nearest BF16 value, ties to even, still fp32 (the CPU
    interpreter's fp32 -> bf16 cast does not round to nearest)."""
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _kv_write_kernel(x_ptr, q_ptr, s_ptr, z_ptr, pos_ptr, R, stride_x, NT, CAP, D: tl.constexpr, G: tl.constexpr,
                     BR: tl.constexpr, SYM: tl.constexpr, FP8_SCALE: tl.constexpr, EXACT_ROUND: tl.constexpr,
                     SCATTER: tl.constexpr):
    """Per group: its two halves are loaded as two (BR, G/2) tiles, which are exactly the low and high
    nibbles of the group's G/2 output bytes (no reshapes or register shuffles).
    SCATTER: x's rows are (B, H, NT) tokens written into cache buffers (B, H, CAP, .) at token positions
    pos.. (pos: a device int64 scalar); else row r goes to output row r."""
    NG: tl.constexpr = D // G
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < R
    offs = tl.arange(0, G // 2)
    xrow = x_ptr + rows[:, None].to(tl.int64) * stride_x
    if SCATTER:
        drow = (rows // NT).to(tl.int64) * CAP + tl.load(pos_ptr) + rows % NT
    else:
        drow = rows.to(tl.int64)
    for gi in tl.static_range(NG):
        xa = tl.load(xrow + gi * G + offs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        xb = tl.load(xrow + gi * G + G // 2 + offs[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        if SYM:
            amax = tl.maximum(tl.max(tl.abs(xa), axis=1), tl.max(tl.abs(xb), axis=1))
            s = tl.math.div_rn(amax, tl.full((BR,), 7.0, tl.float32))
        else:
            lo = tl.minimum(tl.min(xa, axis=1), tl.min(xb, axis=1))
            hi = tl.maximum(tl.max(xa, axis=1), tl.max(xb, axis=1))
            s = tl.math.div_rn(hi - lo, tl.full((BR,), 15.0, tl.float32))
        if FP8_SCALE:
            s = tl.minimum(s, 448.0)
            if EXACT_ROUND:
                s = _round_to_fp8_grid(s)
            s_st = s.to(tl.float8e4nv)
        else:
            if EXACT_ROUND:
                s = _round_to_bf16_grid(s)
            s_st = s.to(tl.bfloat16)
        s = s_st.to(tl.float32)
        pos = s > 0.0
        safe = tl.where(pos, s, 1.0)
        qa = _rne(tl.math.div_rn(xa, safe[:, None]))
        qb = _rne(tl.math.div_rn(xb, safe[:, None]))
        if SYM:
            qa = tl.where(pos[:, None], tl.minimum(tl.maximum(qa, -8.0), 7.0), 0.0)
            qb = tl.where(pos[:, None], tl.minimum(tl.maximum(qb, -8.0), 7.0), 0.0)
        else:
            z = tl.where(pos, tl.minimum(tl.maximum(_rne(tl.math.div_rn(-lo, safe)), 0.0), 15.0), 0.0)
            qa = tl.where(pos[:, None], tl.minimum(tl.maximum(qa + z[:, None], 0.0), 15.0), z[:, None])
            qb = tl.where(pos[:, None], tl.minimum(tl.maximum(qb + z[:, None], 0.0), 15.0), z[:, None])
            tl.store(z_ptr + drow * NG + gi, z.to(tl.uint8), mask=ok)
        byte = (qa.to(tl.int32) & 0xF) | ((qb.to(tl.int32) & 0xF) << 4)
        tl.store(q_ptr + drow[:, None] * (D // 2) + gi * (G // 2) + offs[None, :], byte.to(tl.uint8),
                 mask=ok[:, None])
        tl.store(s_ptr + drow * NG + gi, s_st, mask=ok)


def _launch_shape(r: int, d: int) -> tuple[int, int]:
    """(rows a program, warps) for r rows of d channels: up to 4096 elements a program, but no fewer programs
    than rows or 132 (one token's 8 heads at decode: 8 one-row programs, not one program of 32 rows, 3/4 of
    them masked, whose serial chain of divisions was 6 us a call in a decode step on the H200,
    decode-profile-b1-h200.json)."""
    br = max(1, min(64, 4096 // d, triton.next_power_of_2(triton.cdiv(r, 132))))
    return br, max(1, min(4, br * d // 256))


@on_tensor_device
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
        br, warps = _launch_shape(r, d)
        _kv_write_kernel[(triton.cdiv(r, br),)](
            x2, packed, scales, zeros if zeros is not None else packed, x2, r, x2.stride(0), 1, 1, D=d, G=g, BR=br,
            SYM=spec.symmetric, FP8_SCALE=spec.scale_dtype == "fp8", EXACT_ROUND=_interpreting(), SCATTER=False,
            num_warps=warps)
    return QuantizedKV(packed, scales, zeros)


@on_tensor_device
def write_kv_triton(x: torch.Tensor, spec, dst, pos: torch.Tensor) -> None:
    """Quantize x (B, H, n, D) and write it into the cache buffers dst (QuantizedKV of contiguous (B, H, CAP,
    .) tensors) at token positions pos .. pos + n - 1 (pos: a device int64 scalar tensor), in one launch.
    The same codes and scales as quantize_kv_triton(x) (and quantize_kv)."""
    b, h, n, d = x.shape
    g = spec.group(d)
    if d % g or d & (d - 1) or g & (g - 1):
        raise ValueError(f"write_kv_triton: power-of-two head_dim and group needed, got {d} and {g}")
    cap = dst.packed.shape[2]
    for t in (dst.packed, dst.scales) + (() if dst.zeros is None else (dst.zeros,)):
        if t.shape[:3] != (b, h, cap) or not t.is_contiguous():
            raise ValueError("write_kv_triton: cache buffers must be contiguous (B, H, CAP, .) matching x")
    if (dst.zeros is None) != spec.symmetric:
        raise ValueError("write_kv_triton: zero points present exactly when the format is asymmetric")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r = x2.shape[0]
    if r:
        br, warps = _launch_shape(r, d)
        _kv_write_kernel[(triton.cdiv(r, br),)](
            x2, dst.packed, dst.scales, dst.zeros if dst.zeros is not None else dst.packed, pos, r, x2.stride(0), n,
            cap, D=d, G=g, BR=br, SYM=spec.symmetric, FP8_SCALE=spec.scale_dtype == "fp8",
            EXACT_ROUND=_interpreting(), SCATTER=True, num_warps=warps)
