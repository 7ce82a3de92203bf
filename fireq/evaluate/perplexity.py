"""Perplexity over non-overlapping windows.

The text is tokenized without BOS and cut into windows of `seqlen` tokens; each window is scored on
its own (tokens 2..seqlen given their prefix in the window). PPL = exp(mean token NLL) over all scored
tokens. For WikiText-2 the text is the dataset's rows with blank rows emptied, joined by "\\n\\n".
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from ..errors import FireqError
from ..progress import progress


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, limit: int | None = None,
               show_progress: bool | None = None) -> dict:
    """ids: 1-D token ids. Returns {perplexity, nll, tokens, windows, seqlen, seconds}."""
    if seqlen <= 0:
        raise FireqError(f"seqlen must be > 0, got {seqlen}")
    cfg = getattr(model.config, "text_config", None) or model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and seqlen > max_pos:
        raise FireqError(f"seqlen {seqlen} exceeds the model's {max_pos} positions")
    n = ids.numel() // seqlen
    if limit is not None:
        if limit <= 0:
            raise FireqError(f"limit must be > 0, got {limit}")
        n = min(n, limit)
    if n == 0:
        raise FireqError(f"the text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    nll, tokens, t0 = 0.0, 0, time.time()
    for w in progress(range(n), "evaluating", total=n, enabled=show_progress):
        x = ids[w * seqlen:(w + 1) * seqlen][None].to(device)
        logits = model(input_ids=x, use_cache=False).logits[0, :-1].float()
        nll += float(nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        tokens += seqlen - 1
    mean = nll / tokens
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": tokens, "windows": n, "seqlen": seqlen,
            "seconds": time.time() - t0}
