import pytest
import torch

from fireq.formats.kv import KVSpec, dequantize_kv, fake_quantize_kv, quantize_kv


def _ref(x: torch.Tensor, spec: KVSpec) -> torch.Tensor:
    d = x.shape[-1]
    g = spec.group(d)
    xg = x.double().unflatten(-1, (d // g, g))
    cast = (lambda t: t.float().to(torch.float8_e4m3fn).double()) if spec.scale_dtype == "fp8" else \
        (lambda t: t.float().to(torch.bfloat16).double())
    if spec.symmetric:
        s = cast(xg.abs().amax(-1, keepdim=True) / 7)
        q = torch.round(xg / s).clamp(-8, 7)
        return (q * s).flatten(-2)
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    s = cast((hi - lo) / 15)
    z = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(xg / s) + z).clamp(0, 15)
    return ((q - z) * s).flatten(-2)


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(group_size=32), KVSpec(symmetric=False),
                                  KVSpec(scale_dtype="bf16"), KVSpec(group_size=64, symmetric=False)])
def test_kv_quant_matches_reference(spec):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 17, 128, generator=g) * 2
    y = fake_quantize_kv(x, spec)
    assert torch.allclose(y.double(), _ref(x, spec), rtol=0, atol=1e-6)
    q = quantize_kv(x, spec)
    assert q.packed.shape == (2, 3, 17, 64) and q.packed.dtype == torch.uint8
    # round trip of the stored codes is exact: re-dequantizing gives the same tensor
    assert torch.equal(dequantize_kv(q, 128, spec, torch.float32), y)


def test_symmetric_error_bound():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(4, 2, 33, 64, generator=g)
    y = fake_quantize_kv(x, KVSpec())
    s = x.abs().amax(-1, keepdim=True) / 7
    assert ((y - x).abs() <= 0.5 * s * 1.07 + 1e-6).all()  # half a step; FP8 rounding of s <= 1/16
