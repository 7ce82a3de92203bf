"""FP8 prefill path of the W4A8 linear: INT4 weights re-rounded to FP8 E4M3 with one scale a row, then a plain
FP8 GEMM with per-token and per-channel scales (cuBLAS through torch._scaled_mm).

Why: with g128 group scales, the INT4 GEMM must scale every 128-channel K tile's FP8 product separately (a
fresh accumulator a tile), which holds it near cuBLAS BF16 speed at prefill. Writing q s_g 2^-e as
(q * 56 s_g / max_g s_g) * (max_g s_g 2^-e / 56) puts the group scale into the FP8 value (|q ratio| <= 448)
and leaves one scale a row, so the whole K loop is one chained FP8 MMA accumulation. The price: the product
q ratio has more significant bits than E4M3's four and is rounded (to nearest even), so this path is not
the INT4 GEMM's arithmetic; its twin is reference.w4a8_prefill_fp8_ref. On SmolLM2 (weight-only RTN,
WikiText-2, 40 x 512 tokens) the re-rounding moved perplexity from 44.11 to 44.49
(benchmarks/results/pow2-scales-smollm2.json). At prefill the conversion (N K / 2 bytes read, N K written)
is small next to the GEMM.

Layout of the input: the checkpoint layout (byte j: channels 2j, 2j + 1) or the kernel layout of
gemm_w4a8.repack_half (byte j of a block of LB channels: channels j and j + LB/2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_w4a8 import _interpreting, _round_to_fp8_grid
from .reference import fp8_row_rescale


# ----------------------------------------------------------------------------- configs
def convert_config(n: int, k: int) -> dict:
    """(BN rows, BKH bytes) a program: 4 KiB of codes in, 8 KiB of FP8 out."""
    return dict(BN=32, BKH=128, num_warps=4)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _int4_to_fp8_kernel(w_ptr, r_ptr, o_ptr, N, K, KH, stride_wn, stride_rn, stride_on,
                        GROUP: tl.constexpr, BN: tl.constexpr, BKH: tl.constexpr, HALF_LB: tl.constexpr,
                        EXACT_ROUND: tl.constexpr):
    """A (BN, BKH) tile of packed bytes -> its 2 BKH FP8 values a row: fp8(q * ratio[n, channel // GROUP])."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_h = pid_k * BKH + tl.arange(0, BKH)
    mask_n = offs_n < N
    row = offs_n[:, None].to(tl.int64)
    wb = tl.load(w_ptr + row * stride_wn + offs_h[None, :], mask=mask_n[:, None] & (offs_h[None, :] < KH),
                 other=0).to(tl.int32)
    lo = ((wb & 0xF) ^ 8) - 8
    hi = (((wb >> 4) & 0xF) ^ 8) - 8
    if HALF_LB > 0:  # byte j of a block: channels j and j + HALF_LB/2 of the block
        ke = (offs_h // (HALF_LB // 2)) * HALF_LB + offs_h % (HALF_LB // 2)
        ko = ke + HALF_LB // 2
    else:  # checkpoint layout: channels 2j and 2j + 1
        ke = 2 * offs_h
        ko = ke + 1
    for half in tl.static_range(2):
        if half == 0:
            kc = ke
            q = lo
        else:
            kc = ko
            q = hi
        msk = mask_n[:, None] & (kc[None, :] < K)
        ratio = tl.load(r_ptr + row * stride_rn + kc[None, :] // GROUP, mask=msk, other=0.0)
        y = q.to(tl.float32) * ratio
        if EXACT_ROUND:
            y = _round_to_fp8_grid(y)
        tl.store(o_ptr + row * stride_on + kc[None, :], y.to(tl.float8e4nv), mask=msk)


# ----------------------------------------------------------------------------- launchers
def int4_to_fp8_triton(qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int, k: int,
                       group_size: int, layout_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """See reference.int4_to_fp8_ref (same values, bit for bit). qweight: (N, ceil(K/2)) uint8, or with
    layout_block > 0 the repack_half layout (N, ceil(K / LB) LB / 2); w_scales: (N, G) fp8/bf16 ->
    (w8 (N, K) fp8 e4m3, row_scale (N,) fp32)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.stride(1) != 1:
        raise TypeError("int4_to_fp8_triton: qweight must be a 2-D uint8 tensor with contiguous rows")
    n = qweight.shape[0]
    row_bytes = (k + 1) // 2 if not layout_block else triton.cdiv(k, layout_block) * layout_block // 2
    if qweight.shape[1] != row_bytes:
        raise ValueError(f"qweight has {qweight.shape[1]} bytes a row, expected {row_bytes} for K={k}")
    per_channel = group_size in (-1, 0) or group_size >= k
    g = k if per_channel else group_size
    if w_scales.shape != (n, triton.cdiv(k, g)) or w_scales.device != qweight.device:
        raise ValueError(f"w_scales shape {tuple(w_scales.shape)} does not match N={n}, K={k}, group {g}")
    ratio, row_scale = fp8_row_rescale(w_scales, log2_multiplier)
    ratio = ratio.contiguous()
    w8 = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=qweight.device)
    cfg = convert_config(n, k)
    grid = (triton.cdiv(n, cfg["BN"]), triton.cdiv(row_bytes, cfg["BKH"]))
    if n and k:
        _int4_to_fp8_kernel[grid](qweight, ratio, w8, n, k, row_bytes, qweight.stride(0), ratio.stride(0),
                                  w8.stride(0), GROUP=g, BN=cfg["BN"], BKH=cfg["BKH"], HALF_LB=layout_block,
                                  EXACT_ROUND=_interpreting(), num_warps=cfg["num_warps"])
    return w8, row_scale


def w4a8_prefill_fp8(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                     log2_multiplier: int, group_size: int, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.bfloat16, layout_block: int = 0) -> torch.Tensor:
    """See reference.w4a8_prefill_fp8_ref. xq: (M, K) fp8 e4m3; x_scale: (M, 1) fp32; qweight, w_scales as
    int4_to_fp8_triton; bias: (N,) or None -> (M, N) out_dtype. K and N must be multiples of 16 (cuBLAS)."""
    if xq.dtype != torch.float8_e4m3fn or xq.dim() != 2:
        raise TypeError("w4a8_prefill_fp8: xq must be a 2-D float8_e4m3fn tensor")
    m, k = xq.shape
    n = qweight.shape[0]
    if k % 16 or n % 16:
        raise ValueError(f"w4a8_prefill_fp8: K ({k}) and N ({n}) must be multiples of 16")
    w8, row_scale = int4_to_fp8_triton(qweight, w_scales, log2_multiplier, k, group_size, layout_block)
    out = torch._scaled_mm(xq.contiguous(), w8.t(), scale_a=x_scale.reshape(m, 1).float().contiguous(),
                           scale_b=row_scale.reshape(1, n).contiguous(), out_dtype=torch.bfloat16)
    if bias is not None:
        out = out.float() + bias.float()
    return out.to(out_dtype)
