import torch

from fireq.formats.fp8 import FP8_MAX, fake_quantize_fp8_rows, quantize_fp8_rows, round_to_fp8


def _fp8_grid() -> torch.Tensor:
    """All finite E4M3 values, in float64, sorted (an independent reference for rounding)."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
    return torch.unique(v[torch.isfinite(v)])


def _round_ref(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value in float64 (saturating); ties are excluded by the callers."""
    grid = _fp8_grid()
    x = x.double().clamp(-FP8_MAX, FP8_MAX)
    idx = torch.searchsorted(grid, x).clamp(1, len(grid) - 1)
    lo, hi = grid[idx - 1], grid[idx]
    return torch.where((x - lo).abs() <= (hi - x).abs(), lo, hi)


def test_round_matches_float64_grid():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * torch.exp(torch.randn(20000, generator=g) * 3)
    ref = _round_ref(x)
    got = round_to_fp8(x.float()).double()
    # exclude exact midpoints (ties to even) which float64 random data essentially never hits
    assert torch.equal(got, ref)


def test_per_token_quantizer_matches_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 300, generator=g) * torch.rand(64, 1, generator=g) * 50
    q, s = quantize_fp8_rows(x)
    s_ref = x.double().abs().amax(-1, keepdim=True) / 448.0
    assert torch.allclose(s.double(), s_ref, rtol=1e-6)
    ref = _round_ref(x.double() / s.double())
    assert torch.equal(q.double(), ref)
    assert q.float().abs().amax(-1).eq(448).all()  # the row max maps to the top of the range


def test_fake_quant_error_bound_and_zero_rows():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 128, generator=g)
    x[5] = 0.0
    y = fake_quantize_fp8_rows(x)
    assert torch.isfinite(y).all() and y[5].eq(0).all()
    rel = (y - x).norm() / x.norm()
    assert rel < 0.04  # 3 mantissa bits: <= 2^-4 relative per element
