"""The attention glue's kernel path (_kernel_forward: K/V and query quantization, kernel call, output layout),
in the Triton interpreter on the CPU or natively on an FP8 GPU, against the reference path of
fireq_attention_forward."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fireq.formats.kv import KVSpec
from fireq.nn import attention

GPU = (os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
       and torch.cuda.get_device_capability() >= (8, 9))
DEV = "cuda" if GPU else "cpu"
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not GPU,
                                reason="runs the Triton path in the interpreter or on an FP8 GPU")


@pytest.mark.parametrize("lq,lk", [(7, 7), (1, 13)])
def test_kernel_path_matches_reference(lq, lk):
    mod = nn.Module()
    mod.is_causal = True
    mod.num_key_value_groups = 2  # (transformers' SDPA path repeats K/V by it)
    attention.attach(mod, attention.AttentionQuant(KVSpec(symmetric=False), True))
    g = torch.Generator().manual_seed(lq + lk)
    q = torch.randn(2, 4, lq, 32, generator=g).to(DEV)
    k = torch.randn(2, 2, lk, 32, generator=g).to(DEV)
    v = torch.randn(2, 2, lk, 32, generator=g).to(DEV)
    mask = None
    if lq != lk:  # decode against a longer context: the reference needs the causal offset as a mask
        mask = torch.ones(lq, lk, dtype=torch.bool, device=DEV).tril(lk - lq)[None, None]
    ref, _ = attention.fireq_attention_forward(mod, q, k, v, mask, scaling=32 ** -0.5)
    got, _ = attention._kernel_forward(mod, q, k, v, 32 ** -0.5, mod.fireq_attn, {})
    assert got.shape == ref.shape == (2, lq, 4, 32) and got.is_contiguous()
    assert ((got - ref).norm() / ref.norm()) < 2.0**-10  # P goes through fp16 in the kernel


def test_kernel_path_over_static_cache():
    """The static INT4 cache's whole buffers with device-side lengths give the growing cache's result."""
    mod = nn.Module()
    mod.is_causal = True
    mod.num_key_value_groups = 2
    attention.attach(mod, attention.AttentionQuant(KVSpec(symmetric=False), True))
    g = torch.Generator().manual_seed(3)
    k = torch.randn(2, 2, 11, 32, generator=g).to(DEV)
    v = torch.randn(2, 2, 11, 32, generator=g).to(DEV)
    q = torch.randn(2, 4, 1, 32, generator=g).to(DEV)
    outs = []
    for max_len in (None, 24):
        layer = attention._make_layer_class()(mod, max_len)
        layer.update(k[:, :, :10], v[:, :, :10])
        kp, vp = layer.update(k[:, :, 10:], v[:, :, 10:])
        outs.append(attention._kernel_forward(mod, q, kp, vp, 32 ** -0.5, mod.fireq_attn, {})[0])
        if max_len:  # reset: the device-side lengths (int64 and the kernel's int32 ones) start again from 0
            layer.reset()
            layer.update(k[:, :, :7], v[:, :, :7])
            layer.update(k[:, :, 7:10], v[:, :, 7:10])
            kp, vp = layer.update(k[:, :, 10:], v[:, :, 10:])
            assert kp._fireq_lens[1].tolist() == [11, 11] and kp._fireq_lens[2].tolist() == [1, 1]
            outs.append(attention._kernel_forward(mod, q, kp, vp, 32 ** -0.5, mod.fireq_attn, {})[0])
    assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(outs[0], outs[2], rtol=1e-5, atol=1e-6)


def test_static_layers_share_their_lengths():
    """Layers of one static cache (wired as make_cache does) keep one set of device-side lengths, moved on once a
    step, and each layer's buffers and attention equal those of a layer on its own."""
    mod = nn.Module()
    mod.is_causal = True
    mod.num_key_value_groups = 2
    attention.attach(mod, attention.AttentionQuant(KVSpec(symmetric=True), True))
    g = torch.Generator().manual_seed(5)
    kv = [(torch.randn(2, 2, 9, 32, generator=g).to(DEV), torch.randn(2, 2, 9, 32, generator=g).to(DEV))
          for _ in range(3)]
    q = torch.randn(2, 4, 1, 32, generator=g).to(DEV)
    cls = attention._make_layer_class()
    shared = [cls(mod, 16) for _ in range(3)]
    for i, layer in enumerate(shared):
        layer._lens_state = shared[0]._lens_state
        layer._first, layer._last = i == 0, i == 2
    alone = [cls(mod, 16) for _ in range(3)]
    for lo, hi in ((0, 6), (6, 7), (7, 8), (8, 9)):  # a prompt, then three decode steps
        for i in range(3):
            k, v = kv[i]
            kp, vp = shared[i].update(k[:, :, lo:hi], v[:, :, lo:hi])
            kp0, vp0 = alone[i].update(k[:, :, lo:hi], v[:, :, lo:hi])
            assert kp._fireq_lens[1].tolist() == kp0._fireq_lens[1].tolist() == [hi, hi]
            if hi - lo == 1:
                got = attention._kernel_forward(mod, q, kp, vp, 32 ** -0.5, mod.fireq_attn, {})[0]
                want = attention._kernel_forward(mod, q, kp0, vp0, 32 ** -0.5, mod.fireq_attn, {})[0]
                assert torch.equal(got, want)
    assert shared[0]._lens_state is shared[2]._lens_state and int(shared[1]._len_dev) == 9
    for a, b in zip(shared, alone):  # the written tokens (the rest of the buffers is uninitialized)
        assert all(torch.equal(x.packed[:, :, :9], y.packed[:, :, :9])
                   and torch.equal(x.scales[:, :, :9].float(), y.scales[:, :, :9].float()) for x, y in zip(a._buf, b._buf))


def test_post_scales_kept_and_refreshed():
    """The keys' and queries' post-RoPE multipliers are made once per dtype and group, and made again when the
    buffer is written in place or replaced: results equal the uncached arithmetic every time."""
    mod = nn.Module()
    attention.attach(mod, attention.AttentionQuant(KVSpec(), True), torch.rand(2, 8) + 0.5)
    k = torch.randn(1, 2, 3, 8, dtype=torch.bfloat16)
    q = torch.randn(1, 4, 3, 8, dtype=torch.bfloat16)

    def plain():
        s = mod.k_post_scale
        return k * s.to(k.dtype)[None, :, None, :], q / s.repeat_interleave(2, 0).to(q.dtype)[None, :, None, :]

    for change in (None, "inplace", "replace"):
        if change == "inplace":
            with torch.no_grad():
                mod.k_post_scale.mul_(1.5)
        elif change == "replace":
            mod.k_post_scale = torch.rand(2, 8) + 2.0
        want_k, want_q = plain()
        assert torch.equal(attention._scale_keys(mod, k), want_k)
        assert torch.equal(attention._unscale_queries(mod, q), want_q)
        assert attention._post_scale(mod, mod.k_post_scale, k.dtype, 1) is attention._post_scale(
            mod, mod.k_post_scale, k.dtype, 1)  # kept between calls


def test_rope_fp8_queries_taken_while_current():
    """Queries carrying the rotary kernel's FP8 copy (fireq.nn.rope) skip their own quantization with the same
    result; a copy is used only while the tensor is unwritten since."""
    from fireq_kernels.gemm_w4a8 import FP8_ATTR
    from fireq_kernels.rope import rope_triton

    mod = nn.Module()
    mod.is_causal = True
    mod.num_key_value_groups = 2
    attention.attach(mod, attention.AttentionQuant(KVSpec(symmetric=False), True))
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 5, 32, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(2, 2, 5, 32, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(2, 2, 5, 32, generator=g).to(DEV, torch.bfloat16)
    ang = torch.randn(1, 5, 32, generator=g) * 10
    qo, ko, q8, qs = rope_triton(q, k, ang.cos().to(DEV, torch.bfloat16), ang.sin().to(DEV, torch.bfloat16), fp8=True)
    plain, _ = attention._kernel_forward(mod, qo.clone(), ko, v, 32 ** -0.5, mod.fireq_attn, {})
    setattr(qo, FP8_ATTR, (q8, qs, qo._version))
    got, _ = attention._kernel_forward(mod, qo, ko, v, 32 ** -0.5, mod.fireq_attn, {})
    assert torch.equal(got, plain)
    setattr(qo, FP8_ATTR, (torch.zeros_like(q8), qs, qo._version))  # taken: zero queries change the result
    poisoned, _ = attention._kernel_forward(mod, qo, ko, v, 32 ** -0.5, mod.fireq_attn, {})
    assert not torch.equal(poisoned, plain)
    qo.mul_(1)  # written since (same values): the stale copy is ignored
    again, _ = attention._kernel_forward(mod, qo, ko, v, 32 ** -0.5, mod.fireq_attn, {})
    assert torch.equal(again, plain)
