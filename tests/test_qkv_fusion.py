"""fireq.nn.qkv: q/k/v projections as one GEMM. The fused path is GPU-only; here it runs in the Triton
interpreter (capability checks patched) and is compared with the projections run alone (the CPU twins)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from fireq.formats.int4 import quantize_int4
from fireq.nn.linear import QuantLinear
from fireq.nn.qkv import fuse_qkv

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
RUNS = GPU or os.environ.get("TRITON_INTERPRET") == "1"


class _Attn(nn.Module):
    def __init__(self, hidden=128, nq=128, nkv=64, seed=0, bias=False, scale_dtype="fp8", kv_scale=1.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def lin(n, s):
            qw = quantize_int4(torch.randn(n, hidden, generator=g) * s, 64, scale_dtype)
            b = torch.randn(n, generator=g) * 0.1 if bias else None
            return QuantLinear.from_quantized(qw, b, dtype=torch.float32)

        self.q_proj, self.k_proj, self.v_proj = lin(nq, 0.05), lin(nkv, 0.05 * kv_scale), lin(nkv, 0.3 * kv_scale)

    def forward(self, h):
        return self.q_proj(h), self.k_proj(h), self.v_proj(h)


def _gpu_or_interpreter(monkeypatch, mod):
    import fireq.nn.linear as linear_mod
    import fireq.nn.qkv as qkv_mod
    import fireq_kernels.ops as ops

    if GPU:
        return mod.cuda(), "cuda", 2e-3
    for m in (linear_mod, qkv_mod, ops):
        monkeypatch.setattr(m, "triton_fp8_capable", lambda device: True)
    monkeypatch.setattr(ops, "_tuned_loaded", True)
    return mod, "cpu", 1e-5


@pytest.mark.skipif(not RUNS, reason="needs an FP8 GPU or the interpreter")
@pytest.mark.parametrize("bias,kv_scale,m", [(False, 1.0, 1), (True, 1.0, 5), (False, 40.0, 3)])
def test_fused_qkv_matches_separate(monkeypatch, bias, kv_scale, m):
    """kv_scale 40: k and v get other power-of-two multipliers than q (scales rescaled in the fused GEMM)."""
    attn = _Attn(seed=int(kv_scale) + m, bias=bias, kv_scale=kv_scale)
    h = torch.randn(2, m, 128, generator=torch.Generator().manual_seed(m))
    refs = attn(h)  # each projection alone, on the CPU
    k_cpu = copy.deepcopy(attn.k_proj)
    sd = {k: v.clone() for k, v in attn.state_dict().items()}
    es = {int(x.log2_multiplier.item()) for x in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(es) > 1  # (v's weights are larger than q's and k's)
    assert fuse_qkv(attn) == 1 and fuse_qkv(attn) == 0  # idempotent
    attn, dev, tol = _gpu_or_interpreter(monkeypatch, attn)
    import fireq_kernels

    calls = []
    real = fireq_kernels.w4a8_linear
    monkeypatch.setattr(fireq_kernels, "w4a8_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = attn(h.to(dev))
    assert len(calls) == 1  # one GEMM for the three
    for got, ref in zip(outs, refs):
        assert got.shape == ref.shape
        assert ((got.cpu() - ref).norm() / ref.norm()) < tol
        got.view(2, m, -1, 32)  # HF reshapes each projection's output into heads
    f = attn.q_proj._qkv
    assert f._stash is None  # consumed: nothing kept
    assert attn.k_proj.qweight.data_ptr() == f._fused[0][128:].data_ptr()  # views of one copy
    # another input for k alone: runs alone, same numbers
    h2 = torch.randn(2, m, 128)
    k_alone, k_ref = attn.k_proj(h2.to(dev)).cpu(), k_cpu(h2)
    assert ((k_alone - k_ref).norm() / k_ref.norm()) < tol
    after = attn.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k].cpu(), sd[k]) for k in sd)


def test_fusion_inactive_on_cpu_and_for_mismatched_layers():
    attn = _Attn(seed=3)
    h = torch.randn(1, 4, 128)
    before = attn(h)
    assert fuse_qkv(attn) == 1
    after = attn(h)  # CPU: each projection alone, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    odd = _Attn(seed=4)
    odd.v_proj = QuantLinear.from_quantized(quantize_int4(torch.randn(64, 128) * 0.05, 128), None,
                                            dtype=torch.float32)  # another group size
    assert fuse_qkv(odd) == 0
