"""Layer-by-layer execution: the spine of calibration.

The model's decoder layers are replaced by recorders and the model is run once per sample: each
recorder keeps the keyword arguments its layer receives (attention mask, position embeddings, which
differ between full and sliding-window layers) and returns its input unchanged, so the first one sees
the embeddings. Then layer i alone goes to the device, runs on the inputs (the outputs of the already
quantized layers 0..i-1), and goes back: peak device memory is one layer plus activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.registry import decoder_layers


class _Recorder(nn.Module):
    def __init__(self, store: dict, idx: int):
        super().__init__()
        self.store, self.idx = store, idx

    def forward(self, hidden_states, *args, **kwargs):
        if self.idx == 0:
            self.store.setdefault("inputs", []).append(hidden_states.detach())
        if self.idx not in self.store:
            kw = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
            self.store[self.idx] = kw
        return hidden_states


@dataclass
class Captured:
    """inputs: the first layer's inputs, one (1, L, hidden) tensor a sample; kwargs[i]: layer i's kwargs."""

    inputs: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_inputs(model: nn.Module, samples: torch.Tensor, device: torch.device | str) -> Captured:
    """Run the model's stem (embeddings, rotary, masks) with the layers replaced by recorders.

    samples: (n, L) token ids. Everything but the decoder layers is moved to `device` for this.
    """
    layers = decoder_layers(model)
    originals = list(layers)
    store: dict = {}
    for i in range(len(layers)):
        layers[i] = _Recorder(store, i)
    try:
        model.to(device)
        for row in samples:
            model(input_ids=row[None].to(device), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return Captured([x.to("cpu") for x in store["inputs"]], [_to(store[i], "cpu") for i in range(len(originals))])


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device) -> list[torch.Tensor]:
    """Outputs of one decoder layer for each input (kept on the CPU)."""
    kw = _to(kwargs, device)
    outs = []
    for x in inputs:
        y = layer(x.to(device), **kw)
        if isinstance(y, tuple):
            y = y[0]
        outs.append(y.to("cpu"))
    return outs
