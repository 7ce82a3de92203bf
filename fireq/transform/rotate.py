"""Orthogonal rotations folded into the weights (free at run time).

Residual stream (`rotate_residual`, llama-style models): with every RMSNorm's weight first folded into
the linears it feeds, RMSNorm(x Q) = RMSNorm(x) Q for an orthogonal Q, so the whole residual stream can
live in a rotated basis:
- embedding rows E -> E Q;
- linears reading the stream (q/k/v, gate/up, lm_head): W -> W Q;
- linears writing to it (o_proj, down_proj): W -> Q^T W, bias b -> Q^T b.
Outlier channels of the stream and the outlier input columns of the weights are spread over all
channels, which is what per-group INT4 weights and per-token FP8 activations want. Models whose blocks
normalize their outputs before the residual add (Gemma 3's post-attention/post-feedforward norms) do
not commute with Q and are refused.

Values and attention outputs (`rotate_vo`, any supported model): a per-head rotation H on v_proj's output
rows and o_proj's matching input columns (V H, then (P V H) H^T = P V), which evens out V's channels
before the INT4 cache quantizes them per token.

Q is a randomized Hadamard matrix: diag(signs) (H_{2^k} kron R_m) / sqrt(2^k) for n = 2^k m, with R_m a
random orthogonal m x m block when n is not a power of two (SmolLM2: 576 = 64 x 9).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FireqError
from ..models.registry import ArchSpec, decoder_layers


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of order n (a power of two), entries +-1, float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """An orthogonal n x n float64 matrix: sign-randomized Hadamard (kron a random orthogonal odd block)."""
    g = torch.Generator().manual_seed(seed)
    p2 = n & -n  # largest power of two dividing n
    m = n // p2
    q = hadamard(p2) / p2**0.5
    if m > 1:
        r, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        q = torch.kron(q, r.contiguous())
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return signs[:, None] * q


def _mul_in(lin: nn.Module, q: torch.Tensor) -> None:
    """W -> W Q (the input side is rotated)."""
    w = lin.weight
    w.copy_((w.double() @ q).to(w.dtype))


def _mul_out(lin: nn.Module, q: torch.Tensor) -> None:
    """W -> Q^T W, b -> Q^T b (the output side is rotated)."""
    w = lin.weight
    w.copy_((q.t() @ w.double()).to(w.dtype))
    if lin.bias is not None:
        lin.bias.copy_((q.t() @ lin.bias.double()).to(lin.bias.dtype))


def _fold_norm(norm: nn.Module, lins: list[nn.Module]) -> None:
    """RMSNorm weight w into the following linears' columns (W -> W diag(w)); w -> 1."""
    w = norm.weight.double()
    for lin in lins:
        lin.weight.copy_((lin.weight.double() * w[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _untie(model: nn.Module) -> None:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone())
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and hasattr(cfg, "tie_word_embeddings"):
            cfg.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


def residual_supported(model: nn.Module, arch: ArchSpec) -> bool:
    return not arch.norm_plus_one and not hasattr(decoder_layers(model)[0], "post_feedforward_layernorm")


@torch.no_grad()
def rotate_residual(model: nn.Module, arch: ArchSpec, seed: int) -> None:
    if not residual_supported(model, arch):
        raise FireqError(f"rotate_residual: {model.config.model_type} normalizes block outputs before the "
                         "residual add, which a rotation does not commute with (use rotate_vo only)")
    layers = decoder_layers(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    q = random_hadamard(hidden, seed)
    _untie(model)
    emb = model.get_input_embeddings()
    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    for layer in layers:
        at, mlp = layer.self_attn, layer.mlp
        _fold_norm(getattr(layer, arch.attn_norm), [at.q_proj, at.k_proj, at.v_proj])
        _fold_norm(getattr(layer, arch.mlp_norm), [mlp.gate_proj, mlp.up_proj])
        for lin in (at.q_proj, at.k_proj, at.v_proj, mlp.gate_proj, mlp.up_proj):
            _mul_in(lin, q)
        _mul_out(at.o_proj, q)
        _mul_out(mlp.down_proj, q)
    head = model.get_output_embeddings()
    _fold_norm(getattr(model, "model", model).norm, [head])
    _mul_in(head, q)


@torch.no_grad()
def rotate_vo(model: nn.Module, head_dim: int, n_kv_heads: int, n_heads: int, seed: int) -> None:
    """Per-head rotation H on V (v_proj rows: W -> H^T W) and on o_proj's input columns (W -> W H, every
    query head of a group), so the attention output comes back unrotated."""
    h = random_hadamard(head_dim, seed + 1)
    for layer in decoder_layers(model):
        at = layer.self_attn
        v = at.v_proj
        wv = v.weight.double().reshape(n_kv_heads, head_dim, -1)
        v.weight.copy_(torch.einsum("ed,hdk->hek", h.t(), wv).reshape(v.weight.shape).to(v.weight.dtype))
        if v.bias is not None:
            bv = v.bias.double().reshape(n_kv_heads, head_dim)
            v.bias.copy_((bv @ h).reshape(-1).to(v.bias.dtype))
        o = at.o_proj
        wo = o.weight.double().reshape(o.weight.shape[0], n_heads, head_dim)
        o.weight.copy_(torch.einsum("nhd,de->nhe", wo, h).reshape(o.weight.shape).to(o.weight.dtype))


def apply_rotations(model: nn.Module, recipe, arch: ArchSpec) -> None:
    config = getattr(model.config, "text_config", None) or model.config
    if recipe.rotate_residual:
        rotate_residual(model, arch, recipe.seed)
    if recipe.rotate_vo:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotate_vo(model, head_dim, config.num_key_value_heads, config.num_attention_heads, recipe.seed)
