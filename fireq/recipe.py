"""Recipes: every knob of a quantization run, one name everywhere (CLI flag, YAML key, JSON field).

A recipe is a frozen dataclass; configs/*.yaml map onto it one to one (unknown keys are errors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import FireqError



def _config_dir() -> Path:
    """configs/ (installed as the package `fireq_configs`)."""
    import importlib.util

    spec = importlib.util.find_spec("fireq_configs")
    if spec is None or spec.origin is None:
        return Path(__file__).resolve().parent.parent / "configs"
    return Path(spec.origin).parent


@dataclass(frozen=True)
class Recipe:
    name: str = "rtn"
    # weights: INT4 symmetric groups along the input dim
    method: str = "rtn"  # rounding: rtn | gptq
    w_bits: int = 4  # 4 | 16 (weights left in float: ablations only, no packed checkpoint)
    w_group_size: int = 128  # 32 | 64 | 128 | -1 (per output channel)
    w_scale_dtype: str = "fp8"  # fp8 (with the per-tensor power-of-two multiplier) | bf16
    w_clip_search: bool = False  # search a clipping ratio of the group absmax per layer
    gptq_damp: float = 0.01
    # activations and queries
    act_quant: bool = True  # FP8 E4M3 per token, dynamic
    query_fp8: bool = True  # FP8 per token per head, after RoPE and the post-RoPE scales
    # KV cache
    kv_bits: int = 4  # 4 | 16 (off)
    kv_group_size: int = -1  # -1 = head_dim
    kv_symmetric: bool = True
    kv_scale_dtype: str = "fp8"  # fp8 | bf16
    # outlier handling (transform stage)
    pre_rope_scaling: bool = False
    pre_rope_alpha: float = 8.0
    post_rope_scaling: bool = False
    post_rope_beta: float = 8.0
    post_rope_top_k: int = 8
    channel_scaling: bool = False  # FireQ weight-only channel-wise scaling
    channel_scaling_c_gate_up: float = 0.0096
    channel_scaling_c_down: float = 0.015
    smooth_alpha: float = -1.0  # activation-aware smoothing exponent; < 0 off
    smooth_search: bool = False  # choose the exponent (or none) per block on the block-output error
    rotate_residual: bool = False  # randomized Hadamard on the residual stream, folded into the weights
    rotate_vo: bool = False  # per-head Hadamard on V and o_proj's input, folded into the weights
    # calibration
    calib_data: str = "wikitext2"  # a text file, or wikitext2 | c4 | pile (needs `datasets` and the hub)
    nsamples: int = 32
    seqlen: int = 512
    seed: int = 0
    calib_token_cap: float = 0.0  # second moments: tokens above cap x median norm scaled down to it; 0 off

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def bad(msg: str):
            raise FireqError(f"recipe {self.name!r}: {msg}")

        if self.method not in ("rtn", "gptq"):
            bad(f"method must be rtn or gptq, got {self.method!r}")
        if self.w_bits not in (4, 16):
            bad(f"w_bits must be 4 or 16, got {self.w_bits}")
        if self.w_group_size not in (-1, 32, 64, 128, 256):
            bad(f"w_group_size must be one of 32, 64, 128, 256, -1 (per channel), got {self.w_group_size}")
        for k in ("w_scale_dtype", "kv_scale_dtype"):
            if getattr(self, k) not in ("fp8", "bf16"):
                bad(f"{k} must be fp8 or bf16, got {getattr(self, k)!r}")
        if self.kv_bits not in (4, 16):
            bad(f"kv_bits must be 4 or 16, got {self.kv_bits}")
        if self.kv_group_size not in (-1, 32, 64, 128):
            bad(f"kv_group_size must be one of 32, 64, 128, -1 (head_dim), got {self.kv_group_size}")
        if not 0.0 <= self.gptq_damp <= 1.0:
            bad(f"gptq_damp must be in [0, 1], got {self.gptq_damp}")
        for k in ("pre_rope_alpha", "post_rope_beta", "channel_scaling_c_gate_up", "channel_scaling_c_down"):
            if not getattr(self, k) > 0:
                bad(f"{k} must be > 0, got {getattr(self, k)}")
        if not 0 <= self.post_rope_top_k <= 512:
            bad(f"post_rope_top_k must be in [0, 512], got {self.post_rope_top_k}")
        if self.smooth_alpha > 1.0:
            bad(f"smooth_alpha must be <= 1 (negative = off), got {self.smooth_alpha}")
        if self.calib_token_cap < 0:
            bad(f"calib_token_cap must be >= 0 (0 = off), got {self.calib_token_cap}")
        if self.nsamples <= 0:
            bad(f"nsamples must be > 0, got {self.nsamples}")
        if self.seqlen <= 0:
            bad(f"seqlen must be > 0, got {self.seqlen}")

    def needs_calibration(self) -> bool:
        """True when some stage consumes activation statistics (RTN alone needs none)."""
        return (self.method == "gptq" or self.pre_rope_scaling or self.post_rope_scaling or self.smooth_alpha >= 0
                or self.smooth_search
                or self.w_clip_search)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Recipe":
        return from_dict({**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}})


def from_dict(d: dict) -> Recipe:
    names = {f.name: f for f in fields(Recipe)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise FireqError(f"unknown recipe key(s): {', '.join(unknown)}")
    out = {}
    for k, v in d.items():
        t = type(getattr(Recipe(), k))
        try:
            if t is bool and not isinstance(v, bool):
                raise TypeError
            out[k] = float(v) if t is float and isinstance(v, int) and not isinstance(v, bool) else v
            if not isinstance(out[k], t):
                raise TypeError
        except TypeError:
            raise FireqError(f"recipe key {k}: expected {t.__name__}, got {v!r}") from None
    return Recipe(**out)


def available() -> list[str]:
    return sorted(p.stem for p in _config_dir().glob("*.yaml"))


def load(name_or_path: str) -> Recipe:
    """A recipe from a YAML file, or by name from the shipped configs (`rtn`, `default`, ...)."""
    import yaml

    p = Path(name_or_path)
    if not p.is_file():
        p = _config_dir() / f"{name_or_path}.yaml"
        if not p.is_file():
            raise FireqError(f"no recipe {name_or_path!r}: give a YAML file or one of {', '.join(available())}")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise FireqError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict):
        raise FireqError(f"{p}: a recipe is a mapping of keys to values")
    d.setdefault("name", p.stem)
    return from_dict(d)
