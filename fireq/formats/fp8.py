"""FP8 E4M3 (the "fn" variant: no infinities, max 448) quantizers.

Activations and queries are quantized dynamically, one scale per row (token):

    s = max_k |x_k| / 448          (float32)
    q = fp8(clamp(x / s, -448, 448))  (round to nearest even, as the hardware cast does)

so that x ~= q * s. The Triton kernels compute exactly this; these functions are their twins.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
# Smallest positive subnormal of E4M3: 2^-9. A scale below it cannot be stored in FP8.
FP8_MIN_SUBNORMAL = 2.0**-9
# Guard against all-zero rows; any positive value works since the row quantizes to zeros.
_TINY = torch.finfo(torch.float32).tiny


def to_fp8(x: torch.Tensor) -> torch.Tensor:
    """Cast to FP8 E4M3 with saturation (a plain cast turns out-of-range values into NaN)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def round_to_fp8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest FP8 E4M3 value, returned in float32."""
    return to_fp8(x).float()


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) dynamic FP8 quantization.

    x: (..., K) any float dtype -> (q: (..., K) float8_e4m3fn, scale: (..., 1) float32)
    """
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_TINY)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fake_quantize_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize per row, in x's dtype."""
    q, s = quantize_fp8_rows(x)
    return (q.float() * s).to(x.dtype)
