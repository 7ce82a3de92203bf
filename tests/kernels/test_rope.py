"""The one-launch rotary embedding equals transformers' apply_rotary_pos_emb bit for bit (its twin rope_ref is
checked against transformers' own function), and patch_rotary swaps it in only where the formula matches."""

from __future__ import annotations

import os

import pytest
import torch

from fireq_kernels.reference import rope_ref

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEV = "cuda" if GPU else "cpu"
INTERP = os.environ.get("TRITON_INTERPRET") == "1"


def _operands(b, hq, hk, n, d, dt, cos_b, strided, seed=0):
    g = torch.Generator().manual_seed(seed)
    if strided:  # like the fused q/k/v GEMM's output viewed (B, L, H, D) and transposed
        qkv = torch.randn(b, n, (hq + 2 * hk) * d, generator=g).to(dt) * 3
        q = qkv[..., : hq * d].view(b, n, hq, d).transpose(1, 2)
        k = qkv[..., hq * d:(hq + hk) * d].view(b, n, hk, d).transpose(1, 2)
    else:
        q = (torch.randn(b, hq, n, d, generator=g) * 3).to(dt)
        k = (torch.randn(b, hk, n, d, generator=g) * 3).to(dt)
    ang = torch.randn(cos_b, n, d, generator=g) * 10
    return q, k, ang.cos().to(dt), ang.sin().to(dt)


def test_twin_is_transformers_formula():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    for dt in (torch.bfloat16, torch.float16):
        q, k, cos, sin = _operands(2, 4, 2, 7, 32, dt, 2, True)
        got, want = rope_ref(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.skipif(not GPU and not INTERP, reason="needs an FP8 GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hk,n,d,cos_b,strided", [(1, 4, 2, 1, 64, 1, True), (2, 6, 2, 5, 32, 2, True),
                                                      (2, 3, 3, 4, 128, 1, False), (1, 9, 3, 3, 64, 1, False)])
def test_kernel_equals_twin_bit_for_bit(dt, b, hq, hk, n, d, cos_b, strided):
    from fireq_kernels.rope import rope_triton

    q, k, cos, sin = (t.to(DEV) for t in _operands(b, hq, hk, n, d, dt, cos_b, strided, seed=n + d))
    got = rope_triton(q, k, cos, sin)
    want = rope_ref(q, k, cos, sin)
    for a, w in zip(got, want):
        assert a.shape == w.shape and a.is_contiguous()
        assert torch.equal(a, w), (a.float() - w.float()).abs().max().item()


@pytest.mark.skipif(not GPU and not INTERP, reason="needs an FP8 GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hk,n,d,cos_b,strided", [(1, 4, 2, 1, 64, 1, True), (2, 6, 2, 5, 32, 2, True),
                                                      (1, 9, 3, 3, 128, 1, False)])
def test_kernel_fp8_queries_equal_quantizer(dt, b, hq, hk, n, d, cos_b, strided):
    """fp8=True: the same q_embed and k_embed, and the queries' FP8 rows and scales equal to the row quantizer's
    of q_embed, bit for bit (one row of zeros included: its scale is the floor, its codes zero)."""
    from fireq_kernels.gemm_w4a8 import quantize_fp8_rows_triton
    from fireq_kernels.rope import rope_triton

    q, k, cos, sin = (t.to(DEV) for t in _operands(b, hq, hk, n, d, dt, cos_b, strided, seed=7 * n + d))
    q[0, 1, 0] = 0.0
    qo, ko, q8, qs = rope_triton(q, k, cos, sin, fp8=True)
    want = rope_ref(q, k, cos, sin)
    assert torch.equal(qo, want[0]) and torch.equal(ko, want[1])
    w8, ws = quantize_fp8_rows_triton(qo.reshape(-1, d))
    assert q8.shape == w8.shape and qs.shape == ws.shape
    assert torch.equal(q8.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(qs, ws)
    assert (q8.float() != 0).any()


def test_kernel_rejects_bad_input():
    from fireq_kernels.rope import rope_triton

    q, k, cos, sin = _operands(1, 2, 2, 3, 32, torch.bfloat16, 1, False)
    with pytest.raises(ValueError):
        rope_triton(q.float(), k, cos, sin)
    with pytest.raises(ValueError):
        rope_triton(q, k, cos[:, :2], sin[:, :2])


def test_patch_rotary_swaps_and_restores():
    import transformers.models.llama.modeling_llama as ml
    from transformers import LlamaConfig, LlamaForCausalLM

    from fireq.nn.rope import patch_rotary, unpatch_rotary

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
    unpatch_rotary()  # (a checkpoint loaded earlier in this process may have patched it)
    orig = ml.apply_rotary_pos_emb
    try:
        assert patch_rotary(model) == 1
        assert ml.apply_rotary_pos_emb is not orig and ml.apply_rotary_pos_emb.__fireq_original__ is orig
        assert patch_rotary(model) == 1 and ml.apply_rotary_pos_emb.__fireq_original__ is orig  # idempotent
        with torch.no_grad():
            assert torch.equal(model(ids).logits, before)  # the CPU calls the original
    finally:
        unpatch_rotary()
    assert ml.apply_rotary_pos_emb is orig


def test_other_formulas_are_left_alone():
    from fireq.nn.rope import _same_function

    def half_turn(q, k, cos, sin, unsqueeze_dim=1):  # interleaved pairs: another formula
        return q * cos.unsqueeze(1) + q.flip(-1) * sin.unsqueeze(1), k * cos.unsqueeze(1)

    assert not _same_function(half_turn)
    assert not _same_function(lambda q, k, cos, sin, position_ids: (q, k))
