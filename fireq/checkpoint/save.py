"""Write a quantized model as a fireq checkpoint, atomically and deterministically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import FireqError
from ..nn.linear import QuantLinear
from .format import quantization_config

SHARD_BYTES = 4 * 1024**3
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def check_output_dir(out_dir: str, overwrite: bool) -> Path:
    """Refuse an output directory that exists and is not empty (unless overwrite)."""
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise FireqError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise FireqError(f"{out}: exists and is not empty (use --overwrite to replace it)")
    if not out.parent.exists():
        raise FireqError(f"{out.parent}: no such directory")
    return out


def quantized_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def state_tensors(model: nn.Module, save_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything to save: packed tensors as they are, float tensors cast to save_dtype; tied duplicates
    (lm_head sharing the embedding) dropped."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise FireqError(f"tensor {name} was never materialized")
        key = t.data_ptr()
        if key in seen and t.numel() > 1:
            continue
        seen[key] = name
        if t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn,) and not name.endswith("k_post_scale"):
            t = t.to(save_dtype)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _write_tensors(tensors: dict[str, torch.Tensor], d: Path) -> None:
    from safetensors.torch import save_file

    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nb = tensors[k].numel() * tensors[k].element_size()
        if cur and size + nb > SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += nb
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, sh in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(d / fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in sh})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def _model_card(recipe, source: str, report: dict | None) -> str:
    lines = [
        "---", "library_name: transformers", "tags: [fireq, w4a8kv4, int4, fp8]", "---", "",
        f"# fireq W4A8KV4 checkpoint of `{os.path.basename(source.rstrip('/'))}`", "",
        "INT4 weights (symmetric groups, FP8/BF16 scales), FP8 E4M3 per-token activations and queries,",
        "INT4 KV cache. Load with `fireq.load(path)` or `AutoModelForCausalLM.from_pretrained(path)` after",
        "`import fireq`.", "", "## Recipe", "", "```yaml",
    ]
    lines += [f"{k}: {json.dumps(v)}" for k, v in recipe.to_dict().items()]
    lines += ["```", ""]
    if report:  # no timings here: same inputs must give byte-identical files
        lines += [f"{report['layers']} decoder layers quantized"
                  + (", calibrated layer by layer." if report.get("calibrated") else " (no calibration needed)."), ""]
    return "\n".join(lines)


def save_checkpoint(model: nn.Module, tokenizer, recipe, out: Path, source: str, save_dtype: str = "bfloat16",
                    report: dict | None = None) -> None:
    """Write into a temporary directory next to `out`, then rename it into place."""
    if save_dtype not in _DTYPES:
        raise FireqError(f"save dtype must be one of {', '.join(_DTYPES)}, got {save_dtype!r}")
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_tensors(state_tensors(model, _DTYPES[save_dtype]), tmp)
        cfg = model.config.to_dict()
        for k in ("_attn_implementation", "_attn_implementation_internal", "transformers_version"):
            cfg.pop(k, None)
        cfg["quantization_config"] = quantization_config(recipe, quantized_modules(model))
        cfg["dtype"] = save_dtype
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_model_card(recipe, source, report))
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            trash = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
