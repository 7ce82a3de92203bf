"""The two-launch row argmax equals torch.argmax (its twin) and the float64 reference: first index of the
largest value, ties, -0.0 / +0.0, NaN, odd lengths, BF16 / FP16 / FP32 rows."""

from __future__ import annotations

import os

import pytest
import torch

from fireq_kernels.reference import argmax_rows_ref

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEV = "cuda" if GPU else "cpu"
pytestmark = pytest.mark.skipif(not GPU and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs an FP8 GPU or TRITON_INTERPRET=1")


@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("b,v", [(1, 1), (3, 777), (2, 5000), (1, 33000)])
def test_argmax_rows_equals_reference(dt, b, v):
    from fireq_kernels.argmax import argmax_rows_triton

    g = torch.Generator().manual_seed(b * v)
    x = (torch.randn(b, v, generator=g) * 4).to(dt)
    x[0, v // 3] = x[0].max()  # a tie with an earlier or later maximum: the first index wins
    x = x.to(DEV)
    got = argmax_rows_triton(x)
    assert got.shape == (b, 1) and got.dtype == torch.int64
    assert torch.equal(got, argmax_rows_ref(x))
    assert torch.equal(got.cpu(), torch.argmax(x.double().cpu(), dim=-1, keepdim=True))


def test_argmax_rows_zeros_nan_and_out():
    from fireq_kernels.argmax import argmax_rows_triton

    x = torch.full((3, 2100), -1.0, dtype=torch.bfloat16)
    x[0, 7], x[0, 5] = 0.0, -0.0  # -0.0 == +0.0: the first of them
    x[1, 1500], x[1, 2000] = float("nan"), 3.0  # NaN is the largest
    x[2, 2099] = 1.0
    x = x.to(DEV)
    out = torch.full((3, 1), -5, dtype=torch.int64, device=DEV)
    assert argmax_rows_triton(x, out) is out
    assert out.flatten().tolist() == argmax_rows_ref(x).flatten().tolist() == [5, 1500, 2099]
    with pytest.raises(ValueError):
        argmax_rows_triton(x[:, ::2])
