"""Load a fireq checkpoint into a transformers model with quantized modules swapped in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..errors import FireqError
from ..formats.int4 import n_groups
from ..models.registry import arch_of, decoder_layers
from ..nn.linear import QuantLinear, set_prefill_fp8
from ..nn.mlp import fuse_gated_mlps
from ..nn.qkv import fuse_qkv
from ..nn.norm import mark_fp8_norms, swap_rms_norms
from ..nn.rope import patch_rotary
from .format import FORMAT_VERSION, QUANT_METHOD


def read_quant_config(path: Path) -> tuple[dict, dict]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FireqError(f"{path}: not a model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FireqError(f"{cfg_file}: not valid JSON") from None
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise FireqError(f"{path}: not a fireq checkpoint (no quantization_config with quant_method 'fireq')")
    if qc.get("format_version") != FORMAT_VERSION:
        raise FireqError(f"{path}: unknown fireq format version {qc.get('format_version')!r} "
                         f"(this fireq reads version {FORMAT_VERSION})")
    for k in ("weights", "activations", "queries", "kv_cache", "modules"):
        if k not in qc:
            raise FireqError(f"{path}: quantization_config lacks {k!r}")
    return cfg, qc


def _set(root: nn.Module, dotted: str, module: nn.Module) -> None:
    *path, leaf = dotted.split(".")
    for p in path:
        root = getattr(root, p)
    setattr(root, leaf, module)


def swap_modules(model: nn.Module, qc: dict, dtype: torch.dtype) -> None:
    """Replace the linears named in qc['modules'] by empty QuantLinears and attach attention settings.
    Used by fireq.load and by the transformers quantizer."""
    from ..formats.kv import KVSpec
    from ..nn import attention

    w = qc["weights"]
    act = qc["activations"]["dtype"] is not None
    for name in qc["modules"]:
        try:
            lin = model.get_submodule(name)
        except AttributeError:
            raise FireqError(f"checkpoint names module {name}, which the model does not have") from None
        if isinstance(lin, QuantLinear):
            continue
        q = QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, w["group_size"], w["scale_dtype"],
                        act, dtype, device="cpu")
        _set(model, name, q)
    fuse_gated_mlps(model)  # gate/up as one GEMM with the activation in its epilogue, on the GPU
    fuse_qkv(model)  # q/k/v as one GEMM on the GPU
    swap_rms_norms(model)  # one Triton kernel an RMSNorm on the GPU
    mark_fp8_norms(model)  # ... which also quantizes its output for the quantized linears it feeds
    patch_rotary(model)  # the rotary embedding of q and k as one Triton launch on the GPU
    kv = qc["kv_cache"]
    aq = attention.AttentionQuant(KVSpec(kv["bits"], kv["group_size"], kv["symmetric"], kv["scale_dtype"]),
                                  qc["queries"]["dtype"] is not None)
    cfg = getattr(model.config, "text_config", None) or model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer in decoder_layers(model):
        post = torch.ones(cfg.num_key_value_heads, head_dim) if qc.get("post_rope_scaling") else None
        attention.attach(layer.self_attn, aq, post)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise FireqError(f"{index}: not a valid safetensors index") from None
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        p = path / f
        if not p.is_file():
            raise FireqError(f"{path}: missing weights file {f}")
        try:
            out.update(load_file(str(p)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise FireqError(f"{p}: corrupt safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return out


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    tied = {k for k in expected if k.endswith("lm_head.weight")} if getattr(model.config, "tie_word_embeddings",
                                                                             False) else set()
    missing = sorted(k for k in expected if k not in tensors and k not in tied)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FireqError(f"{path}: checkpoint is missing tensor {missing[0]}{more}")
    unexpected = sorted(k for k in tensors if k not in expected)
    if unexpected:
        raise FireqError(f"{path}: checkpoint has unexpected tensor {unexpected[0]}")
    for k, t in tensors.items():
        e = expected[k]
        if tuple(t.shape) != tuple(e.shape):
            raise FireqError(f"{path}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(e.shape)}")
        if not t.is_floating_point() or t.dtype == torch.float8_e4m3fn or e.dtype == torch.float8_e4m3fn:
            if t.dtype != e.dtype:
                raise FireqError(f"{path}: tensor {k} has dtype {t.dtype}, expected {e.dtype}")
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            if m.scales.shape[1] != n_groups(m.in_features, m.group_size):
                raise FireqError(f"{path}: {name} scales do not match its group size")
            e = int(tensors[f"{name}.log2_multiplier"].item())
            if not 0 <= e <= 30:
                raise FireqError(f"{path}: {name}.log2_multiplier {e} out of range")


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         prefill_fp8: bool | int = False) -> nn.Module:
    """A fireq checkpoint as a transformers causal LM running on the quantized modules.

    dtype: compute dtype of the non-quantized parts (default float32 on CPU, bfloat16 on CUDA).
    prefill_fp8: True (from fireq.nn.linear.PREFILL_FP8_MIN_TOKENS tokens) or a token count: linear calls with
    at least that many tokens take the FP8 prefill path (fireq.nn.linear.set_prefill_fp8: faster prefill,
    weights re-rounded to FP8 with one scale a row); False (default): the INT4 GEMM's numbers everywhere.
    `generate()` uses the INT4 KV cache (fireq.nn.attention.make_cache) unless given another cache.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..pipeline import set_attention_impl

    path = Path(path).expanduser()
    if not path.exists():
        raise FireqError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise FireqError(f"{path}: not a checkpoint directory")
    cfg_dict, qc = read_quant_config(path)
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise FireqError(f"{path}: cannot read config.json ({type(e).__name__})") from None
    arch_of(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model is built empty and swapped by hand
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    swap_modules(model, qc, dtype)
    tensors = _read_tensors(path)
    _check_tensors(model, tensors, path)
    tensors = {k: (v.to(dtype) if v.is_floating_point() and v.dtype != torch.float8_e4m3fn
                   and not k.endswith("k_post_scale") else v) for k, v in tensors.items()}
    model.load_state_dict(tensors, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type == "meta":
            raise FireqError(f"{path}: checkpoint is missing tensor {n}")
    model.config.quantization_config = qc
    set_attention_impl(model)
    model.to(device).eval()
    _use_int4_cache_in_generate(model)
    if prefill_fp8:
        set_prefill_fp8(model, prefill_fp8)
    return model


def _use_int4_cache_in_generate(model: nn.Module) -> None:
    """Make generate() default to the INT4 KV cache (this instance only), and run plain greedy calls on a GPU
    as CUDA-graph replays (fireq.nn.generate)."""
    from ..nn import generate as graphed
    from ..nn.attention import make_cache

    import inspect

    original = model.generate
    # transformers >= 5.2x names the argument `cache`; earlier 5.x `past_key_values`
    name = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def generate(*args, **kwargs):
        p = graphed.plan(model, args, kwargs)
        if p is not None:
            return graphed.run(model, p)
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            kwargs[name] = make_cache(model)
        return original(*args, **kwargs)

    generate.__doc__ = original.__doc__
    model.generate = generate
