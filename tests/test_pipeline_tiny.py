"""The whole pipeline on tiny random models of each supported architecture."""

from __future__ import annotations

import hashlib

import pytest
import torch

import fireq
from fireq import recipe as recipes
from fireq.nn.attention import make_cache
from fireq.nn.linear import QuantLinear
from fireq.pipeline import quantize_model, run

ARCHS = ["llama", "qwen2", "gemma3_text"]


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


@pytest.fixture(scope="module")
def checkpoints(tiny_dirs, calib_file, tmp_path_factory):
    out = {}
    for arch in ARCHS:
        for name in ("rtn", "default"):
            r = recipes.load(name).replace(calib_data=str(calib_file), nsamples=4, seqlen=32)
            d = tmp_path_factory.mktemp(f"q-{arch}-{name}") / "ckpt"
            run(str(tiny_dirs[arch]), str(d), r)
            out[arch, name] = d
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["rtn", "default"])
def test_load_twice_bitwise_and_hf_path(checkpoints, arch, name):
    from transformers import AutoModelForCausalLM

    d = checkpoints[arch, name]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 1000, (2, 20), generator=g)
    a = fireq.load(d)(x).logits
    b = fireq.load(d)(x).logits
    assert torch.isfinite(a).all() and torch.equal(a, b)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
    assert torch.equal(m(x).logits, a)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_fake_quant(tiny_dirs, arch, calib_file):
    """The packed modules compute the quantize-dequantize model."""
    from fireq.models.source import load_float_model, resolve

    r = recipes.load("default").replace(calib_data=str(calib_file), nsamples=4, seqlen=32)
    from fireq.data import calibration_samples, load_text, tokenize
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[arch])
    samples = calibration_samples(tokenize(tok, load_text(str(calib_file))), 4, 32, 0)
    src = resolve(str(tiny_dirs[arch]))
    packed, fake = load_float_model(src), load_float_model(src)
    quantize_model(packed, r, samples)
    quantize_model(fake, r, samples, fake=True)
    x = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp, lf = packed(x).logits, fake(x).logits
    assert torch.allclose(lp, lf, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_byte_identical(tiny_dirs, calib_file, tmp_path, arch):
    r = recipes.load("default").replace(calib_data=str(calib_file), nsamples=2, seqlen=16)
    run(str(tiny_dirs[arch]), str(tmp_path / "a"), r)
    run(str(tiny_dirs[arch]), str(tmp_path / "b"), r)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_uses_int4_cache(checkpoints, arch):
    m = fireq.load(checkpoints[arch, "default"])
    x = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(2))
    out = m.generate(x, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 11)
    cache = make_cache(m)
    with torch.no_grad():
        m(x, past_key_values=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.qk.packed.dtype == torch.uint8 and layer.get_seq_length() == 6
    assert cache.get_seq_length() == 6


def test_cache_matches_no_cache_prefill(checkpoints):
    """Prefill through the INT4 cache computes what the cache-less forward computes."""
    m = fireq.load(checkpoints["llama", "rtn"])
    x = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = m(x, use_cache=False).logits
        b = m(x, past_key_values=make_cache(m), use_cache=True).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_checkpoint_contents(checkpoints):
    import json

    d = checkpoints["qwen2", "default"]
    cfg = json.loads((d / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fireq" and qc["format_version"] == 1
    assert qc["recipe"]["name"] == "default"
    assert "q_proj" in " ".join(qc["modules"])
    assert (d / "README.md").read_text().count("pre_rope_scaling")
    assert (d / "tokenizer.json").is_file() or (d / "tokenizer.model").is_file()
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert "model.layers.0.self_attn.q_proj.bias" in keys  # qwen2 biases survive
        assert f.get_tensor("model.layers.0.mlp.down_proj.qweight").dtype == torch.uint8
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_incremental_decode_matches_full_forward(checkpoints, arch):
    """Token-by-token decoding through the INT4 cache (buffers grown in place past their first
    capacity) gives the logits of one cache-less forward over the whole sequence: K/V and queries are
    quantized per token, so the codes are the same either way."""
    m = fireq.load(checkpoints[arch, "default"])
    x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(4))
    cache = make_cache(m)
    with torch.no_grad():
        full = m(x, use_cache=False).logits
        steps = [m(x[:, :5], past_key_values=cache, use_cache=True).logits]
        for t in range(5, 24):
            steps.append(m(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    inc = torch.cat(steps, dim=1)
    assert cache.layers[0]._buf[0].packed.shape[2] >= 24 and cache.get_seq_length() == 24
    torch.testing.assert_close(inc, full, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_static_cache_matches_growing_cache(checkpoints, arch):
    """The static INT4 cache (buffers of max_len tokens, device-side write position: what CUDA-graph decoding
    uses) computes what the growing cache computes, step by step; reset() rewinds it in place."""
    m = fireq.load(checkpoints[arch, "default"])
    x = torch.randint(0, 1000, (2, 14), generator=torch.Generator().manual_seed(5))
    outs = []
    for cache in (make_cache(m), make_cache(m, max_len=20)):
        with torch.no_grad():
            steps = [m(x[:, :6], past_key_values=cache, use_cache=True).logits]
            for t in range(6, 14):
                steps.append(m(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)
    layer = cache.layers[0]
    assert layer._buf[0].packed.shape[2] == 20 and int(layer._len_dev) == 14 == cache.get_seq_length()
    ptr = layer._buf[0].packed.data_ptr()
    cache.reset()
    with torch.no_grad():
        again = m(x[:, :6], past_key_values=cache, use_cache=True).logits
    assert layer._buf[0].packed.data_ptr() == ptr and int(layer._len_dev) == 6
    torch.testing.assert_close(again, outs[0][:, :6], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="static INT4 cache holds 20"):
        with torch.no_grad():
            m(torch.zeros(2, 15, dtype=torch.long), past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_prompt_then_declared_length(checkpoints, arch):
    """What GraphDecoder's graphed prefill relies on: a prompt padded at its end (the logits of its last real
    token picked by a tensor logits_to_keep), then set_static_length(cache, n), decodes as the unpadded prompt."""
    from fireq.nn.attention import set_static_length, static_layers

    m = fireq.load(checkpoints[arch, "default"])
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 1000, (2, 12), generator=g)
    outs = []
    for pad in (0, 5):
        cache = make_cache(m, max_len=24)
        assert static_layers(cache) is not None
        ids = torch.cat([x[:, :6], torch.zeros((2, pad), dtype=torch.long)], dim=1)
        with torch.no_grad():
            steps = [m(ids, past_key_values=cache, use_cache=True, logits_to_keep=torch.tensor([5])).logits]
            assert cache.get_seq_length() == 6 + pad
            set_static_length(cache, 6)
            assert cache.get_seq_length() == 6 and int(cache.layers[-1]._len_dev) == 6
            for t in range(6, 12):
                steps.append(m(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        outs.append(torch.cat(steps, dim=1))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert static_layers(make_cache(m)) is None
    with pytest.raises(TypeError, match="static cache"):
        set_static_length(make_cache(m), 3)
    with pytest.raises(ValueError, match="outside"):
        set_static_length(make_cache(m, max_len=24), 25)


def test_graph_decoder_needs_cuda(checkpoints):
    from fireq.errors import FireqError
    from fireq.nn.graphs import GraphDecoder

    m = fireq.load(checkpoints["llama", "rtn"])
    with pytest.raises(FireqError, match="CUDA"):
        GraphDecoder(m, 1, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_prefill_fp8_and_qkv_fusion_set_up(checkpoints, arch):
    """fireq.load(prefill_fp8=N): calls of >= N tokens on the FP8 path (its twin on the CPU), shorter ones on the
    INT4 GEMM; every attention's q/k/v share one QKVFusion (active on FP8 GPUs only)."""
    d = checkpoints[arch, "default"]
    base, fp8 = fireq.load(d), fireq.load(d, prefill_fp8=16)
    lins = [m for m in fp8.modules() if isinstance(m, QuantLinear)]
    assert lins and all(m.prefill_fp8 == 16 for m in lins)
    attn = fp8.model.layers[0].self_attn
    assert attn.q_proj._qkv is not None and attn.q_proj._qkv is attn.v_proj._qkv
    g = torch.Generator().manual_seed(1)
    short, long = torch.randint(0, 1000, (1, 8), generator=g), torch.randint(0, 1000, (1, 20), generator=g)
    with torch.no_grad():
        assert torch.equal(fp8(short).logits, base(short).logits)
        a, b = fp8(long).logits, base(long).logits
    assert not torch.equal(a, b) and ((a - b).norm() / b.norm()) < 0.3  # random tiny models amplify it
