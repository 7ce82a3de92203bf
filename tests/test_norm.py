"""FastRMSNorm: the Triton RMSNorm and its twin against transformers' modules and a float64 reference."""

from __future__ import annotations

import os

import pytest
import torch

from fireq.nn.norm import FastRMSNorm, swap_rms_norms
from fireq_kernels.reference import rmsnorm_ref

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


@pytest.mark.skipif(not GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter")
@pytest.mark.parametrize("d", [64, 100])
@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_float64(d, plus_one, dtype):
    from fireq_kernels.rmsnorm import rmsnorm_triton

    g = torch.Generator().manual_seed(d)
    x = (torch.randn(7, d, generator=g) * 3).to(dtype).to(DEV)
    w = (torch.randn(d, generator=g) * 0.2 + (0.0 if plus_one else 1.0)).to(dtype).to(DEV)
    ref = rmsnorm_ref(x.double(), w.double(), 1e-6, plus_one)
    twin = rmsnorm_ref(x, w, 1e-6, plus_one)
    got = rmsnorm_triton(x, w, 1e-6, plus_one)
    assert got.dtype == twin.dtype and got.shape == x.shape
    err = ((got.double() - ref).norm() / ref.norm()).item()
    err_twin = ((twin.double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * err_twin + 1e-6, (err, err_twin)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_swap_keeps_logits(tiny_dirs, arch):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[arch]), dtype=torch.float32).eval()
    x = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    keys = set(m.state_dict())
    with torch.no_grad():
        before = m(x).logits
        n = swap_rms_norms(m)
        after = m(x).logits
    assert n >= 2 * m.config.num_hidden_layers + 1
    assert isinstance(m.model.norm, FastRMSNorm) and m.model.norm.plus_one == (arch == "gemma3_text")
    assert set(m.state_dict()) == keys and torch.equal(before, after)
