"""INT4 symmetric group quantization of weights, its scale formats, and nibble packing.

Weights W (N, K) are split along K into groups of `group_size` (the last group is shorter when
group_size does not divide K; group_size = -1 means one group per row, "per channel"). Each group g of
row n gets a scale; values are integers q in [-8, 7]:

    s_ng = max_{k in g} |m * W_nk| / 7,  stored as FP8 E4M3 (or BF16)
    q_nk = clamp(round(m * W_nk / s_ng), -8, 7)
    W_nk ~= q_nk * s_ng / m

m = 2^e is a per-tensor power-of-two multiplier (FireQ): FP8 cannot hold a scale below 2^-9, so small
weights would lose their scales to underflow. e is searched over 0..14, rejecting any e that pushes a
scale past 448, and the e with the smallest reconstruction error wins (ties go to the smaller e).
With BF16 scales there is no underflow and e = 0.

Packing: two nibbles a byte along K, the even k in the low nibble (two's complement, 4 bits):
    byte[n, j] = (q[n, 2j] & 0xF) | (q[n, 2j + 1] & 0xF) << 4
An odd K gets one zero nibble of padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import FP8_DTYPE, FP8_MAX

INT4_MIN, INT4_MAX = -8, 7
MAX_LOG2_MULTIPLIER = 14


def n_groups(k: int, group_size: int) -> int:
    """Number of groups along a dimension of length k (the last one may be partial)."""
    g = k if group_size in (-1, 0) else group_size
    return -(-k // g)


def effective_group_size(k: int, group_size: int) -> int:
    return k if group_size in (-1, 0) else group_size


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) integers in [-8, 7] -> (..., ceil(K/2)) uint8, even index in the low nibble."""
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    q = q.to(torch.int16) & 0xF
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(..., ceil(K/2)) uint8 -> (..., K) int8 in [-8, 7]; exact inverse of pack_int4."""
    p = packed.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    out = torch.stack((lo, hi), dim=-1).flatten(-2)
    return out[..., :k].to(torch.int8)


def _cast_scale(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    if scale_dtype == "fp8":
        return s.clamp(max=FP8_MAX).to(FP8_DTYPE)
    if scale_dtype == "bf16":
        return s.to(torch.bfloat16)
    raise ValueError(f"unknown scale dtype {scale_dtype!r}")


@dataclass(frozen=True)
class QuantizedWeight:
    """A packed INT4 weight.

    qweight: (N, ceil(K/2)) uint8; scales: (N, n_groups) float8_e4m3fn or bfloat16;
    log2_multiplier: e with m = 2^e; in_features: K; group_size: as requested (-1 = per channel).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    log2_multiplier: int
    in_features: int
    group_size: int

    def int_values(self) -> torch.Tensor:
        """(N, K) int8."""
        return unpack_int4(self.qweight, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat = q * s / m, (N, K)."""
        return dequantize_int4(self.qweight, self.scales, self.log2_multiplier, self.in_features,
                               self.group_size).to(dtype)


def expand_group_scales(scales: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """(N, G) -> (N, K) float32, each scale repeated over its group."""
    g = effective_group_size(k, group_size)
    return scales.float().repeat_interleave(g, dim=-1)[..., :k]


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, log2_multiplier: int, k: int,
                    group_size: int) -> torch.Tensor:
    """(N, K) float32 = q * s / 2^e."""
    q = unpack_int4(qweight, k).float()
    return q * expand_group_scales(scales, k, group_size) * (2.0 ** -log2_multiplier)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = effective_group_size(k, group_size)
    pad = n_groups(k, group_size) * g - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(n, -1, g)


def quantize_int4_with(w: torch.Tensor, group_size: int, scale_dtype: str, log2_multiplier: int,
                       clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest INT4 at a fixed multiplier.

    w: (N, K). clip: a factor (scalar or (N, G)) on the group absmax before the scale is taken.
    Returns (q: (N, K) int8, scales: (N, G) in the stored dtype).
    """
    n, k = w.shape
    wg = _grouped(w.double(), group_size) * (2.0 ** log2_multiplier)
    amax = wg.abs().amax(dim=-1)
    if isinstance(clip, torch.Tensor):
        amax = amax * clip.double()
    elif clip != 1.0:
        amax = amax * clip
    scales = _cast_scale((amax / INT4_MAX).float(), scale_dtype)
    s = scales.double().unsqueeze(-1)
    q = torch.where(s > 0, torch.round(wg / torch.where(s > 0, s, 1.0)), 0.0).clamp(INT4_MIN, INT4_MAX)
    return q.view(n, -1)[:, :k].to(torch.int8), scales


def search_log2_multiplier(w: torch.Tensor, group_size: int) -> int:
    """FireQ's per-tensor power-of-two multiplier for FP8 scales: the e in 0..14 with the lowest
    reconstruction error among those keeping every group scale <= 448."""
    amax = _grouped(w.double(), group_size).abs().amax(dim=-1)
    top = float(amax.max()) / INT4_MAX
    best_e, best_err = 0, None
    for e in range(MAX_LOG2_MULTIPLIER + 1):
        if top * 2.0**e > FP8_MAX:
            break
        q, s = quantize_int4_with(w, group_size, "fp8", e)
        err = float(((q.double() * expand_group_scales(s, w.shape[1], group_size).double()
                      * 2.0**-e - w.double()) ** 2).sum())
        if best_err is None or err < best_err:
            best_e, best_err = e, err
    return best_e


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def search_clip(w: torch.Tensor, group_size: int, scale_dtype: str, log2_multiplier: int,
                channel_weight: torch.Tensor) -> torch.Tensor:
    """Per-group clipping ratio of the absmax (from CLIP_RATIOS) minimizing the input-weighted error
    sum_k E[x_k^2] (W_nk - W_hat_nk)^2 of each group. channel_weight: (K,) E[x_k^2]. Returns (N, G)."""
    n, k = w.shape
    cw = _grouped(channel_weight.double()[None, :].expand(n, k), group_size)
    wg = _grouped(w.double(), group_size)
    best_err, best = None, None
    for c in CLIP_RATIOS:
        q, s = quantize_int4_with(w, group_size, scale_dtype, log2_multiplier, c)
        deq = _grouped(q.double() * expand_group_scales(s, k, group_size).double() * 2.0**-log2_multiplier,
                       group_size)
        err = ((deq - wg) ** 2 * cw).sum(-1)
        if best_err is None:
            best_err, best = err, torch.full_like(err, c)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, torch.full_like(err, c), best)
    return best


def quantize_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: str = "fp8",
                  log2_multiplier: int | None = None, channel_weight: torch.Tensor | None = None) -> QuantizedWeight:
    """Round-to-nearest INT4 group quantization of a weight (N, K), packed. With channel_weight (K,)
    (E[x_k^2] of the inputs), each group's clipping ratio is searched (search_clip)."""
    if w.dim() != 2:
        raise ValueError("expected a 2-D weight")
    if log2_multiplier is None:
        log2_multiplier = search_log2_multiplier(w, group_size) if scale_dtype == "fp8" else 0
    clip = 1.0 if channel_weight is None else search_clip(w, group_size, scale_dtype, log2_multiplier,
                                                           channel_weight)
    q, scales = quantize_int4_with(w, group_size, scale_dtype, log2_multiplier, clip)
    return QuantizedWeight(pack_int4(q), scales, log2_multiplier, w.shape[1], group_size)
