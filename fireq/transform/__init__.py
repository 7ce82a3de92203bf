"""Output-preserving transforms applied to each float decoder layer before it is quantized.

Each transform changes the weights so that the layer computes the same function in exact arithmetic
while its tensors become easier to quantize (smoothing, scale folding, pre-RoPE key scaling). They run
in `apply`, in a fixed order, on the statistics the calibration collected for the layer.
"""

from __future__ import annotations

from torch import nn

from ..calibrate.stats import LayerStats
from ..models.registry import ArchSpec
from ..recipe import Recipe


def apply(layer: nn.Module, stats: LayerStats | None, recipe: Recipe, arch: ArchSpec, config) -> dict:
    """Transform one layer in place. Returns extra tensors for the attention module (post-RoPE scales)."""
    extras: dict = {}
    if recipe.channel_scaling and recipe.smooth_alpha < 0 and stats is None:
        from .smooth import apply_smoothing

        apply_smoothing(layer, LayerStats(), recipe, arch)  # weight-only: needs no statistics
    if stats is None:
        return extras
    if recipe.smooth_alpha >= 0 or recipe.channel_scaling or recipe.smooth_search:
        from .smooth import apply_smoothing

        apply_smoothing(layer, stats, recipe, arch)
    if recipe.pre_rope_scaling or recipe.post_rope_scaling:
        from .rope_scaling import rope_scales

        extras.update(rope_scales(layer, stats, recipe, config))
    return extras
