"""QuantGatedMLP: a gated MLP (SwiGLU / GeGLU) over QuantLinears whose gate and up projections run as one
GEMM on the GPU, with the activation and the product in the GEMM's epilogue.

    y = down(act(gate(x)) * up(x))

On an FP8 GPU the gate and up weights (already in the kernel layout) are interleaved row by row into one
(2I, K/2) tensor (row 2i: gate channel i, row 2i + 1: up channel i; the scales alike), and gate_proj and
up_proj keep strided views of it, so the weights are stored once. One launch quantizes x to FP8, one
GEMM computes act(x W_gate^T) * (x W_up^T) in FP32 from its accumulators (each half with its own
power-of-two multiplier), then down_proj. Elsewhere (CPU, older GPUs, no activation quantization) the
module computes the unfused expression above with its submodules. State dict keys and tensors are those
of the three QuantLinears (the checkpoint layout).
"""

from __future__ import annotations

import torch
from torch import nn

from fireq_kernels import w4a8_linear
from fireq_kernels.ops import triton_fp8_capable

from .linear import QuantLinear

# transformers' activation classes by the epilogue that computes them
_EPILOGUE_OF = {"SiLU": "silu_mul", "SiLUActivation": "silu_mul", "GELUTanh": "gelu_tanh_mul",
                "PytorchGELUTanh": "gelu_tanh_mul", "NewGELUActivation": "gelu_tanh_mul"}


def gated_epilogue(act: nn.Module) -> str | None:
    """The GEMM epilogue computing `act` (checked numerically against its formula), or None."""
    from fireq_kernels.reference import gated_act_ref

    epi = _EPILOGUE_OF.get(type(act).__name__)
    if epi is None:
        return None
    t = torch.linspace(-8, 8, 257)
    with torch.no_grad():
        ok = torch.allclose(act(t), gated_act_ref(t, epi), rtol=1e-5, atol=1e-6)
    return epi if ok else None


class QuantGatedMLP(nn.Module):
    """down_proj(act_fn(gate_proj(x)) * up_proj(x)) with gate_proj/up_proj fused on the GPU (module
    docstring). gate_proj, up_proj, down_proj: QuantLinear; act_fn: the model's activation module;
    epilogue: "silu_mul" or "gelu_tanh_mul" (gated_epilogue(act_fn))."""

    def __init__(self, gate_proj: QuantLinear, up_proj: QuantLinear, down_proj: nn.Module, act_fn: nn.Module,
                 epilogue: str):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn
        self.epilogue = epilogue
        self._fused: tuple | None = None  # (qweight (2I, .), scales (2I, G), bias or None, layout block)

    def _fuse(self) -> tuple:
        from fireq_kernels.gemm_w4a8 import interleave_gate_up

        g, u = self.gate_proj, self.up_proj
        g._to_kernel_layout()
        u._to_kernel_layout()
        q = interleave_gate_up(g.qweight, u.qweight)
        s = interleave_gate_up(g.scales, u.scales)
        # the gated epilogue adds the bias before each half's 2^-e (reference.w4a8_gemm_ref): pre-scaled here
        # so that the fused layer adds the projections' own biases (exact: powers of two)
        b = None if g.bias is None else interleave_gate_up(g.bias.float() * 2.0 ** g._log2m,
                                                           u.bias.float() * 2.0 ** u._log2m).to(g.bias.dtype)
        # the projections keep views: one copy of the weights
        g.qweight, u.qweight = q[0::2], q[1::2]
        g.scales, u.scales = s[0::2], s[1::2]
        self._fused = (q, s, b, g._layout_block)
        return self._fused

    def _fusable(self, x: torch.Tensor) -> bool:
        return self.gate_proj.act_quant and triton_fp8_capable(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        if torch.compiler.is_compiling():  # traced: the torch.library op (run one eager forward first)
            if self._fused is None:
                return self.down_proj(self.act_fn(g(x)) * u(x))
            from fireq_kernels.ops import w4a8_linear_gated_op

            q, s, b, lb = self._fused
            h = w4a8_linear_gated_op(x, q, s, g._log2m, u._log2m, g.group_size, b, True, lb, self.epilogue,
                                     g.prefill_fp8)
            return self.down_proj(h)
        if not self._fusable(x):
            return self.down_proj(self.act_fn(g(x)) * u(x))
        for m in (g, u):
            if m._log2m is None:
                m._log2m = int(m.log2_multiplier.item())
        fused = self._fused
        if fused is None or fused[0].device != x.device:
            fused = self._fuse()
        q, s, b, lb = fused
        h = w4a8_linear(x, q, s, g._log2m, g.group_size, b, True, lb, self.epilogue, u._log2m,
                        fp8_min_tokens=g.prefill_fp8)
        return self.down_proj(h)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fused = None  # the projections load fresh tensors: fuse again at the next GPU forward
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"epilogue={self.epilogue}"


def fuse_gated_mlps(model: nn.Module) -> int:
    """Swap every `mlp` whose gate/up/down projections are QuantLinears (same input size, group size and
    scale dtype, biases alike) and whose activation an epilogue computes for a QuantGatedMLP holding the
    same submodules (state dict unchanged). Returns how many were swapped."""
    n = 0
    for parent in list(model.modules()):
        mlp = getattr(parent, "mlp", None)
        if mlp is None or isinstance(mlp, QuantGatedMLP):
            continue
        g, u, d = (getattr(mlp, a, None) for a in ("gate_proj", "up_proj", "down_proj"))
        act = getattr(mlp, "act_fn", None)
        if not (isinstance(g, QuantLinear) and isinstance(u, QuantLinear) and d is not None and act is not None):
            continue
        if (g.in_features, g.out_features, g.group_size, g.scales.dtype, g.bias is None, g.act_quant) != (
                u.in_features, u.out_features, u.group_size, u.scales.dtype, u.bias is None, u.act_quant):
            continue
        epi = gated_epilogue(act)
        if epi is None:
            continue
        parent.mlp = QuantGatedMLP(g, u, d, act, epi)
        n += 1
    return n
