"""QuantLinear: a linear layer computing from packed INT4 weights and FP8 per-token activations.

No full-precision copy of the weight is kept: the forward unpacks on the fly (reference path) or the
Triton kernel converts nibbles to FP8 in registers.
"""

from __future__ import annotations

import torch
from torch import nn

from fireq_kernels import w4a8_linear
from fireq_kernels.ops import triton_fp8_capable

from ..formats.int4 import QuantizedWeight, n_groups, pack_int4


def kernel_layout_block(group_size: int) -> int:
    """Block of the GEMM kernel's nibble layout for a group size (0: keep the checkpoint layout; FP8
    MMAs over half-blocks need >= 32 channels)."""
    return 128 if group_size in (-1, 0) or group_size >= 128 else (group_size if group_size >= 64 else 0)


class QuantLinear(nn.Module):
    """y = fp8(x) @ (q * s / 2^e)^T + b.

    Buffers (the checkpoint's tensors, by name):
      qweight: (out_features, ceil(in_features / 2)) uint8, two INT4 nibbles a byte, even k low
      scales: (out_features, n_groups) float8_e4m3fn or bfloat16, one per group of `group_size` inputs
      log2_multiplier: (1,) int32, e of the per-tensor power-of-two multiplier m = 2^e
      bias: (out_features,) or absent
    On the first forward on an FP8 GPU, qweight is repacked in place into the GEMM kernel's layout
    (fireq_kernels.gemm_w4a8.repack_half: no register interleave in the kernel); state_dict() still
    writes the checkpoint layout, and quantized_weight() returns it.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int = 128,
                 scale_dtype: str = "fp8", act_quant: bool = True, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.act_quant = act_quant
        sdt = torch.float8_e4m3fn if scale_dtype == "fp8" else torch.bfloat16
        self.register_buffer("qweight", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(out_features, n_groups(in_features, group_size), dtype=sdt,
                                                   device=device))
        self.register_buffer("log2_multiplier", torch.zeros(1, dtype=torch.int32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        self._log2m: int | None = None
        self._layout_block = 0  # > 0: qweight holds the kernel layout with this block
        self.prefill_fp8 = 0  # > 0: calls with at least this many tokens take the FP8 prefill path (set_prefill_fp8)
        self._qkv = None  # a fireq.nn.qkv.QKVFusion shared with the layer's other projections, or None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None, act_quant: bool = True,
                       dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        m = cls(qw.in_features, qw.qweight.shape[0], bias is not None, qw.group_size,
                "fp8" if qw.scales.dtype == torch.float8_e4m3fn else "bf16", act_quant, dtype,
                qw.qweight.device)
        m.qweight.copy_(qw.qweight)
        m.scales.copy_(qw.scales)
        m.log2_multiplier.fill_(qw.log2_multiplier)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def checkpoint_qweight(self) -> torch.Tensor:
        """qweight in the checkpoint layout, whatever layout the module holds now."""
        if not self._layout_block:
            return self.qweight
        from fireq_kernels.gemm_w4a8 import unpack_half

        return pack_int4(unpack_half(self.qweight, self.in_features, self._layout_block))

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.checkpoint_qweight(), self.scales, int(self.log2_multiplier.item()),
                               self.in_features, self.group_size)

    def _to_kernel_layout(self) -> None:
        lb = kernel_layout_block(self.group_size)
        if lb and not self._layout_block:
            from fireq_kernels.gemm_w4a8 import repack_half

            self.qweight = repack_half(self.qweight, self.in_features, lb)
            self._layout_block = lb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._log2m is None:  # read once: .item() would sync the GPU every call
            self._log2m = int(self.log2_multiplier.item())
        if torch.compiler.is_compiling():  # traced: the torch.library op, no module state changes
            from fireq_kernels.ops import w4a8_linear_op  # (run one eager forward first: layout, log2m)

            return w4a8_linear_op(x, self.qweight, self.scales, self._log2m, self.group_size, self.bias,
                                  self.act_quant, self._layout_block, self.prefill_fp8)
        if self._qkv is not None and self._qkv.applies(x):
            y = self._qkv(self, x)
            if y is not None:
                return y
        if self.act_quant and triton_fp8_capable(x.device):
            self._to_kernel_layout()
        elif self._layout_block:  # moved off the GPU: back to the layout the reference path reads
            self.qweight = self.checkpoint_qweight()
            self._layout_block = 0
        return w4a8_linear(x, self.qweight, self.scales, self._log2m, self.group_size, self.bias, self.act_quant,
                           layout_block=self._layout_block, fp8_min_tokens=self.prefill_fp8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._layout_block or not self.qweight.is_contiguous():
            destination[prefix + "qweight"] = self.checkpoint_qweight().contiguous()
        if not self.scales.is_contiguous():  # a view of a fused gate/up tensor (QuantGatedMLP)
            destination[prefix + "scales"] = self.scales.contiguous()

    def _load_from_state_dict(self, *args, **kwargs):
        self._log2m = None
        if self._qkv is not None:  # fresh tensors: fuse again at the next GPU forward
            self._qkv.reset()
        if self._layout_block:  # the incoming tensor is in the checkpoint layout
            self.qweight = torch.empty(self.out_features, (self.in_features + 1) // 2, dtype=torch.uint8,
                                       device=self.qweight.device)
            self._layout_block = 0
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        fp8 = f", prefill_fp8={self.prefill_fp8}" if self.prefill_fp8 else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"scales={self.scales.dtype}, act_quant={self.act_quant}{fp8}")


PREFILL_FP8_MIN_TOKENS = 1024  # where the FP8 path overtook the INT4 GEMM on the H200 (prefill-fp8-h200.json)


def set_prefill_fp8(model: nn.Module, min_tokens: int | bool = True) -> int:
    """Let every QuantLinear of `model` run calls of at least `min_tokens` tokens (True: PREFILL_FP8_MIN_TOKENS;
    False or 0: never) on the FP8 prefill path: INT4 weights re-rounded to FP8 E4M3 with one scale a row, then
    an FP8 GEMM with no per-group rescale (kernels/w4_fp8.py). Faster at prefill, not the same numbers: the
    re-rounding is a second weight rounding (measured in benchmarks/results/). Decode (few tokens) is not
    affected. Returns how many layers were set."""
    if isinstance(min_tokens, bool):
        min_tokens = PREFILL_FP8_MIN_TOKENS if min_tokens else 0
    if min_tokens < 0:
        raise ValueError(f"set_prefill_fp8: min_tokens must be >= 0, got {min_tokens}")
    n = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            mod.prefill_fp8 = int(min_tokens)
            n += 1
    return n


class FakeQuantLinear(nn.Module):
    """Quantize-dequantize twin of QuantLinear in floating point: the dequantized weight is kept and the
    input is FP8 fake-quantized per token. Used to check that the packed path computes the same model."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_quant: bool = True):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.act_quant = act_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = (q_x @ W_hat^T) * s_x + b with (q_x, s_x) the per-token FP8 quantization of x: the scale is
        applied after the product, as the kernels do (x_hat @ W_hat^T rounds differently in float32, and
        per-token FP8 rounding downstream amplifies such last-bit differences)."""
        from ..formats.fp8 import quantize_fp8_rows

        b = None if self.bias is None else self.bias.float()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.act_quant:
            q, s = quantize_fp8_rows(x2)
            y = (q.float() @ self.weight.float().t()) * s
        else:
            y = x2.float() @ self.weight.float().t()
        if b is not None:
            y = y + b
        return y.to(x.dtype).reshape(*shape[:-1], -1)
