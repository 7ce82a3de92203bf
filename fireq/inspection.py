"""`fireq inspect`: what the recipe's transforms do to the tensors that get quantized.

For every decoder layer, on calibration tokens, the per-channel max |x| of the inputs of q/k/v, of
gate/up and of down_proj, and of the keys before and after RoPE, once on the float layer and once after
the recipe's transform stage (smoothing, pre-RoPE key scaling; post-RoPE scales multiply the rotated keys),
which is output-preserving, so the layer's outputs and the next layer's inputs do not change. Writes
PNG plots (matplotlib, imported here only) and stats.json:
- summary.png: per layer, the largest channel over the median channel (the outlier ratio that per-token
  FP8 and INT4 KV suffer), before and after;
- layer_<i>.png for chosen layers (default: the two with the largest down_proj input ratio, and layer 0):
  per-channel magnitudes before and after, log scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import FireqError

SITES = (("attn_in", "self_attn.q_proj"), ("mlp_in", "mlp.gate_proj"), ("down_in", "mlp.down_proj"))


def _ratio(v: torch.Tensor) -> float:
    v = v.float().flatten()
    return float(v.max() / v.median().clamp(min=1e-12))


def _site_stats(st, post_scale: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = {name: st.act_absmax[lin] for name, lin in SITES}
    out["keys_pre_rope"] = st.key_absmax.flatten()
    rk = st.rope_key_absmax
    out["keys_post_rope"] = (rk * post_scale.to(rk) if post_scale is not None else rk).flatten()
    return out


@torch.no_grad()
def collect_before_after(model, recipe, samples: torch.Tensor, device="cpu", show_progress=None) -> list[dict]:
    """[{site: (before (C,), after (C,))}] per layer; transforms the model in place (output-preserving)."""
    from . import transform
    from .calibrate.layerwise import capture_inputs, run_layer
    from .calibrate.stats import collect
    from .models.registry import arch_of, decoder_layers
    from .progress import progress

    config = getattr(model.config, "text_config", None) or model.config
    arch = arch_of(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if recipe.rotate_residual or recipe.rotate_vo:
        from .transform.rotate import apply_rotations

        apply_rotations(model, recipe, arch)
    layers = decoder_layers(model)
    cap = capture_inputs(model, samples, device)
    model.to("cpu")
    inputs = cap.inputs
    out = []
    kw = dict(head_dim=head_dim, n_kv_heads=config.num_key_value_heads, token_cap=recipe.calib_token_cap)
    for i in progress(range(len(layers)), "inspecting layers", total=len(layers), enabled=show_progress):
        layer = layers[i].to(device)
        before = collect(layer, inputs, cap.kwargs[i], device, **kw)
        extras = transform.apply(layer, before, recipe, arch, config)
        after = collect(layer, inputs, cap.kwargs[i], device, **kw)
        b = _site_stats(before, None)
        a = _site_stats(after, extras.get("k_post_scale"))
        out.append({k: (b[k], a[k]) for k in b})
        if i + 1 < len(layers):
            inputs = run_layer(layer, inputs, cap.kwargs[i], device)
        layers[i] = layer.to("cpu")
    return out


def write_plots(stats: list[dict], out: Path, layers: list[int] | None, title: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FireqError("fireq inspect draws with matplotlib: pip install matplotlib") from None
    sites = list(stats[0])
    written = []
    fig, axes = plt.subplots(1, len(sites), figsize=(4 * len(sites), 3.4), squeeze=False)
    xs = range(len(stats))
    for ax, site in zip(axes[0], sites):
        ax.plot(xs, [_ratio(s[site][0]) for s in stats], "o-", ms=3, label="before")
        ax.plot(xs, [_ratio(s[site][1]) for s in stats], "o-", ms=3, label="after")
        ax.set_yscale("log")
        ax.set_title(site, fontsize=10)
        ax.set_xlabel("layer")
    axes[0][0].set_ylabel("max / median channel |x|")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    p = out / "summary.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    written.append(p)
    if layers is None:
        by_down = sorted(range(len(stats)), key=lambda i: -_ratio(stats[i]["down_in"][0]))
        layers = sorted({0, *by_down[:2]})
    for i in layers:
        fig, axes = plt.subplots(len(sites), 1, figsize=(9, 2.1 * len(sites)), squeeze=False)
        for ax, site in zip(axes[:, 0], sites):
            b, a = stats[i][site]
            ax.plot(b.float().numpy(), lw=0.7, label="before")
            ax.plot(a.float().numpy(), lw=0.7, label="after", alpha=0.8)
            ax.set_yscale("log")
            ax.set_ylabel(site, fontsize=8)
        axes[0][0].legend(fontsize=8, loc="upper right")
        axes[-1][0].set_xlabel("channel")
        fig.suptitle(f"{title}: layer {i}, per-channel max |x|", fontsize=10)
        fig.tight_layout()
        p = out / f"layer_{i}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def run(model_arg: str | None, out_dir: str, recipe, checkpoint: str | None = None, layers: list[int] | None = None,
        device: str = "cpu", show_progress=None) -> list[Path]:
    from .data import calibration_samples, load_text, tokenize
    from .models.source import load_float_model, load_tokenizer, resolve
    from .recipe import from_dict

    if checkpoint is not None:  # the recipe the checkpoint was made with
        from .checkpoint.load import read_quant_config

        _, qc = read_quant_config(Path(checkpoint))
        if not isinstance(qc.get("recipe"), dict):
            raise FireqError(f"{checkpoint}: the checkpoint does not record its recipe")
        recipe = from_dict(qc["recipe"]).replace(calib_data=recipe.calib_data, nsamples=recipe.nsamples)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise FireqError(f"{out}: exists and is not a directory")
    src = resolve(model_arg)
    if src.kind == "fireq":
        raise FireqError(f"{src.path}: give the float model to inspect (and the checkpoint with --checkpoint)")
    tok = load_tokenizer(src)
    samples = calibration_samples(tokenize(tok, load_text(recipe.calib_data, split="train")), recipe.nsamples,
                                  recipe.seqlen, recipe.seed)
    model = load_float_model(src, torch.float32, "cpu")
    n_layers = len(getattr(model, "model", model).layers)
    if layers and not all(0 <= i < n_layers for i in layers):
        raise FireqError(f"--layers: the model has layers 0..{n_layers - 1}")
    stats = collect_before_after(model, recipe, samples, device, show_progress)
    out.mkdir(parents=True, exist_ok=True)
    paths = write_plots(stats, out, layers, f"{Path(src.display).name} / recipe {recipe.name}")
    summary = [{site: {"before_max_over_median": _ratio(b), "after_max_over_median": _ratio(a),
                       "before_max": float(b.max()), "after_max": float(a.max())}
                for site, (b, a) in s.items()} for s in stats]
    (out / "stats.json").write_text(json.dumps({"model": src.display, "recipe": recipe.to_dict(),
                                                "layers": summary}, indent=1) + "\n")
    return paths + [out / "stats.json"]
