"""Dispatch between the Triton kernels and their PyTorch twins."""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from . import reference

_warned = False
_tuned_loaded = False


_capable: dict = {}


def triton_fp8_capable(device: torch.device) -> bool:
    """True on a CUDA device with FP8 tensor cores (compute capability 8.9 or newer). Asked once per
    device: every quantized linear and attention call asks."""
    if device.type != "cuda":
        return False
    ok = _capable.get(device)
    if ok is None:
        ok = _capable[device] = torch.cuda.get_device_capability(device) >= (8, 9)
    global _warned
    if not ok and not _warned:
        warnings.warn("fireq: this GPU has no FP8 tensor cores (needs sm_89+); using the PyTorch reference path")
        _warned = True
    return ok


def fp8_path_applies(m: int, n: int, k: int, fp8_min_tokens: int) -> bool:
    """Whether a linear of M tokens (N x K) takes the FP8 prefill path: switched on (fp8_min_tokens > 0), at
    least that many tokens, K and N multiples of 16 (cuBLAS's FP8 GEMM)."""
    return 0 < fp8_min_tokens <= m and k % 16 == 0 and n % 16 == 0


def w4a8_linear(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int,
                group_size: int, bias: torch.Tensor | None = None, act_quant: bool = True,
                layout_block: int = 0, epilogue: str | None = None, log2_multiplier2: int | None = None,
                residual: torch.Tensor | None = None, fp8_min_tokens: int = 0) -> torch.Tensor:
    """Quantized linear: x (..., K) -> (..., N) (or (..., N/2) with a gated epilogue over interleaved
    gate/up rows; residual (..., N or N/2) added last). See reference.w4a8_linear_ref for the semantics.
    fp8_min_tokens > 0: calls with at least that many tokens take the FP8 prefill path (kernels/w4_fp8.py;
    weights re-rounded to FP8 with one scale a row, reference.w4a8_linear_fp8_ref), on the GPU and in the
    reference path alike, so that its accuracy can be measured anywhere."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    fp8_path = act_quant and fp8_path_applies(m, qweight.shape[0], x.shape[-1], fp8_min_tokens)
    if act_quant and triton_fp8_capable(x.device):
        if fp8_path:
            from .w4_fp8 import w4a8_linear_fp8

            return w4a8_linear_fp8(x, qweight, w_scales, log2_multiplier, group_size, bias, layout_block, epilogue,
                                   log2_multiplier2, residual)
        from .gemm_w4a8 import load_tuned, w4a8_linear_triton

        global _tuned_loaded
        if not _tuned_loaded:  # this GPU's tuned configs (kernels/tuned/<name>.json), if shipped
            load_tuned()
            _tuned_loaded = True

        return w4a8_linear_triton(x, qweight, w_scales, log2_multiplier, group_size, bias, layout_block, epilogue,
                                  log2_multiplier2, residual)
    if layout_block:
        raise ValueError("the reference path reads the checkpoint layout (layout_block=0)")
    if fp8_path:
        return reference.w4a8_linear_fp8_ref(x, qweight, w_scales, log2_multiplier, group_size, bias, epilogue,
                                             log2_multiplier2, residual)
    return reference.w4a8_linear_ref(x, qweight, w_scales, log2_multiplier, group_size, bias, act_quant, epilogue,
                                     log2_multiplier2, residual)


# ----------------------------------------------------------------------------- torch.library ops
# The same functions as custom ops with fake (meta) implementations, so torch.compile and CUDA-graph
# capture trace through them without looking inside Triton. Eager code calls the plain functions (a
# custom op's dispatch costs microseconds a call, which decode-sized linears cannot afford); QuantLinear
# and the attention switch to these ops while torch.compile traces.


@torch.library.custom_op("fireq::w4a8_linear", mutates_args=())
def w4a8_linear_op(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int,
                   group_size: int, bias: Optional[torch.Tensor], act_quant: bool, layout_block: int,
                   fp8_min_tokens: int = 0) -> torch.Tensor:
    return w4a8_linear(x, qweight, w_scales, log2_multiplier, group_size, bias, act_quant, layout_block,
                       fp8_min_tokens=fp8_min_tokens)


@w4a8_linear_op.register_fake
def _w4a8_linear_fake(x, qweight, w_scales, log2_multiplier, group_size, bias, act_quant, layout_block,
                      fp8_min_tokens=0):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("fireq::w4a8_linear_gated", mutates_args=())
def w4a8_linear_gated_op(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int,
                         log2_multiplier2: int, group_size: int, bias: Optional[torch.Tensor], act_quant: bool,
                         layout_block: int, epilogue: str, fp8_min_tokens: int = 0) -> torch.Tensor:
    return w4a8_linear(x, qweight, w_scales, log2_multiplier, group_size, bias, act_quant, layout_block, epilogue,
                       log2_multiplier2, fp8_min_tokens=fp8_min_tokens)


@w4a8_linear_gated_op.register_fake
def _w4a8_linear_gated_fake(x, qweight, w_scales, log2_multiplier, log2_multiplier2, group_size, bias, act_quant,
                            layout_block, epilogue, fp8_min_tokens=0):
    return x.new_empty((*x.shape[:-1], qweight.shape[0] // 2))


@torch.library.custom_op("fireq::kv4_attention", mutates_args=())
def kv4_attention_op(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                     v: torch.Tensor, v_scale: torch.Tensor, sm_scale: float, causal: bool, window: int,
                     k_zero: Optional[torch.Tensor], v_zero: Optional[torch.Tensor], q_bias: Optional[torch.Tensor],
                     k_bias: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    from .attention_kv4 import kv4_attention_triton

    return kv4_attention_triton(q8, q_scale, k, k_scale, v, v_scale, sm_scale, causal, window, k_zero, v_zero,
                                q_bias, k_bias, out_dtype=out_dtype)


@kv4_attention_op.register_fake
def _kv4_attention_fake(q8, q_scale, k, k_scale, v, v_scale, sm_scale, causal, window, k_zero, v_zero, q_bias,
                        k_bias, out_dtype):
    return q8.new_empty(q8.shape, dtype=out_dtype)


def kv4_attention(q, k, v, scale, mask=None, q_bias=None, k_bias=None):
    """Attention over dequantized K/V (reference path). See reference.kv4_attention_ref."""
    return reference.kv4_attention_ref(q, k, v, scale, mask, q_bias, k_bias)
