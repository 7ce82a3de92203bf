"""The torch.library ops: schema and fake implementations (opcheck), and torch.compile tracing a
QuantLinear through them with fullgraph=True."""

from __future__ import annotations

import torch

from fireq.formats.int4 import quantize_int4
from fireq.nn.linear import QuantLinear
from fireq_kernels.ops import w4a8_linear_op


def _lin(scale_dtype="fp8"):
    g = torch.Generator().manual_seed(0)
    qw = quantize_int4(torch.randn(40, 96, generator=g) * 0.05, 32, scale_dtype)
    return QuantLinear.from_quantized(qw, torch.randn(40, generator=g), dtype=torch.float32), g


def test_opcheck_w4a8_linear():
    lin, g = _lin("bf16")  # (opcheck's schema check compares inputs with ops that FP8 lacks on the CPU)
    x = torch.randn(3, 5, 96, generator=g)
    torch.library.opcheck(w4a8_linear_op, (x, lin.qweight, lin.scales, 0, 32, lin.bias, True, 0))


def test_opcheck_w4a8_linear_gated():
    from fireq_kernels.gemm_w4a8 import interleave_gate_up
    from fireq_kernels.ops import w4a8_linear_gated_op

    lin, g = _lin("bf16")
    q, s = interleave_gate_up(lin.qweight, lin.qweight), interleave_gate_up(lin.scales, lin.scales)
    x = torch.randn(3, 96, generator=g)
    out = w4a8_linear_gated_op(x, q, s, 0, 1, 32, None, True, 0, "silu_mul")
    assert out.shape == (3, 40)
    torch.library.opcheck(w4a8_linear_gated_op, (x, q, s, 0, 1, 32, None, True, 0, "silu_mul"))


def test_compile_fullgraph_quant_linear():
    lin, g = _lin()
    x = torch.randn(7, 96, generator=g)
    eager = lin(x)  # one eager call first (reads log2_multiplier once, picks the weight layout)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)


def test_attention_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fireq_kernels.ops import kv4_attention_op

    with FakeTensorMode():
        q8 = torch.empty(2, 8, 5, 64, dtype=torch.float8_e4m3fn)
        k = torch.empty(2, 2, 9, 32, dtype=torch.uint8)
        ks = torch.empty(2, 2, 9, 1, dtype=torch.float8_e4m3fn)
        out = kv4_attention_op(q8, torch.empty(2, 8, 5), k, ks, k, ks, 0.125, True, 0, None, None, None, None,
                               torch.bfloat16)
    assert out.shape == (2, 8, 5, 64) and out.dtype == torch.bfloat16
