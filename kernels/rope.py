"""Rotary position embedding of the queries and keys in one Triton launch.

transformers' `apply_rotary_pos_emb` (Llama, Mistral, Qwen, Gemma families) is q * cos + rotate_half(q) * sin
and the same for k, in the tensors' dtype: at decode ten small kernels a layer (four products, two negations,
two concatenations, two sums), each pure launch latency. This kernel computes the same arithmetic, rounding as
PyTorch does after every operation (each product and the sum rounded to the dtype), so its outputs are equal
bit for bit to the original's (twin: reference.rope_ref):

    out[:D/2] = r(r(x1 * cos1) + r(-x2 * sin1)),  out[D/2:] = r(r(x2 * cos2) + r(x1 * sin2))

with x1, x2 the halves of a head's row and r() the rounding to the dtype (BF16 or FP16). q (B, Hq, L, D) and
k (B, Hk, L, D) may be strided views (the fused q/k/v GEMM's output); cos and sin are (B, L, D).

With fp8=True the kernel also writes the rotated queries' FP8 quantization, one scale per (token, head) row of
D, equal bit for bit to quantize_fp8_rows_triton(q_embed.reshape(-1, D)): what the INT4-KV attention kernel takes
as its queries when no post-RoPE scale divides them first (fireq.nn.attention), one launch fewer a layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .gemm_w4a8 import _interpreting, fp8_row_codes, fp8_row_scale
from .rmsnorm import _bf16_rne


@triton.jit
def _rnd(y, DT: tl.constexpr, BF16_RNE: tl.constexpr):
    """y (fp32) rounded to DT, still fp32 (BF16_RNE: explicitly, for the CPU interpreter)."""
    if BF16_RNE:
        return _bf16_rne(y)
    return y.to(DT).to(tl.float32)


@triton.jit
def _rot(xa, xb, ca, sb, NEG: tl.constexpr, DT: tl.constexpr, BF16_RNE: tl.constexpr):
    """r(r(xa * ca) + r(+-xb * sb)): one half of a row, rounded after every operation as PyTorch does (launched
    with enable_fp_fusion=False: a product contracted into an fma with the add would skip its rounding)."""
    if NEG:
        xb = -xb
    return _rnd(_rnd(xa * ca, DT, BF16_RNE) + _rnd(xb * sb, DT, BF16_RNE), DT, BF16_RNE)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, q8_ptr, qs_ptr, HQ, HK, L,
                 sqb, sqh, sql, skb, skh, skl, scb, scl, ssb, ssl,
                 D: tl.constexpr, BH: tl.constexpr, BF16_RNE: tl.constexpr, Q8: tl.constexpr,
                 EXACT_ROUND: tl.constexpr):
    """Program (b * L + l, head block): BH of the Hq + Hk heads (queries first) at position l of sequence b.
    Q8: also the query rows' FP8 quantization (q8 (B * Hq * L, D), qs (B * Hq * L,), rows in qo's order)."""
    bl = tl.program_id(0)
    b = bl // L
    l = bl % L
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    is_q = h < HQ
    is_k = (h >= HQ) & (h < HQ + HK)
    hk = tl.where(is_q, 0, h - HQ)
    half = tl.arange(0, D // 2)
    DT: tl.constexpr = qo_ptr.dtype.element_ty
    c_off = b.to(tl.int64) * scb + l.to(tl.int64) * scl
    s_off = b.to(tl.int64) * ssb + l.to(tl.int64) * ssl
    c1 = tl.load(cos_ptr + c_off + half).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + c_off + D // 2 + half).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + s_off + half).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + s_off + D // 2 + half).to(tl.float32)[None, :]
    q_row = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64)[:, None] * sqh + l.to(tl.int64) * sql
    k_row = k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64)[:, None] * skh + l.to(tl.int64) * skl
    mq = is_q[:, None]
    mk = is_k[:, None]
    x1 = tl.where(mq, tl.load(q_row + half[None, :], mask=mq, other=0.0),
                  tl.load(k_row + half[None, :], mask=mk, other=0.0)).to(tl.float32)
    x2 = tl.where(mq, tl.load(q_row + D // 2 + half[None, :], mask=mq, other=0.0),
                  tl.load(k_row + D // 2 + half[None, :], mask=mk, other=0.0)).to(tl.float32)
    o1 = _rot(x1, x2, c1, s1, True, DT, BF16_RNE)
    o2 = _rot(x2, x1, c2, s2, False, DT, BF16_RNE)
    # outputs contiguous (B, H, L, D)
    qo = qo_ptr + ((b.to(tl.int64) * HQ + h.to(tl.int64)[:, None]) * L + l) * D
    ko = ko_ptr + ((b.to(tl.int64) * HK + hk.to(tl.int64)[:, None]) * L + l) * D
    tl.store(qo + half[None, :], o1.to(DT), mask=mq)
    tl.store(qo + D // 2 + half[None, :], o2.to(DT), mask=mq)
    tl.store(ko + half[None, :], o1.to(DT), mask=mk)
    tl.store(ko + D // 2 + half[None, :], o2.to(DT), mask=mk)
    if Q8:  # quantize_fp8_rows_triton's arithmetic on each query row as stored (o1, o2 hold DT values)
        sc = fp8_row_scale(tl.maximum(tl.max(tl.abs(o1), axis=1), tl.max(tl.abs(o2), axis=1)))
        row = (b.to(tl.int64) * HQ + h.to(tl.int64)) * L + l
        tl.store(q8_ptr + row[:, None] * D + half[None, :], fp8_row_codes(o1, sc[:, None], EXACT_ROUND), mask=mq)
        tl.store(q8_ptr + row[:, None] * D + D // 2 + half[None, :], fp8_row_codes(o2, sc[:, None], EXACT_ROUND),
                 mask=mq)
        tl.store(qs_ptr + row, sc, mask=is_q)


@on_tensor_device
def rope_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fp8: bool = False):
    """q (B, Hq, L, D), k (B, Hk, L, D) in BF16 or FP16 with the last dim contiguous; cos, sin (B or 1, L, D) in
    the same dtype -> (q_embed, k_embed), contiguous, equal bit for bit to transformers' apply_rotary_pos_emb.
    fp8: (q_embed, k_embed, q8 (B * Hq * L, D) float8_e4m3fn, qs (B * Hq * L, 1) fp32), q8 and qs equal to
    quantize_fp8_rows_triton(q_embed.reshape(-1, D))."""
    bsz, hq, n, d = q.shape
    if (k.dim() != 4 or k.shape[0] != bsz or k.shape[2:] != (n, d) or q.dtype not in (torch.bfloat16, torch.float16)
            or not (k.dtype == cos.dtype == sin.dtype == q.dtype) or d % 2 or d & (d - 1)
            or cos.shape != sin.shape or cos.dim() != 3 or cos.shape[1:] != (n, d) or cos.shape[0] not in (1, bsz)
            or q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1):
        raise ValueError("rope_triton: q (B, Hq, L, D), k (B, Hk, L, D), cos/sin (B or 1, L, D), one 16-bit dtype, "
                         "power-of-two D, contiguous last dims")
    hk = k.shape[1]
    qo = torch.empty((bsz, hq, n, d), dtype=q.dtype, device=q.device)
    ko = torch.empty((bsz, hk, n, d), dtype=k.dtype, device=k.device)
    q8 = torch.empty((bsz * hq * n, d), dtype=torch.float8_e4m3fn, device=q.device) if fp8 else qo
    qs = torch.empty((bsz * hq * n, 1), dtype=torch.float32, device=q.device) if fp8 else qo
    if qo.numel() + ko.numel():
        bh = 8
        cb = cos.stride(0) if cos.shape[0] > 1 else 0
        sb = sin.stride(0) if sin.shape[0] > 1 else 0
        _rope_kernel[(bsz * n, triton.cdiv(hq + hk, bh))](
            q, k, qo, ko, cos, sin, q8, qs, hq, hk, n, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
            k.stride(2), cb, cos.stride(1), sb, sin.stride(1), D=d, BH=bh,
            BF16_RNE=not q.is_cuda and q.dtype == torch.bfloat16, Q8=fp8, EXACT_ROUND=fp8 and _interpreting(),
            num_warps=max(1, min(4, bh * d // 256)), enable_fp_fusion=False)
    return (qo, ko, q8, qs) if fp8 else (qo, ko)
