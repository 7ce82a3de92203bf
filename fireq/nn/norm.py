"""FastRMSNorm: transformers' RMSNorm computed by one Triton kernel on the GPU (fireq_kernels.rmsnorm), the
same formula in PyTorch elsewhere. Swapped in at load for every RMSNorm whose output it reproduces
exactly on a probe (the check runs the original module and the replacement on the CPU); the state dict
keeps its keys (`weight`)."""

from __future__ import annotations

import torch
from torch import nn

from fireq_kernels.gemm_w4a8 import FP8_ATTR
from fireq_kernels.reference import rmsnorm_ref


class FastRMSNorm(nn.Module):
    """weight: (D,); eps; plus_one: the Gemma form x * rsqrt(mean(x^2) + eps) * (1 + weight)."""

    def __init__(self, weight: nn.Parameter, eps: float, plus_one: bool):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.plus_one = plus_one
        # set by mark_fp8_norms where the output feeds FP8-quantized linears: on an FP8 GPU the kernel also
        # writes the output's FP8 per-token quantization and hangs it on the output (attribute FP8_ATTR), which
        # w4a8_linear_triton then uses instead of quantizing the same tensor again
        self.emit_fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and not torch.compiler.is_compiling():
            from fireq_kernels.ops import triton_fp8_capable
            from fireq_kernels.rmsnorm import rmsnorm_triton

            if self.emit_fp8 and x.dtype in (torch.bfloat16, torch.float16) and triton_fp8_capable(x.device):
                out, q, s = rmsnorm_triton(x, self.weight, self.eps, self.plus_one, fp8=True)
                setattr(out, FP8_ATTR, (q, s, out._version))
                return out
            return rmsnorm_triton(x, self.weight, self.eps, self.plus_one)
        return rmsnorm_ref(x, self.weight, self.eps, self.plus_one)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, plus_one={self.plus_one}"


def _eps(m: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        v = getattr(m, name, None)
        if isinstance(v, float):
            return v
    return None


@torch.no_grad()
def _same_function(m: nn.Module, fast: FastRMSNorm) -> bool:
    d = m.weight.shape[0]
    g = torch.Generator().manual_seed(0)
    # explicit device: transformers may build the model under a meta-device context
    w = torch.randn(d, generator=g, device="cpu") * 0.1 + 1.0
    x = torch.randn(3, d, generator=g, device="cpu") * 3.0
    probe_w = nn.Parameter(w, requires_grad=False)
    old = m.weight
    try:
        m.weight = probe_w
        fast.weight = probe_w
        for dt in (torch.float32, torch.bfloat16):
            if not torch.equal(m(x.to(dt)), fast(x.to(dt))):
                return False
        return True
    finally:
        m.weight = old
        fast.weight = old


def swap_rms_norms(model: nn.Module) -> int:
    """Replace every RMSNorm module (a class named *RMSNorm with a (D,) weight and an eps) whose forward
    FastRMSNorm reproduces bit for bit on the CPU, in either form (checked with probe weights and inputs,
    so it works on empty models before their weights load). Returns how many were swapped."""
    n = 0
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, FastRMSNorm) or not type(m).__name__.endswith("RMSNorm"):
                continue
            w, eps = getattr(m, "weight", None), _eps(m)
            if not isinstance(w, torch.Tensor) or w.dim() != 1 or eps is None:
                continue
            for plus_one in (False, True):
                fast = FastRMSNorm(w, eps, plus_one)
                if _same_function(m, fast):
                    setattr(parent, name, fast)
                    n += 1
                    break
    return n


def mark_fp8_norms(model: nn.Module) -> int:
    """Have the FastRMSNorms whose outputs feed a layer's quantized linears with FP8 activations (the input
    norm before q/k/v; before the MLP, pre_feedforward_layernorm where the layer has one (Gemma), else
    post_attention_layernorm) emit their outputs' FP8 quantization. Returns how many were marked."""
    from ..models.registry import decoder_layers
    from .linear import QuantLinear

    def act_quant(m: nn.Module | None) -> bool:
        return m is not None and any(isinstance(c, QuantLinear) and c.act_quant for c in m.modules())

    n = 0
    for layer in decoder_layers(model):
        mlp_norm = "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else \
            "post_attention_layernorm"
        for name, consumer in (("input_layernorm", "self_attn"), (mlp_norm, "mlp")):
            norm = getattr(layer, name, None)
            if isinstance(norm, FastRMSNorm) and act_quant(getattr(layer, consumer, None)):
                norm.emit_fp8 = True
                n += 1
    return n
