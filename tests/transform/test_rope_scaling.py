"""Output-preserving transforms: the float model's logits do not move (float64)."""

from __future__ import annotations

import copy

import torch

from fireq.calibrate.stats import LayerStats
from fireq.recipe import Recipe
from fireq.transform.rope_scaling import fold_pre_rope, post_rope_scales, rope_scales
from tests.conftest import make_tiny


def _rope(x, pos, d, base=10000.0):
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos[:, None].double() * inv[None]
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos(), emb.sin()
    h = d // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def test_pre_rope_scaling_keeps_logits_float64():
    for arch in ("llama", "qwen2"):
        m = make_tiny(arch, 500).double()
        ref = copy.deepcopy(m)
        g = torch.Generator().manual_seed(0)
        for layer in m.model.layers:
            attn = layer.self_attn
            n = torch.rand(m.config.num_key_value_heads, attn.head_dim // 2, generator=g, dtype=torch.float64) * 4 + 0.1
            fold_pre_rope(attn, torch.cat([n, n], -1), m.config.num_attention_heads)
        x = torch.randint(0, 500, (2, 19), generator=g)
        with torch.no_grad():
            a, b = m(x).logits, ref(x).logits
        assert ((a - b).abs().max() / b.abs().max()) < 1e-6


def test_pair_shared_scale_commutes_with_rope():
    g = torch.Generator().manual_seed(1)
    d, L = 16, 9
    q = torch.randn(L, d, generator=g, dtype=torch.float64)
    k = torch.randn(L, d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 4000, (L,), generator=g)
    n = torch.rand(d // 2, generator=g, dtype=torch.float64) * 5 + 0.1
    n = torch.cat([n, n])
    s0 = _rope(q, pos, d) @ _rope(k, pos, d).t()
    s1 = _rope(q / n, pos, d) @ _rope(k * n, pos, d).t()
    assert (s0 - s1).abs().max() < 1e-9 * s0.abs().max() * 1e3


def test_post_rope_scales_leave_attention_unchanged():
    """Without quantization, the attention output with K*S and Q/S equals the plain one."""
    from fireq.formats.kv import KVSpec
    from fireq.nn.attention import AttentionQuant, attach, fireq_attention_forward

    g = torch.Generator().manual_seed(2)
    hq, hkv, d = 6, 2, 16
    absmax = torch.rand(hkv, d, generator=g) * 10
    s = post_rope_scales(absmax, 8.0, 3)
    assert (s != 1).sum(1).ge(3).all()
    assert torch.equal(s != 1, (s != 1).roll(d // 2, 1))  # partners selected together

    class A(torch.nn.Module):
        num_key_value_groups = hq // hkv
        is_causal = True
        training = False

    mod = A()
    attach(mod, AttentionQuant(KVSpec(bits=16), query_fp8=False), s.double())
    q = torch.randn(1, hq, 7, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, hkv, 7, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, hkv, 7, d, generator=g, dtype=torch.float64)
    a, _ = fireq_attention_forward(mod, q, k, v, None, scaling=d**-0.5)
    plain = A()
    b, _ = fireq_attention_forward(plain, q, k, v, None, scaling=d**-0.5)
    assert (a - b).abs().max() < 1e-10


def test_rope_scales_uses_stats():
    m = make_tiny("llama", 300).double()
    layer = m.model.layers[0]
    ref = copy.deepcopy(layer)
    hkv, d = 2, 16
    st = LayerStats(key_pair_norm=torch.rand(hkv, d // 2) + 0.5, rope_key_absmax=torch.rand(hkv, d) + 0.5)
    r = Recipe(pre_rope_scaling=True, post_rope_scaling=True, post_rope_top_k=2)
    out = rope_scales(layer, st, r, m.config)
    assert out["k_post_scale"].shape == (hkv, d)
    ratio = layer.self_attn.k_proj.weight / ref.self_attn.k_proj.weight
    assert not torch.allclose(ratio, torch.ones_like(ratio))


def test_smoothing_keeps_logits_float64():
    """Channel scaling folded into RMSNorm / up_proj (incl. Gemma's 1 + w norm) leaves logits unchanged."""
    from fireq.models.registry import arch_of
    from fireq.transform.smooth import GROUPS, fold_input_scale

    for arch in ("llama", "qwen2", "gemma3_text"):
        m = make_tiny(arch, 400).double()
        ref = copy.deepcopy(m)
        g = torch.Generator().manual_seed(3)
        spec = arch_of(m.config)
        for layer in m.model.layers:
            for group, (names, _) in GROUPS.items():
                k = dict(layer.named_modules())[names[0]].in_features
                fold_input_scale(layer, group, torch.rand(k, generator=g, dtype=torch.float64) * 3 + 0.2, spec)
        x = torch.randint(0, 400, (2, 15), generator=g)
        with torch.no_grad():
            a, b = m(x).logits, ref(x).logits
        assert ((a - b).abs().max() / b.abs().max()) < 1e-6, arch


def test_smoothing_search_picks_per_block_and_tracks_statistics(tiny_dirs, calib_file):
    """smooth_search chooses an exponent (or none) per block by the quantized block-output error; the
    statistics the clipping search reads follow the folded scales; the float layer is unchanged."""
    from fireq.calibrate.layerwise import capture_inputs
    from fireq.calibrate.stats import collect
    from fireq.data import calibration_samples, load_text, tokenize
    from fireq.models.registry import arch_of
    from fireq.models.source import load_float_model, resolve
    from fireq.transform.smooth import SEARCH_ALPHAS, apply_smoothing, block_error, search_smoothing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    samples = calibration_samples(tokenize(tok, load_text(str(calib_file))), 2, 32, 0)
    m = load_float_model(resolve(str(tiny_dirs["llama"]))).double()
    cap = capture_inputs(m, samples.long(), "cpu")
    layer = m.model.layers[0]
    cfg = m.config
    inputs = [x.double() for x in cap.inputs]
    st = collect(layer, inputs, cap.kwargs[0], "cpu", head_dim=cfg.head_dim, n_kv_heads=cfg.num_key_value_heads,
                 keep_rows=64)
    r = Recipe(smooth_search=True)
    chosen = search_smoothing(layer, st, r)
    assert set(chosen) == {"qkv", "gate_up", "down"} and all(a in SEARCH_ALPHAS for a in chosen.values())
    x = st.inputs["mlp.down_proj"].float()
    errs = []
    from fireq.transform.smooth import channel_scales_smooth

    for a in SEARCH_ALPHAS:
        s = None if a is None else channel_scales_smooth(layer, "down", st.act_absmax["mlp.down_proj"], a)
        errs.append(block_error(layer, "down", s, x, r))
    assert SEARCH_ALPHAS[errs.index(min(errs))] == chosen["down"]
    ref = copy.deepcopy(layer)
    sq_before = {k: v.clone() for k, v in st.act_sq.items()}
    apply_smoothing(layer, st, r, arch_of(cfg))
    h = inputs[0]
    kw = cap.kwargs[0]
    with torch.no_grad():
        a, b = layer(h, **kw), ref(h, **kw)
    a, b = (a[0] if isinstance(a, tuple) else a), (b[0] if isinstance(b, tuple) else b)
    assert ((a - b).abs().max() / b.abs().max()) < 1e-6
    if chosen["down"] is not None:
        assert not torch.allclose(st.act_sq["mlp.down_proj"], sq_before["mlp.down_proj"])
