"""FP8 prefill path of the W4A8 linear: INT4 weights re-rounded to FP8 E4M3 with one scale a row, then a plain
FP8 GEMM with per-token and per-channel scales (cuBLAS through torch._scaled_mm).

Why: with g128 group scales, the INT4 GEMM must scale every 128-channel K tile's FP8 product separately (a
fresh accumulator a tile), which holds it near cuBLAS BF16 speed at prefill. Writing q s_g 2^-e as
(q * 56 s_g / max_g s_g) * (max_g s_g 2^-e / 56) puts the group scale into the FP8 value (|q ratio| <= 448)
and leaves one scale a row, so the whole K loop is one chained FP8 MMA accumulation. The price: the product
q ratio has more significant bits than E4M3's four and is rounded (to nearest even), so this path is not
the INT4 GEMM's arithmetic; its twin is reference.w4a8_prefill_fp8_ref. On SmolLM2 (weight-only RTN,
WikiText-2, 40 x 512 tokens) the re-rounding moved perplexity from 44.11 to 44.49
(benchmarks/results/pow2-scales-smollm2.json). The conversion moves N K / 2 bytes in and N K out; on the
H200 the rowwise-scaled cuBLAS GEMM ran at cuBLAS FP8 speed, but the first conversion kernel (per-element
ratio gathers, byte stores) read and wrote at only 0.27-0.33 TB/s, leaving the path at 1.24x cuBLAS BF16 /
0.70x cuBLAS FP8 at M = 4096-8192 (benchmarks/results/prefill-fp8-h200.json). The kernel below puts the
nibbles back in channel order in registers and stores each row's tile with 16-byte vector stores (checked
in its sm_90 PTX for aligned shapes); its speed is not measured yet.

Not used by default: opt in by calling w4a8_prefill_fp8 (its numbers differ from the INT4 GEMM's).

Layout of the input: the checkpoint layout (byte j: channels 2j, 2j + 1) or the kernel layout of
gemm_w4a8.repack_half (byte j of a block of LB channels: channels j and j + LB/2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm_w4a8 import _interpreting, _round_to_fp8_grid, weight_geometry
from .int4cvt import nibbles_f16, use_asm
from .reference import fp8_row_rescale


# ----------------------------------------------------------------------------- configs
def convert_config(k: int, group: int, layout_block: int) -> dict:
    """C channels (C / 2 packed bytes) of BN rows a program, C a multiple of the layout block and dividing the
    group or a multiple of it, so a tile's ratios are one (BN,) vector or a (BN, C / G) table."""
    c = max(256, layout_block)
    if layout_block and c % layout_block:
        raise ValueError(f"int4_to_fp8: layout block {layout_block} must divide {c}")
    if not (group >= k or group % c == 0 or c % group == 0):
        raise ValueError(f"int4_to_fp8: group size {group} must divide {c} or be a multiple of it")
    return dict(BN=32, C=c, num_warps=4)


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _int4_to_fp8_kernel(w_ptr, r_ptr, o_ptr, N, K, KH, NGROUPS, stride_wn, stride_rn, stride_on,
                        GROUP: tl.constexpr, PER_ROW: tl.constexpr, BN: tl.constexpr, C: tl.constexpr,
                        HALF_LB: tl.constexpr, ASM: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """A (BN, C / 2) tile of packed bytes -> (BN, C) FP8 values in channel order, fp8(q * ratio[n, c // GROUP]).

    The nibbles are put back in channel order in registers (checkpoint layout: low and high nibble of byte j
    are channels 2j and 2j + 1, a join; kernel layout: a block's low nibbles are its first half, a join and
    a transpose), so that each row's C outputs are one contiguous store. PER_ROW: the tile lies in one group
    (or the scales are per channel): one ratio a row."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_h = pid_k * (C // 2) + tl.arange(0, C // 2)
    mask_n = offs_n < N
    row = offs_n[:, None].to(tl.int64)
    wb = tl.load(w_ptr + row * stride_wn + offs_h[None, :], mask=mask_n[:, None] & (offs_h[None, :] < KH),
                 other=0)
    lo, hi = nibbles_f16(wb, wb, True, False, ASM)
    lo = lo.to(tl.float32)
    hi = hi.to(tl.float32)
    if HALF_LB > 0:  # per block of HALF_LB channels: low nibbles first, then the high ones
        NB: tl.constexpr = C // HALF_LB
        lo3 = tl.reshape(lo, (BN, NB, HALF_LB // 2))
        hi3 = tl.reshape(hi, (BN, NB, HALF_LB // 2))
        q = tl.reshape(tl.permute(tl.join(lo3, hi3), (0, 1, 3, 2)), (BN, C))
    else:  # checkpoint layout: channels 2j (low), 2j + 1 (high)
        q = tl.reshape(tl.join(lo, hi), (BN, C))
    c0 = pid_k * C
    if PER_ROW:
        ratio = tl.load(r_ptr + offs_n * stride_rn + c0 // GROUP, mask=mask_n, other=0.0)
        y = q * ratio[:, None]
    else:
        NG: tl.constexpr = C // GROUP
        gi = c0 // GROUP + tl.arange(0, NG)
        ratio = tl.load(r_ptr + row * stride_rn + gi[None, :], mask=mask_n[:, None] & (gi[None, :] < NGROUPS),
                        other=0.0)
        y = tl.reshape(tl.reshape(q, (BN, NG, GROUP)) * ratio[:, :, None], (BN, C))
    if EXACT_ROUND:
        y = _round_to_fp8_grid(y)
    offs_c = c0 + tl.arange(0, C)
    tl.store(o_ptr + row * stride_on + offs_c[None, :], y.to(tl.float8e4nv),
             mask=mask_n[:, None] & (offs_c[None, :] < K))


# ----------------------------------------------------------------------------- launchers
def int4_to_fp8_triton(qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int, k: int,
                       group_size: int, layout_block: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """See reference.int4_to_fp8_ref (same values, bit for bit). qweight: (N, ceil(K/2)) uint8, or with
    layout_block > 0 the repack_half layout (N, ceil(K / LB) LB / 2); w_scales: (N, G) fp8/bf16 ->
    (w8 (N, K) fp8 e4m3, row_scale (N,) fp32)."""
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.stride(1) != 1:
        raise TypeError("int4_to_fp8_triton: qweight must be a 2-D uint8 tensor with contiguous rows")
    n = qweight.shape[0]
    per_channel, g = weight_geometry(qweight, w_scales, k, group_size, layout_block)
    if w_scales.device != qweight.device:
        raise ValueError("int4_to_fp8_triton: qweight and w_scales must be on one device")
    cfg = convert_config(k, g, layout_block)
    ratio, row_scale = fp8_row_rescale(w_scales, log2_multiplier)
    w8 = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=qweight.device)
    per_row = per_channel or g % cfg["C"] == 0
    grid = (triton.cdiv(n, cfg["BN"]), triton.cdiv(k, cfg["C"]))
    if n and k:
        _int4_to_fp8_kernel[grid](qweight, ratio, w8, n, k, qweight.shape[1], ratio.shape[1], qweight.stride(0),
                                  ratio.stride(0), w8.stride(0), GROUP=g, PER_ROW=per_row, BN=cfg["BN"],
                                  C=cfg["C"], HALF_LB=layout_block, ASM=use_asm(), EXACT_ROUND=_interpreting(),
                                  num_warps=cfg["num_warps"])
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
