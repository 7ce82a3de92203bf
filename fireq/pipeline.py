"""The quantization pipeline: load -> calibrate -> transform -> quantize and pack -> save.

    quantize_model(model, recipe, samples) works in place on a loaded float model;
    run(model_arg, out_dir, recipe) is what `fireq quantize` calls.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from . import transform
from .calibrate.layerwise import capture_inputs, run_layer
from .calibrate.stats import collect, collect_hessians
from .errors import FireqError
from .models.registry import arch_of, decoder_layers
from .nn import attention
from .nn.attention import AttentionQuant
from .formats.kv import KVSpec
from .progress import progress
from .quantize.linear import SEQUENTIAL_GROUPS, quantize_layer_linears
from .recipe import Recipe


def attention_quant(recipe: Recipe) -> AttentionQuant:
    return AttentionQuant(KVSpec(recipe.kv_bits, recipe.kv_group_size, recipe.kv_symmetric, recipe.kv_scale_dtype),
                          recipe.query_fp8)


def _text_config(config):
    return getattr(config, "text_config", None) or config


def set_attention_impl(model: nn.Module) -> None:
    attention.register()
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(attention.ATTN_IMPL)
            return
        except Exception:  # older/newer transformers without validation support for custom names
            pass
    model.config._attn_implementation = attention.ATTN_IMPL


@torch.no_grad()
def quantize_model(model: nn.Module, recipe: Recipe, samples: torch.Tensor | None = None,
                   device: str | torch.device = "cpu", fake: bool = False, show_progress: bool | None = None) -> dict:
    """Quantize a float causal LM in place, layer by layer.

    samples: (n, L) calibration token ids, needed when recipe.needs_calibration().
    fake=True builds the quantize-dequantize twin (float weights) instead of packed modules.
    Returns a small report (time, layers).
    """
    t0 = time.time()
    config = _text_config(model.config)
    arch = arch_of(config)
    set_attention_impl(model)
    layers = decoder_layers(model)
    dtype = next(model.parameters()).dtype
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    aq = attention_quant(recipe)

    if recipe.rotate_residual or recipe.rotate_vo:
        from .transform.rotate import apply_rotations

        apply_rotations(model, recipe, arch)
    calibrate = recipe.needs_calibration()
    if calibrate and samples is None:
        raise FireqError(f"recipe {recipe.name!r} needs calibration samples")
    cap = capture_inputs(model, samples, device) if calibrate else None
    model.to("cpu")
    inputs = cap.inputs if cap else None

    for i in progress(range(len(layers)), "quantizing layers", total=len(layers), enabled=show_progress):
        layer = layers[i].to(device)
        stats = None
        if calibrate:
            stats = collect(layer, inputs, cap.kwargs[i], device,
                            head_dim=head_dim, n_kv_heads=config.num_key_value_heads, token_cap=recipe.calib_token_cap,
                            keep_rows=4096 if recipe.smooth_search else 0)
        extras = transform.apply(layer, stats, recipe, arch, config)
        attention.attach(layer.self_attn, aq, extras.get("k_post_scale"))
        if recipe.method == "gptq" and calibrate:
            # true-sequential: each group's Hessian comes from inputs through the already-quantized
            # groups before it (and the INT4 KV attention), FP8-quantized as the kernel will see them
            for group in SEQUENTIAL_GROUPS:
                hs = collect_hessians(layer, inputs, cap.kwargs[i], device, list(group), recipe.act_quant,
                                      recipe.calib_token_cap)
                quantize_layer_linears(layer, recipe, dtype, hs, fake=fake, only=group)
        else:
            quantize_layer_linears(layer, recipe, dtype, None, fake=fake, act_sq=stats.act_sq if stats else None)
        if calibrate and i + 1 < len(layers):
            inputs = run_layer(layer, inputs, cap.kwargs[i], device)
        layers[i] = layer.to("cpu")
    return {"seconds": time.time() - t0, "layers": len(layers), "calibrated": calibrate}


def run(model_arg: str | None, out_dir: str, recipe: Recipe, overwrite: bool = False, device: str = "cpu",
        save_dtype: str = "bfloat16", show_progress: bool | None = None) -> Path:
    """`fireq quantize`: load MODEL, quantize it by the recipe, write the checkpoint atomically."""
    from .checkpoint.save import check_output_dir, save_checkpoint
    from .data import calibration_samples, load_text, tokenize
    from .models.source import load_float_model, load_tokenizer, resolve

    if recipe.w_bits != 4:
        raise FireqError("fireq quantize writes INT4 weights: w_bits must be 4 (16 is for ablations)")
    out = check_output_dir(out_dir, overwrite)
    src = resolve(model_arg)
    if src.kind == "fireq":
        raise FireqError(f"{src.path}: already a fireq checkpoint")
    tok = load_tokenizer(src)
    samples = None
    if recipe.needs_calibration():
        text = load_text(recipe.calib_data, split="train")
        ids = tokenize(tok, text)
        samples = calibration_samples(ids, recipe.nsamples, recipe.seqlen, recipe.seed)
    model = load_float_model(src, torch.float32, "cpu")
    max_pos = getattr(_text_config(model.config), "max_position_embeddings", None)
    if samples is not None and max_pos and recipe.seqlen > max_pos:
        raise FireqError(f"seqlen {recipe.seqlen} exceeds the model's {max_pos} positions")
    report = quantize_model(model, recipe, samples, device, show_progress=show_progress)
    save_checkpoint(model, tok, recipe, out, source=src.display, save_dtype=save_dtype, report=report)
    return out
