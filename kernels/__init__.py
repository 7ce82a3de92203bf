"""fireq's compute kernels (installed as the package `fireq_kernels`).

Each op has a Triton implementation for Hopper/Ada GPUs and a pure-PyTorch twin with the same
signature and semantics (`*_ref` in reference.py). The dispatching functions in ops.py choose:
Triton on a CUDA device that has FP8 (sm_89+), the twin elsewhere (CPU, older GPUs: one warning).
"""

from .ops import kv4_attention, w4a8_linear

__all__ = ["kv4_attention", "w4a8_linear"]
