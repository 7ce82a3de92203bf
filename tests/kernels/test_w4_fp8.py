"""The FP8 prefill path: INT4 -> FP8 row re-rounding (bit for bit against its twin) and the whole GEMM against
a float64 reference of the same operands."""

from __future__ import annotations

import pytest
import torch

from fireq.formats.int4 import quantize_int4
from fireq_kernels.gemm_w4a8 import FP8_MMA_ACC_RTOL, repack_half
from fireq_kernels.reference import int4_to_fp8_ref, quantize_fp8_rows_ref, w4a8_prefill_fp8_ref
from fireq_kernels.w4_fp8 import int4_to_fp8_triton, w4a8_prefill_fp8

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _weights(n, k, gs, seed, scale_dtype="fp8"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, ::7] *= 4.0  # uneven groups: the ratios span several binades
    return quantize_int4(w, gs, scale_dtype)


@pytest.mark.parametrize("n,k,gs,lb,sdt", [
    (40, 256, 128, 0, "fp8"), (36, 300, 64, 0, "fp8"), (64, 576, 128, 128, "fp8"),  # ragged last group / block
    (48, 192, -1, 64, "fp8"), (33, 130, 32, 0, "bf16"), (64, 384, 128, 128, "bf16"),
    (24, 600, 256, 0, "fp8"), (40, 1024, 512, 128, "fp8")])  # one ratio a row and tile (group >= tile)
def test_int4_to_fp8_matches_twin_exactly(n, k, gs, lb, sdt):
    for seed in range(2):
        qw = _weights(n, k, gs, seed, sdt)
        w8_ref, rs_ref = int4_to_fp8_ref(qw.qweight, qw.scales, qw.log2_multiplier, k, gs)
        packed = repack_half(qw.qweight, k, lb) if lb else qw.qweight
        w8, rs = int4_to_fp8_triton(packed.to(DEV), qw.scales.to(DEV), qw.log2_multiplier, k, gs, lb)
        assert torch.equal(rs.cpu(), rs_ref)
        assert torch.equal(w8.cpu().view(torch.uint8), w8_ref.view(torch.uint8))
        # the re-rounded weight is the dequantized one within E4M3's half step (2^-4 relative)
        deq = qw.dequantize(torch.float64)
        approx = w8_ref.double() * rs_ref.double()[:, None]
        assert ((approx - deq).abs() <= deq.abs() * 2.0**-4 + 1e-12).all()


@pytest.mark.parametrize("m,n,k,gs,lb", [(37, 48, 256, 128, 0), (64, 32, 384, 128, 128), (5, 64, 192, 64, 64)])
def test_prefill_fp8_matches_float64(m, n, k, gs, lb):
    for seed in range(2):
        qw = _weights(n, k, gs, seed + 5)
        g = torch.Generator().manual_seed(seed + 50)
        x = torch.randn(m, k, generator=g)
        b = torch.randn(n, generator=g) * 0.1 if seed else None
        xq, xs = quantize_fp8_rows_ref(x)
        ref = w4a8_prefill_fp8_ref(xq, xs, qw.qweight, qw.scales, qw.log2_multiplier, gs, b, torch.float64,
                                   torch.float64)
        # the twin at the path's output precision (cuBLAS's rowwise-scaled FP8 GEMM writes bf16)
        twin = w4a8_prefill_fp8_ref(xq, xs, qw.qweight, qw.scales, qw.log2_multiplier, gs, b, torch.bfloat16,
                                    torch.float32)
        packed = repack_half(qw.qweight, k, lb) if lb else qw.qweight
        got = w4a8_prefill_fp8(xq.to(DEV), xs.to(DEV), packed.to(DEV), qw.scales.to(DEV), qw.log2_multiplier, gs,
                               None if b is None else b.to(DEV), torch.float32, lb).cpu()
        assert got.shape == (m, n) and torch.isfinite(got).all()
        err = ((got.double() - ref).norm() / ref.norm()).item()
        err_twin = ((twin.double() - ref).norm() / ref.norm()).item()
        assert err <= 2 * err_twin + (FP8_MMA_ACC_RTOL if GPU else 0.0), (err, err_twin)


def test_prefill_fp8_rejects_bad_input():
    qw = _weights(40, 256, 128, 1)
    xq, xs = quantize_fp8_rows_ref(torch.randn(4, 256))
    with pytest.raises(ValueError, match="multiples of 16"):
        w4a8_prefill_fp8(xq.to(DEV), xs.to(DEV), qw.qweight.to(DEV), qw.scales.to(DEV), qw.log2_multiplier, 128)
    with pytest.raises(ValueError, match="bytes a row"):
        int4_to_fp8_triton(qw.qweight[:, :-1].contiguous().to(DEV), qw.scales.to(DEV), 0, 256, 128)
    with pytest.raises(ValueError, match="group size"):
        q96 = _weights(8, 384, 96, 2)
        int4_to_fp8_triton(q96.qweight.to(DEV), q96.scales.to(DEV), 0, 384, 96)
    with pytest.raises(TypeError):
        w4a8_prefill_fp8(xq.float().to(DEV), xs.to(DEV), qw.qweight.to(DEV), qw.scales.to(DEV), 0, 128)
