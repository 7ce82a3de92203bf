"""RoPE-aware key scaling (FireQ): pre-RoPE scales folded into W_k / W_q, post-RoPE scales applied online.

RoPE (rotate-half) mixes channel j with j + D/2 by a rotation, so a per-channel scale commutes with it
only when both channels of the pair share it.

Pre-RoPE: for KV head h and pair j, m_hj = max_t sqrt(k_tj^2 + k_t(j+D/2)^2) on calibration data and
N_hj = alpha / m_hj. Rows h*D + j and h*D + j + D/2 of W_k (and b_k) are multiplied by N_hj, the same rows
of W_q (and b_q) of every query head in h's GQA group by 1 / N_hj: q_i^T k_i is unchanged for every
position, hence so is attention. Models with a k_norm (Gemma 3, Qwen 3) normalize K before RoPE with a
weight shared by all heads, so per-head folding is impossible there: only post-RoPE scaling applies.

Post-RoPE: per KV head, the top-k channels by max|k| after RoPE, plus their RoPE partners, get
S_c = beta / max|k_c|, others 1; K <- K S and Q <- Q / S at run time (fireq.nn.attention). Pre-RoPE
scales of those pairs stay 1.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibrate.stats import LayerStats
from ..recipe import Recipe


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def post_rope_scales(rope_key_absmax: torch.Tensor, beta: float, top_k: int) -> torch.Tensor:
    """(H_kv, D) max |k| after RoPE -> (H_kv, D) scales S (1 outside the selected channels)."""
    hkv, d = rope_key_absmax.shape
    s = torch.ones(hkv, d)
    if top_k <= 0:
        return s
    idx = rope_key_absmax.topk(min(top_k, d), dim=-1).indices
    sel = torch.zeros(hkv, d, dtype=torch.bool)
    sel.scatter_(1, idx, True)
    sel = sel | sel.roll(d // 2, dims=1)  # the RoPE partners (j <-> j + D/2)
    s[sel] = beta / rope_key_absmax[sel].clamp(min=1e-6)
    return s


@torch.no_grad()
def fold_pre_rope(attn: nn.Module, n: torch.Tensor, n_heads: int) -> None:
    """Multiply W_k rows by n (H_kv, D) and W_q rows by 1/n repeated over each GQA group."""
    hkv, d = n.shape
    kscale = n.reshape(-1).to(attn.k_proj.weight)
    qscale = (1.0 / n).repeat_interleave(n_heads // hkv, dim=0).reshape(-1).to(attn.q_proj.weight)
    attn.k_proj.weight.mul_(kscale[:, None])
    attn.q_proj.weight.mul_(qscale[:, None])
    if attn.k_proj.bias is not None:
        attn.k_proj.bias.mul_(kscale)
    if attn.q_proj.bias is not None:
        attn.q_proj.bias.mul_(qscale)


def rope_scales(layer: nn.Module, stats: LayerStats, recipe: Recipe, config) -> dict:
    attn = layer.self_attn
    d = _head_dim(config)
    post = None
    keep = torch.ones_like(stats.rope_key_absmax, dtype=torch.bool)
    if recipe.post_rope_scaling:
        post = post_rope_scales(stats.rope_key_absmax, recipe.post_rope_beta, recipe.post_rope_top_k)
        keep = post == 1.0
    if recipe.pre_rope_scaling and getattr(attn, "k_norm", None) is None:
        pair = stats.key_pair_norm.clamp(min=1e-6)  # (H_kv, D/2)
        n = recipe.pre_rope_alpha / pair
        n = torch.cat([n, n], dim=-1)
        pair_keep = keep[:, : d // 2] & keep[:, d // 2:]
        n = torch.where(torch.cat([pair_keep, pair_keep], dim=-1), n, torch.ones_like(n))
        fold_pre_rope(attn, n, config.num_attention_heads)
    return {"k_post_scale": post} if post is not None else {}
