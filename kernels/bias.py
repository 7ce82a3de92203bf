"""FlashBias helpers: low-rank factors of attention biases, b = phi_q phi_k^T.

With factors, softmax(q k^T * scale + b) = softmax([q * scale | phi_q] [k | phi_k]^T): the attention
kernel adds R extra dot-product channels instead of reading an (Lq, Lk) bias.
"""

from __future__ import annotations

import torch


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes 2^(-8 i / n) for i = 1..n (n a power of two)."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / n_heads) for i in range(n_heads)], dtype=torch.float64)


def alibi_dense(slopes: torch.Tensor, lq: int, lk: int) -> torch.Tensor:
    """(H, Lq, Lk) dense ALiBi bias -slope * (i - j) with query i at absolute position Lk - Lq + i."""
    i = torch.arange(lq, dtype=torch.float64)[:, None] + (lk - lq)
    j = torch.arange(lk, dtype=torch.float64)[None, :]
    return -slopes.double()[:, None, None] * (i - j)


def alibi_factors(slopes: torch.Tensor, lq: int, lk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact rank-2 factors: phi_q(i) = slope * [1, i], phi_k(j) = [-j, 1] -> slope * (i - j) negated.

    Returns q_bias (H, Lq, 2) and k_bias (1, Lk, 2) (shared by all heads), float64."""
    i = torch.arange(lq, dtype=torch.float64) + (lk - lq)
    j = torch.arange(lk, dtype=torch.float64)
    s = slopes.double()[:, None, None]
    q_bias = torch.stack([torch.ones_like(i), i], dim=-1)[None] * -s  # -slope * [1, i]
    k_bias = torch.stack([-j, torch.ones_like(j)], dim=-1)[None]  # [-j, 1]
    return q_bias, k_bias


def factor_bias(bias: torch.Tensor, energy: float = 0.99, max_rank: int = 64
                ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of a dense (Lq, Lk) bias keeping `energy` of the squared singular values.

    Returns phi_q (Lq, R), phi_k (Lk, R) and the achieved relative Frobenius error."""
    u, s, vh = torch.linalg.svd(bias.double(), full_matrices=False)
    cum = torch.cumsum(s**2, 0) / torch.sum(s**2)
    r = int(min(max_rank, int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1))
    root = s[:r].sqrt()
    pq, pk = u[:, :r] * root, vh[:r].t() * root
    err = ((pq @ pk.t() - bias.double()).norm() / bias.double().norm()).item()
    return pq, pk, err
