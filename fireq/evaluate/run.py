"""`fireq eval`: resolve the model (quantized or float) and the data, report perplexity."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import load_text, tokenize
from ..errors import FireqError
from ..models.source import load_float_model, load_tokenizer, resolve
from .perplexity import perplexity

SHARED_WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def default_data() -> str:
    return str(SHARED_WIKITEXT) if SHARED_WIKITEXT.is_file() else "wikitext2"


def evaluate_model(model_arg: str | None, data: str | None, seqlen: int, limit: int | None,
                   device: str = "cpu", prefill_fp8: int = 0) -> dict:
    """prefill_fp8 > 0 (fireq checkpoints only): linear calls of at least that many tokens on the FP8 path."""
    if seqlen <= 0:
        raise FireqError(f"seqlen must be > 0, got {seqlen}")
    if prefill_fp8 < 0:
        raise FireqError(f"--prefill-fp8 must be >= 0, got {prefill_fp8}")
    src = resolve(model_arg)
    data = data or default_data()
    text = load_text(data, split="test")
    tok = load_tokenizer(src)
    if src.kind == "fireq":
        from ..checkpoint.load import load

        model = load(src.path, device=device, prefill_fp8=prefill_fp8)
    elif prefill_fp8:
        raise FireqError("--prefill-fp8 applies to fireq checkpoints only")
    else:
        model = load_float_model(src, torch.float32, device)
    ids = tokenize(tok, text)
    res = perplexity(model, ids, seqlen, limit)
    out = {**res, "model": src.display, "data": data}
    if prefill_fp8:
        out["prefill_fp8_min_tokens"] = prefill_fp8
    return out
