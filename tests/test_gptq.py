"""GPTQ lowers the layer-output error of RTN on correlated inputs, on the same INT4/FP8 grid."""

import torch

from fireq.formats.int4 import quantize_int4
from fireq.quantize.gptq import gptq_quantize
from fireq.recipe import Recipe


def test_gptq_beats_rtn_on_output_error():
    g = torch.Generator().manual_seed(0)
    k, n, t = 256, 64, 2048
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix  # correlated inputs
    x[:, 3] *= 20  # an outlier channel
    w = torch.randn(n, k, generator=g) * 0.05
    h = (x.double().t() @ x.double()) / t
    r = Recipe(method="gptq")
    qg = gptq_quantize(w, h, r)
    qr = quantize_int4(w, 128)
    ref = x.double() @ w.double().t()
    err_g = (x.double() @ qg.dequantize(torch.float64).t() - ref).norm()
    err_r = (x.double() @ qr.dequantize(torch.float64).t() - ref).norm()
    assert err_g < 0.8 * err_r
    # the result lives on the grid: integer codes in [-8, 7], FP8 scales, same packing
    assert qg.scales.dtype == torch.float8_e4m3fn and qg.scales.shape == qr.scales.shape
    assert qg.int_values().abs().max() <= 8
