"""Q, K and V projections as one GEMM on the GPU, with the attention modules' code untouched.

An attention layer calls q_proj(h), k_proj(h) and v_proj(h) on the same hidden states. At decode each of the
three is a small, latency-bound GEMM with its own activation quantization; as one (Nq + Nk + Nv, K) GEMM they
are one FP8 quantization of h and one launch that streams all the weights (fewer, larger tiles).

fuse_qkv(model) gives the three QuantLinears of every such layer one shared QKVFusion. On an FP8 GPU, the
first of the three calls on a tensor h computes the fused GEMM and returns its slice; the two other calls on
the same h object take theirs from it. Any other call (another input, the CPU, torch.compile tracing, no
activation quantization) runs the projection alone, so results never depend on the call order.

The fused weights are the three kernel-layout qweights concatenated (the projections keep views of it: one
copy). The three tensors may have different power-of-two multipliers 2^e; the fused GEMM uses the largest e,
with the other tensors' FP8 group scales multiplied by 2^(e_max - e) (exact unless a scale would pass 448, E4M3's
largest value; the search that picks e leaves most scales far below it: then that layer is not fused). State dict keys and tensors are those of the three QuantLinears.
"""

from __future__ import annotations

import torch
from torch import nn

from fireq_kernels.ops import triton_fp8_capable

from .linear import QuantLinear


class QKVFusion:
    """Shared by the q, k and v QuantLinears of one attention layer (not a module: no state of its own)."""

    def __init__(self, q: QuantLinear, k: QuantLinear, v: QuantLinear):
        self.lins = (q, k, v)
        self._fused: tuple | None = None  # (qweight, scales, bias, log2m, layout block, sizes, device)
        self._unfusable = False
        self._stash: tuple | None = None  # (input, {id(linear): its output slice})

    def reset(self) -> None:
        self._fused, self._unfusable, self._stash = None, False, None

    def applies(self, x: torch.Tensor) -> bool:
        return (not self._unfusable and self.lins[0].act_quant and triton_fp8_capable(x.device)
                and not torch.compiler.is_compiling())

    def _fuse(self, device: torch.device) -> tuple | None:
        lins = self.lins
        for m in lins:
            if m._log2m is None:
                m._log2m = int(m.log2_multiplier.item())
            m._to_kernel_layout()
        e = max(m._log2m for m in lins)
        scales = []
        for m in lins:
            s = m.scales
            if m._log2m != e:
                s2 = (s.float() * 2.0 ** (e - m._log2m)).to(s.dtype)
                if not torch.equal(s2.float() * 2.0 ** (m._log2m - e), s.float()):  # left E4M3's range
                    self._unfusable = True
                    return None
                s = s2
            scales.append(s)
        q = torch.cat([m.qweight for m in lins])
        sizes = [m.out_features for m in lins]
        offs = [0, sizes[0], sizes[0] + sizes[1]]
        for m, o, n in zip(lins, offs, sizes):  # the projections keep views: one copy of the weights
            m.qweight = q[o:o + n]
        b = None if lins[0].bias is None else torch.cat([m.bias for m in lins])
        self._fused = (q, torch.cat(scales), b, e, lins[0]._layout_block, sizes, device)
        return self._fused

    def __call__(self, lin: QuantLinear, x: torch.Tensor) -> torch.Tensor | None:
        """lin's output for x from the fused GEMM, or None (then lin runs alone)."""
        st = self._stash
        if st is not None:
            if st[0] is x and id(lin) in st[1]:
                y = st[1].pop(id(lin))
                if not st[1]:
                    self._stash = None
                return y
            self._stash = None
        fused = self._fused
        if fused is None or fused[-1] != x.device:
            fused = self._fuse(x.device)
            if fused is None:
                return None
        from fireq_kernels import w4a8_linear

        q, s, b, e, lb, sizes, _ = fused
        q0 = self.lins[0]
        y = w4a8_linear(x, q, s, e, q0.group_size, b, True, lb, fp8_min_tokens=q0.prefill_fp8)
        parts = dict(zip((id(m) for m in self.lins), y.split(sizes, dim=-1)))
        out = parts.pop(id(lin))
        self._stash = (x, parts)
        return out


def fuse_qkv(model: nn.Module) -> int:
    """Give the q/k/v QuantLinears of every attention module (same input size, group size, scale dtype and
    activation quantization, biases all present or all absent) one QKVFusion. Returns how many layers."""
    n = 0
    for mod in model.modules():
        lins = [getattr(mod, a, None) for a in ("q_proj", "k_proj", "v_proj")]
        if not all(isinstance(m, QuantLinear) for m in lins) or any(m._qkv is not None for m in lins):
            continue
        keys = {(m.in_features, m.group_size, m.scales.dtype, m.bias is None, m.act_quant) for m in lins}
        if len(keys) != 1:
            continue
        f = QKVFusion(*lins)
        for m in lins:
            m._qkv = f
        n += 1
    return n
