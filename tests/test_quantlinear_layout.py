"""QuantLinear's in-place repack to the GEMM kernel's layout is invisible from outside: state_dict(),
quantized_weight() and the reference forward still see the checkpoint layout."""

from __future__ import annotations

import torch

from fireq.formats.int4 import quantize_int4
from fireq.nn.linear import QuantLinear


def test_kernel_layout_round_trip():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 300, generator=g) * 0.05
    qw = quantize_int4(w, 128)
    lin = QuantLinear.from_quantized(qw, torch.randn(48, generator=g), dtype=torch.float32)
    x = torch.randn(5, 300, generator=g)
    before = lin(x)
    sd_before = {k: v.clone() for k, v in lin.state_dict().items()}
    lin._to_kernel_layout()  # what the first forward on an FP8 GPU does
    assert lin._layout_block == 128 and lin.qweight.shape == (48, 3 * 64)
    sd = lin.state_dict()
    assert sd.keys() == sd_before.keys() and all(torch.equal(sd[k], sd_before[k]) for k in sd)
    assert torch.equal(lin.quantized_weight().qweight, qw.qweight)
    assert torch.equal(lin(x), before)  # on the CPU: back to the checkpoint layout for the reference path
    assert lin._layout_block == 0
    lin._to_kernel_layout()
    fresh = QuantLinear(300, 48, True, 128, dtype=torch.float32)
    fresh._to_kernel_layout()
    fresh.load_state_dict(sd_before)  # loading checkpoint-layout tensors into a repacked module
    assert torch.equal(fresh(x), before)
