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


@pytest.mark.skipif(not GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter")
@pytest.mark.parametrize("d", [64, 96])
@pytest.mark.parametrize("plus_one", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_output_equals_separate_quantization(d, plus_one, dtype):
    # the norm's own FP8 copy of its output is what quantize_fp8_rows_triton makes of that output, bit for bit
    from fireq_kernels.gemm_w4a8 import quantize_fp8_rows_triton
    from fireq_kernels.rmsnorm import rmsnorm_triton

    g = torch.Generator().manual_seed(d + plus_one)
    x = (torch.randn(2, 5, d, generator=g) * 3).to(dtype).to(DEV)
    x[0, 1] = 0.0  # an all-zero row: the smallest scale
    w = (torch.randn(d, generator=g) * 0.2 + (0.0 if plus_one else 1.0)).to(dtype).to(DEV)
    out, q, s = rmsnorm_triton(x, w, 1e-6, plus_one, fp8=True)
    assert torch.equal(out, rmsnorm_triton(x, w, 1e-6, plus_one))
    q2, s2 = quantize_fp8_rows_triton(out.reshape(-1, d))
    assert torch.equal(s, s2) and torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


@pytest.mark.skipif(not GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="needs a GPU or the interpreter")
def test_linear_takes_the_norms_fp8_copy():
    # w4a8_linear_triton uses an activation's FP8 copy when it carries one (and only one of its shape)
    from fireq.formats.int4 import quantize_int4
    from fireq_kernels.gemm_w4a8 import FP8_ATTR, quantize_fp8_rows_triton, w4a8_linear_triton

    g = torch.Generator().manual_seed(5)
    n, k = 32, 256
    qw = quantize_int4(torch.randn(n, k, generator=g) * 0.05, 128)
    x = (torch.randn(3, k, generator=g)).to(torch.bfloat16).to(DEV)
    args = (qw.qweight.to(DEV), qw.scales.to(DEV), qw.log2_multiplier, 128)
    plain = w4a8_linear_triton(x, *args)
    other = (torch.randn(3, k, generator=g) * 2).to(torch.bfloat16).to(DEV)
    setattr(x, FP8_ATTR, (*quantize_fp8_rows_triton(other), x._version))  # another copy: the result follows it
    assert torch.equal(w4a8_linear_triton(x, *args), w4a8_linear_triton(other, *args))
    assert not torch.equal(w4a8_linear_triton(x, *args), plain)
    setattr(x, FP8_ATTR, (*quantize_fp8_rows_triton(other[:2]), x._version))  # wrong rows: ignored
    assert torch.equal(w4a8_linear_triton(x, *args), plain)
    setattr(x, FP8_ATTR, (*quantize_fp8_rows_triton(other), x._version))
    x.mul_(1.0)  # written in place since: ignored
    assert torch.equal(w4a8_linear_triton(x, *args), plain)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_mark_fp8_norms_picks_the_linear_inputs(tiny_dirs, arch):
    from transformers import AutoModelForCausalLM

    from fireq.nn.linear import QuantLinear
    from fireq.nn.norm import mark_fp8_norms

    m = AutoModelForCausalLM.from_pretrained(str(tiny_dirs[arch]), dtype=torch.float32).eval()
    swap_rms_norms(m)
    assert mark_fp8_norms(m) == 0  # plain linears: nothing to feed
    for layer in m.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    setattr(parent, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, 32,
                                                      "fp8", True, torch.float32, device="cpu"))
    assert mark_fp8_norms(m) == 2 * m.config.num_hidden_layers
    layer = m.model.layers[0]
    mlp_norm = layer.pre_feedforward_layernorm if arch == "gemma3_text" else layer.post_attention_layernorm
    assert layer.input_layernorm.emit_fp8 and mlp_norm.emit_fp8 and not m.model.norm.emit_fp8
    if arch == "gemma3_text":
        assert not layer.post_attention_layernorm.emit_fp8 and not layer.post_feedforward_layernorm.emit_fp8
