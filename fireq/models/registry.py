"""Supported architectures and where their pieces live.

fireq works on decoder-only models whose layers hold `self_attn.{q,k,v,o}_proj` and
`mlp.{gate,up,down}_proj` with a SwiGLU/GeGLU MLP and rotate-half RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import FireqError

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ArchSpec:
    """attn_norm / mlp_norm: the RMSNorms whose outputs feed q/k/v and gate/up;
    norm_plus_one: the norm computes x * (1 + w) (Gemma) instead of x * w."""

    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    norm_plus_one: bool = False


SUPPORTED: dict[str, ArchSpec] = {
    "llama": ArchSpec(),
    "mistral": ArchSpec(),
    "qwen2": ArchSpec(),
    "qwen3": ArchSpec(),
    "gemma3_text": ArchSpec(mlp_norm="pre_feedforward_layernorm", norm_plus_one=True),
}


def arch_of(config) -> ArchSpec:
    """The ArchSpec of a transformers config, or a FireqError naming what is supported."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        raise FireqError(f"unsupported architecture {mt!r}; fireq supports: {', '.join(sorted(SUPPORTED))}")
    return SUPPORTED[mt]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM model."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise FireqError("model has no decoder layers at model.model.layers")
    return layers


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Qualified name inside the layer -> linear module, in execution order."""
    out = {}
    for n in ATTN_LINEARS:
        out[f"self_attn.{n}"] = getattr(layer.self_attn, n)
    for n in MLP_LINEARS:
        out[f"mlp.{n}"] = getattr(layer.mlp, n)
    return out
