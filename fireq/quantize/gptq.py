"""GPTQ on fireq's INT4 grid (FP8 group scales with the per-tensor power-of-two multiplier).

Columns are quantized left to right; each column's rounding error e_j = (w_j - q_j) / [H^-1]_jj is
spread over the not-yet-quantized columns through the upper Cholesky factor U of H^-1
(W[:, j+1:] -= e_j U[j, j+1:]), which minimizes the layer-output error ||(W - W_hat) X||^2 given the
input Gram matrix H = X X^T / n. A group's scale is taken when its first column is reached, from the
already-updated weights (so it sees the error fed into it). Processing goes in blocks of 128 columns
with a lazy batch update of the rest (Frantar et al., 2022).
"""

from __future__ import annotations

import torch

from ..formats.int4 import INT4_MAX, INT4_MIN, QuantizedWeight, _cast_scale, effective_group_size, pack_int4, \
    search_log2_multiplier
from ..recipe import Recipe


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, recipe: Recipe, block: int = 128) -> QuantizedWeight:
    """weight: (N, K); hessian: (K, K) = X X^T / n of the layer's inputs."""
    w = weight.detach().double().clone()
    n, k = w.shape
    g = effective_group_size(k, recipe.w_group_size)
    e = search_log2_multiplier(weight.float(), recipe.w_group_size) if recipe.w_scale_dtype == "fp8" else 0
    m = 2.0**e
    h = hessian.double().clone().to(w.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += recipe.gptq_damp * torch.mean(torch.diag(h)) * torch.eye(k, dtype=h.dtype, device=h.device)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # not positive definite even after damping: fall back to round-to-nearest
        from ..formats.int4 import quantize_int4

        return quantize_int4(weight.detach().float(), recipe.w_group_size, recipe.w_scale_dtype, e)

    q = torch.zeros(n, k, dtype=torch.int8)
    scales = []
    s_cur = None
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        err = torch.zeros(n, b1 - b0, dtype=torch.float64)
        for j in range(b0, b1):
            if j % g == 0:
                amax = (w[:, j:min(j + g, k)] * m).abs().amax(dim=1)
                s_st = _cast_scale((amax / INT4_MAX).float(), recipe.w_scale_dtype)
                scales.append(s_st)
                s_cur = s_st.double()
            col = w[:, j]
            safe = torch.where(s_cur > 0, s_cur, 1.0)
            qj = torch.where(s_cur > 0, torch.round(col * m / safe), 0.0).clamp(INT4_MIN, INT4_MAX)
            q[:, j] = qj.to(torch.int8)
            deq = qj * s_cur / m
            ej = (col - deq) / u[j, j]
            err[:, j - b0] = ej
            if j + 1 < b1:
                w[:, j + 1:b1] -= ej[:, None] * u[j, j + 1:b1][None, :]
        if b1 < k:
            w[:, b1:] -= err @ u[b0:b1, b1:]
    return QuantizedWeight(pack_int4(q), torch.stack(scales, dim=1), e, k, recipe.w_group_size)
