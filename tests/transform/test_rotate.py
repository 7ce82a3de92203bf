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


def test_rotated_checkpoint_round_trip(tiny_dirs, calib_file, tmp_path):
    """A residual-rotated model saves (untied, rotated embeddings) and loads back to the same logits."""
    import fireq
    from fireq import recipe as recipes
    from fireq.data import calibration_samples, load_text, tokenize
    from fireq.models.source import load_float_model, resolve
    from fireq.pipeline import quantize_model, run
    from transformers import AutoTokenizer

    r = recipes.load("default").replace(calib_data=str(calib_file), nsamples=4, seqlen=32, rotate_residual=True,
                                        rotate_vo=True)
    out = tmp_path / "rot"
    run(str(tiny_dirs["llama"]), str(out), r, save_dtype="float32")
    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])
    samples = calibration_samples(tokenize(tok, load_text(str(calib_file))), 4, 32, 0)
    mem = load_float_model(resolve(str(tiny_dirs["llama"])))
    quantize_model(mem, r, samples)
    x = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(1))
    loaded = fireq.load(str(out), dtype=torch.float32)
    assert not loaded.config.tie_word_embeddings
    with torch.no_grad():
        a, b = loaded(x).logits, mem(x).logits
    assert ((a - b).norm() / b.norm()) < 1e-5
