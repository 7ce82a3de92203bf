"""Statistics of one decoder layer on calibration inputs, gathered with forward hooks.

- `act_absmax[name]`: (K,) max |x_k| over tokens of each linear's input (smoothing).
- `act_sq[name]`: (K,) sum of x_k^2 over tokens (clipping search), massive tokens capped (cap_tokens).
- `key_absmax`: (H_kv, D) max |k| before RoPE (after k_norm where the model has one).
- `key_pair_norm`: (H_kv, D/2) max_t sqrt(k_j^2 + k_{j+D/2}^2) before RoPE (pre-RoPE scaling).
- `rope_key_absmax`: (H_kv, D) max |k| after RoPE (post-RoPE scaling).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.registry import layer_linears


@dataclass
class LayerStats:
    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    act_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # sampled input rows (smoothing search)
    key_absmax: torch.Tensor | None = None
    key_pair_norm: torch.Tensor | None = None
    rope_key_absmax: torch.Tensor | None = None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def cap_tokens(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Tokens (rows of x) whose norm exceeds cap x the median token norm, scaled down to that norm.

    Second-moment statistics (GPTQ's Hessian, the clipping search's E[x^2]) are otherwise owned by a
    handful of "massive activation" tokens: in SmolLM2's layer 11 down_proj the first token of each
    sequence is 572x the median norm and holds 99.8% of the Hessian's trace, so GPTQ would fit those
    tokens alone. cap <= 0: unchanged."""
    if cap <= 0 or x.shape[0] == 0:
        return x
    n = x.norm(dim=1, keepdim=True)
    lim = cap * n.median()
    return torch.where(n > lim, x * (lim / n.clamp(min=1e-30)), x)


def _amax(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    return new if old is None else torch.maximum(old, new)


@torch.no_grad()
def collect_hessians(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device, names: list[str],
                     fp8_inputs: bool, token_cap: float = 0.0) -> dict[str, torch.Tensor]:
    """H = X X^T / n for the linears `names` of the layer in its current state (earlier linears may
    already be quantized). fp8_inputs: X is the per-token FP8 quantization of the input, which is what
    the quantized linear will multiply at run time."""
    from ..formats.fp8 import fake_quantize_fp8_rows
    from .layerwise import _to

    lins = layer_linears(layer)
    hs: dict[str, torch.Tensor] = {}
    count = [0]
    hooks = []

    def hook(name):
        def f(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if fp8_inputs:
                x = fake_quantize_fp8_rows(x)
            x = cap_tokens(x, token_cap)
            h = (x.double().t() @ x.double()).cpu()
            hs[name] = h if name not in hs else hs[name] + h
        return f

    for n in names:
        hooks.append(lins[n].register_forward_pre_hook(hook(n)))
    kw = _to(kwargs, device)
    try:
        for x in inputs:
            layer(x.to(device), **kw)
            count[0] += x.shape[0] * x.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return {k: v / count[0] for k, v in hs.items()}


@torch.no_grad()
def collect(layer: nn.Module, inputs: list[torch.Tensor], kwargs: dict, device, *,
            head_dim: int, n_kv_heads: int, token_cap: float = 0.0, keep_rows: int = 0) -> LayerStats:
    """Run the float layer on `inputs` and collect LayerStats. keep_rows > 0: also keep that many
    evenly spaced input rows of every linear (LayerStats.inputs)."""
    from .layerwise import _to

    st = LayerStats()
    hooks = []

    def lin_hook(name):
        def f(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st.act_absmax[name] = _amax(st.act_absmax.get(name), x.abs().amax(0).cpu())
            sq = (cap_tokens(x, token_cap).double() ** 2).sum(0).cpu()
            st.act_sq[name] = sq if name not in st.act_sq else st.act_sq[name] + sq
            if keep_rows:
                per = max(1, keep_rows // len(inputs))
                idx = torch.linspace(0, x.shape[0] - 1, min(per, x.shape[0])).long()
                rows = x[idx].cpu()
                st.inputs[name] = rows if name not in st.inputs else torch.cat([st.inputs[name], rows])
        return f

    for name, lin in layer_linears(layer).items():
        hooks.append(lin.register_forward_pre_hook(lin_hook(name)))

    kw = _to(kwargs, device)
    cos, sin = kw["position_embeddings"]
    attn = layer.self_attn
    key_src = getattr(attn, "k_norm", None) or attn.k_proj

    def key_hook(mod, args, out):
        k = out.detach().float()
        L = cur_len[0]
        if k.dim() == 4 and k.shape[2] == L and k.shape[1] == n_kv_heads:
            pass  # k_norm applied after the transpose (Gemma 3): already (B, H, L, D)
        else:  # k_proj output (B, L, H*D) or k_norm before the transpose (B, L, H, D)
            k = k.reshape(k.shape[0], L, n_kv_heads, head_dim).transpose(1, 2)  # (B, H, L, D)
        st.key_absmax = _amax(st.key_absmax, k.abs().amax(dim=(0, 2)).cpu())
        h = head_dim // 2
        pair = (k[..., :h] ** 2 + k[..., h:] ** 2).sqrt().amax(dim=(0, 2)).cpu()
        st.key_pair_norm = _amax(st.key_pair_norm, pair)
        c, s = cos.float()[:, None], sin.float()[:, None]  # (B, 1, L, D)
        kr = k * c + _rotate_half(k) * s
        st.rope_key_absmax = _amax(st.rope_key_absmax, kr.abs().amax(dim=(0, 2)).cpu())

    hooks.append(key_src.register_forward_hook(key_hook))
    cur_len = [0]
    try:
        for x in inputs:
            cur_len[0] = x.shape[1]
            layer(x.to(device), **kw)
            st.tokens += x.shape[0] * x.shape[1]
    finally:
        for h in hooks:
            h.remove()
    return st
