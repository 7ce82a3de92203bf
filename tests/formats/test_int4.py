import pytest
import torch

from fireq.formats.int4 import (dequantize_int4, n_groups, pack_int4, quantize_int4, search_log2_multiplier,
                                unpack_int4)


@pytest.mark.parametrize("k", [1, 2, 7, 64, 577])
def test_pack_unpack_round_trip_exact(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-8, 8, (5, k), generator=g, dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, (k + 1) // 2)
    assert torch.equal(unpack_int4(p, k), q)


def test_nibble_order_documented():
    q = torch.tensor([[1, -2]], dtype=torch.int8)
    assert pack_int4(q).item() == (1 | (0xE << 4))


def _ref_quant(w: torch.Tensor, gs: int, e: int, scale_dtype: str):
    """Straightforward float64 reference: loop over groups."""
    n, k = w.shape
    g = k if gs == -1 else gs
    wh = torch.empty(n, k, dtype=torch.float64)
    for j0 in range(0, k, g):
        blk = w[:, j0:j0 + g].double() * 2.0**e
        s = blk.abs().amax(1, keepdim=True) / 7
        s = s.float().to(torch.float8_e4m3fn if scale_dtype == "fp8" else torch.bfloat16).double()
        q = torch.where(s > 0, torch.round(blk / torch.where(s > 0, s, 1.0)), 0.0).clamp(-8, 7)
        wh[:, j0:j0 + g] = q * s / 2.0**e
    return wh


@pytest.mark.parametrize("gs,k", [(128, 576), (128, 512), (64, 200), (32, 96), (-1, 130)])
@pytest.mark.parametrize("scale_dtype", ["fp8", "bf16"])
def test_quantize_matches_float64_reference(gs, k, scale_dtype):
    g = torch.Generator().manual_seed(k + gs)
    w = torch.randn(48, k, generator=g) * 0.02
    w[3, 5] = 0.5  # an outlier
    qw = quantize_int4(w, gs, scale_dtype)
    assert qw.scales.shape == (48, n_groups(k, gs))
    ref = _ref_quant(w, gs, qw.log2_multiplier, scale_dtype)
    assert torch.equal(qw.dequantize(torch.float64), ref)
    assert torch.equal(dequantize_int4(qw.qweight, qw.scales, qw.log2_multiplier, k, gs).double(), ref)


def test_multiplier_avoids_fp8_underflow():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 1e-3  # group scales ~4e-4 < 2^-9: they underflow at e = 0
    e = search_log2_multiplier(w, 128)
    assert e > 0
    err_e = (quantize_int4(w, 128, "fp8", e).dequantize() - w).norm()
    err_0 = (quantize_int4(w, 128, "fp8", 0).dequantize() - w).norm()
    assert err_e < 0.5 * err_0
    qw = quantize_int4(w, 128, "fp8")
    assert qw.scales.float().max() <= 448


def test_zero_groups():
    w = torch.zeros(4, 256)
    w[0, 0] = 1.0
    qw = quantize_int4(w, 128)
    assert torch.isfinite(qw.dequantize()).all()
    assert qw.dequantize()[1:].eq(0).all()


def test_clip_search_never_worse_than_no_clip():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(32, 256, generator=g) * 0.02
    w[:, 7] *= 8
    cw = torch.rand(256, generator=g) + 0.1
    a = quantize_int4(w, 128)
    b = quantize_int4(w, 128, channel_weight=cw)
    err = lambda q: (((q.dequantize() - w) ** 2) * cw).sum()  # noqa: E731
    assert err(b) <= err(a) + 1e-12
