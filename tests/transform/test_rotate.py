"""Rotations folded into the weights leave the float model's logits unchanged (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from fireq.errors import FireqError
from fireq.models.registry import arch_of
from fireq.recipe import Recipe
from fireq.transform.rotate import apply_rotations, hadamard, random_hadamard
from tests.conftest import make_tiny


@pytest.mark.parametrize("n", [1, 8, 96, 576])
def test_random_hadamard_is_orthogonal(n):
    q = random_hadamard(n, seed=3)
    assert torch.allclose(q @ q.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)
    h = hadamard(16)
    assert torch.equal(h @ h.t(), 16 * torch.eye(16, dtype=torch.float64))


@pytest.mark.parametrize("arch,residual", [("llama", True), ("qwen2", True), ("gemma3_text", False)])
def test_rotations_keep_logits_float64(arch, residual):
    m = make_tiny(arch, 500).double()
    ref = copy.deepcopy(m)
    r = Recipe(rotate_residual=residual, rotate_vo=True, seed=5)
    apply_rotations(m, r, arch_of(m.config))
    x = torch.randint(0, 500, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m(x).logits, ref(x).logits
    assert ((a - b).abs().max() / b.abs().max()) < 1e-6
    if residual:  # the stream really is rotated: the embedding table moved
        assert not torch.allclose(m.get_input_embeddings().weight, ref.get_input_embeddings().weight)
        assert m.get_output_embeddings().weight.data_ptr() != m.get_input_embeddings().weight.data_ptr()


def test_residual_rotation_refused_on_gemma3():
    m = make_tiny("gemma3_text", 500).double()
    with pytest.raises(FireqError, match="rotate_residual"):
        apply_rotations(m, Recipe(rotate_residual=True), arch_of(m.config))
