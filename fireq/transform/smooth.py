"""Per-input-channel scaling of linear layers, folded into the producer of their input.

For linears sharing an input x (q/k/v; gate/up; down), a scale s_j per input channel gives
W x = (W diag(s)) (diag(1/s) x): the weights absorb s, the producer of x absorbs 1/s, so the float
layer computes the same function:
- q/k/v and gate/up: the RMSNorm in front (weight w -> w / s; Gemma's (1 + w) -> (1 + w) / s, i.e.
  w -> (1 + w) / s - 1);
- down_proj: the output rows of up_proj (SwiGLU/GeGLU act(gate) * up is linear in up);
- o_proj: not folded (its producer is attention; FireQ leaves q/k/v/o off too).

Two ways to choose s:
- FireQ channel-wise (weights only): s_j = c / mean_i |W_ij| over the concatenated weights;
- activation-aware (SmoothQuant): s_j = max|x_j|^a / max_i |W_ij|^(1 - a), normalized to geometric
  mean 1; moves activation outliers into the weights, which per-group INT4 absorbs better than
  per-token FP8 does. With smooth_search the exponent (or no smoothing at all) is chosen per block
  (q/k/v, gate/up, down of each layer) by the quantized block's output error against the float block
  on sampled calibration rows (AWQ-style).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibrate.stats import LayerStats
from ..models.registry import ArchSpec
from ..recipe import Recipe

GROUPS = {
    "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_norm"),
    "gate_up": (("mlp.gate_proj", "mlp.up_proj"), "mlp_norm"),
    "down": (("mlp.down_proj",), "mlp.up_proj"),
}


def _get(layer: nn.Module, dotted: str) -> nn.Module:
    for p in dotted.split("."):
        layer = getattr(layer, p)
    return layer


@torch.no_grad()
def fold_input_scale(layer: nn.Module, group: str, s: torch.Tensor, arch: ArchSpec) -> None:
    """W <- W diag(s) for the group's linears; the producer absorbs 1/s (see the module docstring)."""
    names, producer = GROUPS[group]
    for n in names:
        lin = _get(layer, n)
        lin.weight.mul_(s.to(lin.weight)[None, :])
    if producer == "mlp.up_proj":
        up = layer.mlp.up_proj
        up.weight.div_(s.to(up.weight)[:, None])
        if up.bias is not None:
            up.bias.div_(s.to(up.bias))
        return
    norm = getattr(layer, arch.attn_norm if producer == "attn_norm" else arch.mlp_norm)
    w = norm.weight
    if arch.norm_plus_one:
        w.copy_((1.0 + w) / s.to(w) - 1.0)
    else:
        w.div_(s.to(w))


def _weights(layer: nn.Module, group: str) -> torch.Tensor:
    return torch.cat([_get(layer, n).weight.detach().float() for n in GROUPS[group][0]], dim=0)


def channel_scales_fireq(layer: nn.Module, group: str, c: float) -> torch.Tensor:
    w = _weights(layer, group)
    return (c / w.abs().mean(0).clamp(min=1e-8)).cpu()


def channel_scales_smooth(layer: nn.Module, group: str, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    w = _weights(layer, group).cpu()
    s = act_absmax.float().clamp(min=1e-5) ** alpha / w.abs().amax(0).clamp(min=1e-5) ** (1 - alpha)
    return s / s.log().mean().exp()


SEARCH_ALPHAS = (None, 0.1, 0.25, 0.4, 0.55)  # None: no smoothing


@torch.no_grad()
def block_error(layer: nn.Module, group: str, s: torch.Tensor | None, x: torch.Tensor, recipe: Recipe) -> float:
    """Output error of the group's linears, quantized as the recipe would (RTN INT4 weights; FP8 inputs
    per token), after smoothing by s (None: as they are), against the float linears, on input rows x."""
    from ..calibrate.stats import cap_tokens
    from ..formats.fp8 import fake_quantize_fp8_rows
    from ..formats.int4 import quantize_int4

    xs = x if s is None else x / s[None, :]
    if recipe.act_quant:
        xs = fake_quantize_fp8_rows(xs)
    weight = cap_tokens(x, recipe.calib_token_cap)  # the same massive-token cap as the statistics
    w_tok = (weight.norm(dim=1) / x.norm(dim=1).clamp(min=1e-30)) ** 2
    err = 0.0
    for n in GROUPS[group][0]:
        w = _get(layer, n).weight.detach().float().cpu()
        ws = w if s is None else w * s[None, :]
        wq = quantize_int4(ws, recipe.w_group_size, recipe.w_scale_dtype).dequantize(torch.float32)
        d = xs @ wq.t() - x @ w.t()
        err += float(((d ** 2).sum(1) * w_tok).sum())
    return err


def search_smoothing(layer: nn.Module, stats: LayerStats, recipe: Recipe) -> dict[str, float | None]:
    """Per group, the smoothing exponent (or none) with the lowest block_error on the sampled inputs."""
    chosen = {}
    for group, (names, _) in GROUPS.items():
        x = stats.inputs[names[0]].float()
        best, best_err = None, None
        for a in SEARCH_ALPHAS:
            s = None if a is None else channel_scales_smooth(layer, group, stats.act_absmax[names[0]], a)
            e = block_error(layer, group, s, x, recipe)
            if best_err is None or e < best_err:
                best, best_err = a, e
        chosen[group] = best
    return chosen


def apply_smoothing(layer: nn.Module, stats: LayerStats, recipe: Recipe, arch: ArchSpec) -> None:
    chosen = search_smoothing(layer, stats, recipe) if recipe.smooth_search else {}
    for group, (names, _) in GROUPS.items():
        if recipe.smooth_search:
            if chosen[group] is None:
                continue
            s = channel_scales_smooth(layer, group, stats.act_absmax[names[0]], chosen[group])
        elif recipe.smooth_alpha >= 0:
            s = channel_scales_smooth(layer, group, stats.act_absmax[names[0]], recipe.smooth_alpha)
        elif recipe.channel_scaling and group != "qkv":  # FireQ's released settings: q/k/v off
            c = recipe.channel_scaling_c_gate_up if group == "gate_up" else recipe.channel_scaling_c_down
            s = channel_scales_fireq(layer, group, c)
        else:
            continue
        fold_input_scale(layer, group, s, arch)
        for n in names:  # the group's inputs are now x / s: keep the statistics the clipping search reads true
            if n in stats.act_sq:
                stats.act_sq[n] = stats.act_sq[n] / s.double() ** 2
            if n in stats.act_absmax:
                stats.act_absmax[n] = stats.act_absmax[n] / s.float()
