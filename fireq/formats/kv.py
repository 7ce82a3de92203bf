"""INT4 KV cache format and FP8 query quantization.

K and V (B, H_kv, L, D) are quantized per token, per head, in groups of `group_size` channels
(-1: the whole head, FireQ's default). Symmetric (default):

    s = max|x_g| / 7,  q = clamp(round(x / s), -8, 7),  x ~= q * s

Asymmetric (zero points): s = (max - min) / 15, z = round(-min / s) in [0, 15],
q = clamp(round(x / s) + z, 0, 15), x ~= (q - z) * s. Scales are FP8 E4M3 or BF16; zero points are
stored as uint8. Codes are packed two a byte along D, by channel group: byte j of group g holds channel
g*G + j in its low nibble and channel g*G + G/2 + j in its high nibble (the attention kernel then feeds
the two nibbles of a byte to two products over the group's halves, with no register interleave).
Symmetric codes are two's complement nibbles, asymmetric codes unsigned.

Queries are FP8 E4M3 with one scale per token per head (fireq.formats.fp8.quantize_fp8_rows over D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import FP8_DTYPE, FP8_MAX


def pack_kv_codes(q: torch.Tensor, group: int) -> torch.Tensor:
    """Codes (..., D) (int, -8..7 or 0..15) -> (..., D/2) uint8 in the cache layout (module docstring)."""
    d = q.shape[-1]
    c = q.to(torch.int16).unflatten(-1, (d // group, 2, group // 2))
    return ((c[..., 0, :] & 0xF) | ((c[..., 1, :] & 0xF) << 4)).flatten(-2).to(torch.uint8)


def unpack_kv_codes(packed: torch.Tensor, group: int, signed: bool) -> torch.Tensor:
    """Inverse of pack_kv_codes: (..., D/2) uint8 -> (..., D) int16 codes."""
    p = packed.to(torch.int16).unflatten(-1, (-1, group // 2))
    lo, hi = p & 0xF, (p >> 4) & 0xF
    if signed:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    return torch.stack((lo, hi), dim=-2).flatten(-3)


@dataclass(frozen=True)
class KVSpec:
    """How K and V are stored. bits: 4 (or 16 = not quantized); group_size: -1 = head_dim."""

    bits: int = 4
    group_size: int = -1
    symmetric: bool = True
    scale_dtype: str = "fp8"

    def group(self, head_dim: int) -> int:
        return head_dim if self.group_size in (-1, 0) else self.group_size


def _cast(s: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    if scale_dtype == "fp8":
        return s.clamp(max=FP8_MAX).to(FP8_DTYPE)
    return s.to(torch.bfloat16)


@dataclass
class QuantizedKV:
    """packed: (..., D/2) uint8; scales: (..., D/group); zeros: (..., D/group) uint8 or None."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None


def quantize_kv(x: torch.Tensor, spec: KVSpec) -> QuantizedKV:
    """x: (..., D) -> packed codes, scales (and zero points)."""
    d = x.shape[-1]
    g = spec.group(d)
    if d % g:
        raise ValueError(f"KV group size {g} must divide head_dim {d}")
    xg = x.float().unflatten(-1, (d // g, g))
    if spec.symmetric:
        amax = xg.abs().amax(-1)  # divided by a same-device tensor: IEEE division on every device (CUDA
        s = _cast(amax / torch.full_like(amax, 7.0), spec.scale_dtype)  # turns x / 7.0 into x * (1/7))
        sf = s.float().unsqueeze(-1)
        q = torch.where(sf > 0, torch.round(xg / torch.where(sf > 0, sf, 1.0)), 0.0).clamp(-8, 7)
        return QuantizedKV(pack_kv_codes(q.flatten(-2), g), s, None)
    lo, hi = xg.amin(-1), xg.amax(-1)
    s = _cast((hi - lo) / torch.full_like(lo, 15.0), spec.scale_dtype)
    sf = s.float()
    safe = torch.where(sf > 0, sf, 1.0)
    z = torch.where(sf > 0, torch.round(-lo / safe), 0.0).clamp(0, 15)
    q = (torch.round(xg / safe.unsqueeze(-1)) + z.unsqueeze(-1)).clamp(0, 15)
    q = torch.where(sf.unsqueeze(-1) > 0, q, z.unsqueeze(-1))
    return QuantizedKV(pack_kv_codes(q.flatten(-2), g), s, z.to(torch.uint8))


def dequantize_kv(qkv: QuantizedKV, head_dim: int, spec: KVSpec, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of quantize_kv: (..., D) in dtype."""
    g = spec.group(head_dim)
    q = unpack_kv_codes(qkv.packed, g, signed=qkv.zeros is None).float()
    q = q.unflatten(-1, (head_dim // g, g))
    if qkv.zeros is not None:
        q = q - qkv.zeros.float().unsqueeze(-1)
    return (q * qkv.scales.float().unsqueeze(-1)).flatten(-2).to(dtype)


def fake_quantize_kv(x: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    """Quantize-dequantize, in x's dtype. bits = 16 leaves x as it is."""
    if spec.bits >= 16:
        return x
    return dequantize_kv(quantize_kv(x, spec), x.shape[-1], spec, x.dtype)
