"""Dispatch between the Triton kernels and their PyTorch twins."""

from __future__ import annotations

import warnings

import torch

from . import reference

_warned = False
_tuned_loaded = False


def triton_fp8_capable(device: torch.device) -> bool:
    """True on a CUDA device with FP8 tensor cores (compute capability 8.9 or newer)."""
    if device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    ok = (major, minor) >= (8, 9)
    global _warned
    if not ok and not _warned:
        warnings.warn("fireq: this GPU has no FP8 tensor cores (needs sm_89+); using the PyTorch reference path")
        _warned = True
    return ok


def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int,
                group_size: int, bias: torch.Tensor | None = None, act_quant: bool = True,
                layout_block: int = 0) -> torch.Tensor:
    """Quantized linear: x (..., K) -> (..., N). See reference.w4a8_linear_ref for the semantics."""
    if act_quant and triton_fp8_capable(x.device):
        from .gemm_w4a8 import load_tuned, w4a8_linear_triton

        global _tuned_loaded
        if not _tuned_loaded:  # this GPU's tuned configs (kernels/tuned/<name>.json), if shipped
            load_tuned()
            _tuned_loaded = True

        return w4a8_linear_triton(x, qweight, w_scales, log2_multiplier, group_size, bias, layout_block)
    if layout_block:
        raise ValueError("the reference path reads the checkpoint layout (layout_block=0)")
    return reference.w4a8_linear_ref(x, qweight, w_scales, log2_multiplier, group_size, bias, act_quant)


def kv4_attention(q, k, v, scale, mask=None, q_bias=None, k_bias=None):
    """Attention over dequantized K/V (reference path). See reference.kv4_attention_ref."""
    return reference.kv4_attention_ref(q, k, v, scale, mask, q_bias, k_bias)
