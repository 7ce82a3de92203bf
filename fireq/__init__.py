"""fireq: W4A8KV4 post-training quantization for LLMs (INT4 weights, FP8 activations, INT4 KV cache).

    fireq quantize MODEL -o OUT      # command line
    model = fireq.load("OUT")        # Python: a transformers model on the quantized modules

Importing fireq registers the "fireq" quantization method with transformers, so that
`AutoModelForCausalLM.from_pretrained(OUT)` loads a fireq checkpoint too.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import FireqError  # noqa: E402


def load(path, device="cpu", dtype=None, prefill_fp8=False):
    """Load a fireq checkpoint directory. See fireq.checkpoint.load.load."""
    from .checkpoint.load import load as _load

    return _load(path, device=device, dtype=dtype, prefill_fp8=prefill_fp8)


def _register_with_transformers() -> None:
    try:
        from .integration import register
    except ImportError:  # transformers missing: fireq.load will say so
        return
    register()


_register_with_transformers()

__all__ = ["FireqError", "load", "__version__"]
