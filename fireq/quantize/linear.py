"""Turn the float linears of one decoder layer into QuantLinears."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FireqError
from ..formats.int4 import QuantizedWeight, quantize_int4
from ..models.registry import layer_linears
from ..nn.linear import FakeQuantLinear, QuantLinear
from ..recipe import Recipe


def _set(parent: nn.Module, dotted: str, module: nn.Module) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, leaf, module)


def quantize_weight(weight: torch.Tensor, recipe: Recipe, hessian: torch.Tensor | None = None,
                    act_sq: torch.Tensor | None = None) -> QuantizedWeight:
    """INT4 weight by the recipe's rounding method. weight: (N, K) float; hessian: (K, K) or None;
    act_sq: (K,) input second moments for the clipping search (recipe.w_clip_search)."""
    if recipe.method == "gptq" and hessian is not None:
        from .gptq import gptq_quantize

        return gptq_quantize(weight, hessian, recipe)
    cw = act_sq if recipe.w_clip_search else None
    return quantize_int4(weight.detach().float(), recipe.w_group_size, recipe.w_scale_dtype, channel_weight=cw)


SEQUENTIAL_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


def quantize_layer_linears(layer: nn.Module, recipe: Recipe, dtype: torch.dtype,
                           hessians: dict[str, torch.Tensor] | None = None, fake: bool = False,
                           only: tuple[str, ...] | None = None, act_sq: dict | None = None) -> None:
    """Replace every nn.Linear of the layer (q/k/v/o, gate/up/down) in place.

    fake=True puts FakeQuantLinear (dequantized float weights) instead: the quantize-dequantize twin.
    """
    for name, lin in layer_linears(layer).items():
        if not isinstance(lin, nn.Linear) or (only is not None and name not in only):
            continue
        bias = None if lin.bias is None else lin.bias.detach()
        if recipe.w_bits >= 16:
            if not fake:
                raise FireqError("w_bits 16 (float weights) is for in-memory ablations only (fake=True)")
            _set(layer, name, FakeQuantLinear(lin.weight.detach(), bias, recipe.act_quant))
            continue
        qw = quantize_weight(lin.weight, recipe, (hessians or {}).get(name), (act_sq or {}).get(name))
        if fake:
            new = FakeQuantLinear(qw.dequantize(lin.weight.dtype), bias, recipe.act_quant)
        else:
            new = QuantLinear.from_quantized(qw, None if bias is None else bias.to(dtype), recipe.act_quant, dtype)
        _set(layer, name, new.to(lin.weight.device))
