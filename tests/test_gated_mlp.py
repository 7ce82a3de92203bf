"""QuantGatedMLP: gate and up as one GEMM with the activation in its epilogue. On the CPU the module computes
the unfused expression (identical to the model's MLP); the fused GPU path is run here by the Triton
interpreter (capability checks patched) and compared with the unfused twin."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fireq.formats.int4 import quantize_int4
from fireq.nn.linear import QuantLinear, set_prefill_fp8
from fireq.nn.mlp import QuantGatedMLP, fuse_gated_mlps, gated_epilogue


class _MLP(nn.Module):  # the shape of transformers' LlamaMLP / Gemma3MLP
    def __init__(self, hidden, inter, act, seed, group=64, bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def lin(n, k):
            b = torch.randn(n, generator=g) * 0.1 if bias else None
            return QuantLinear.from_quantized(quantize_int4(torch.randn(n, k, generator=g) * 0.05, group), b,
                                              dtype=torch.float32)

        self.gate_proj, self.up_proj, self.down_proj = lin(inter, hidden), lin(inter, hidden), lin(hidden, inter)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp


def _acts():
    from transformers.activations import ACT2FN

    return [("silu", ACT2FN["silu"], "silu_mul"), ("gelu_pytorch_tanh", ACT2FN["gelu_pytorch_tanh"], "gelu_tanh_mul")]


@pytest.mark.parametrize("i", [0, 1])
def test_swap_keeps_outputs_and_state_dict(i):
    _, act, epi = _acts()[i]
    layer = _Layer(_MLP(128, 96, act, seed=i))
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(7))
    before = layer.mlp(x)
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    assert fuse_gated_mlps(layer) == 1 and isinstance(layer.mlp, QuantGatedMLP) and layer.mlp.epilogue == epi
    assert fuse_gated_mlps(layer) == 0  # idempotent
    assert torch.equal(layer.mlp(x), before)  # CPU: the unfused expression
    after = layer.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], sd[k]) for k in sd)


def test_unknown_activation_not_fused():
    layer = _Layer(_MLP(64, 32, nn.ReLU(), seed=3))
    assert gated_epilogue(nn.ReLU()) is None and fuse_gated_mlps(layer) == 0


GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not GPU and os.environ.get("TRITON_INTERPRET") != "1", reason="needs an FP8 GPU or the interpreter")
@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("m,bias,fp8", [(1, False, 0), (6, False, 0), (6, True, 0), (32, True, 16)])
def test_fused_path_matches_unfused(monkeypatch, i, m, bias, fp8):
    """fp8 > 0: the prefill FP8 path from that many tokens (set_prefill_fp8), fused and unfused alike."""
    import fireq.nn.linear as linear_mod
    import fireq.nn.mlp as mlp_mod
    import fireq_kernels.ops as ops

    _, act, _ = _acts()[i]
    layer = _Layer(_MLP(128, 96, act, seed=10 + i, bias=bias))
    assert not bias or layer.mlp.gate_proj.log2_multiplier.item() != 0  # the fused bias must follow 2^-e
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
    set_prefill_fp8(layer, fp8)
    h_ref = act(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x)  # the twins, unfused, on the CPU
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    fuse_gated_mlps(layer)
    if GPU:  # natively: FP8 MMAs accumulate in ~14 bits
        layer, x, tol = layer.cuda(), x.cuda(), 2e-3
    else:  # the Triton path on the CPU, in the interpreter (exact FP32 dots)
        for mod in (linear_mod, mlp_mod, ops):
            monkeypatch.setattr(mod, "triton_fp8_capable", lambda device: True)
        monkeypatch.setattr(ops, "_tuned_loaded", True)
        tol = 1e-5 if not fp8 else 4e-3  # FP8 path: gate and up are each rounded to bf16 (cuBLAS's output)
    mlp = layer.mlp
    g, u = mlp.gate_proj, mlp.up_proj
    seen = {}
    mlp.down_proj.register_forward_pre_hook(lambda mod, args: seen.update(h=args[0]))
    y = mlp(x)
    h = seen["h"].cpu()
    assert ((h - h_ref).norm() / h_ref.norm()) < tol  # one FP32 GEMM with the activation in its epilogue
    assert y.shape == (m, 128) and torch.isfinite(y).all()
    q, s, _, lb = mlp._fused
    assert lb == 64 and q.shape == (192, 64)
    assert g.qweight.data_ptr() == q.data_ptr() and u.qweight.data_ptr() == q[1:].data_ptr()  # one copy
    after = layer.state_dict()  # still the checkpoint layout, contiguous
    assert all(torch.equal(after[k].cpu(), sd[k]) and after[k].is_contiguous() for k in sd)
