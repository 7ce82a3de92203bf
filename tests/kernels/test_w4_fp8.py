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


_CONVERT_CASES = [
    (40, 256, 128, 0, "fp8"), (36, 300, 64, 0, "fp8"), (64, 576, 128, 128, "fp8"),  # ragged last group / block
    (48, 192, -1, 64, "fp8"), (33, 130, 32, 0, "bf16"), (64, 384, 128, 128, "bf16"),
    (24, 600, 256, 0, "fp8"), (40, 1024, 512, 128, "fp8"),  # one ratio a row and tile (group >= tile)
    (32, 512, 64, 128, "fp8")]  # kernel layout, two groups a block: nibbles reordered in registers
_TILES = [None, dict(BN=8, C=128, num_warps=2), dict(BN=32, C=256, num_warps=4)]


def _fits(case, cfg):
    n, k, gs, lb, _ = case
    if cfg is None:
        return True
    g = k if gs <= 0 else gs
    return cfg["C"] % max(lb, 1) == 0 and (g >= k or g % cfg["C"] == 0 or cfg["C"] % g == 0)


@pytest.mark.parametrize("n,k,gs,lb,sdt,config", [(*c, t) for c in _CONVERT_CASES for t in _TILES if _fits(c, t)])
def test_int4_to_fp8_matches_twin_exactly(n, k, gs, lb, sdt, config):
    for seed in range(2):
        qw = _weights(n, k, gs, seed, sdt)
        w8_ref, rs_ref = int4_to_fp8_ref(qw.qweight, qw.scales, qw.log2_multiplier, k, gs)
        packed = repack_half(qw.qweight, k, lb) if lb else qw.qweight
        w8, rs = int4_to_fp8_triton(packed.to(DEV), qw.scales.to(DEV), qw.log2_multiplier, k, gs, lb, config)
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


def test_row_factors_follow_in_place_changes_of_the_scales():
    qw = _weights(32, 256, 128, 3)
    s = qw.scales.to(DEV)
    packed = qw.qweight.to(DEV)
    w8a, rsa = int4_to_fp8_triton(packed, s, qw.log2_multiplier, 256, 128)
    s.copy_((s.float() * 2).to(s.dtype))  # in place: the cached per-row factors must not be reused
    w8b, rsb = int4_to_fp8_triton(packed, s, qw.log2_multiplier, 256, 128)
    ref8, ref_rs = int4_to_fp8_ref(qw.qweight, s.cpu(), qw.log2_multiplier, 256, 128)
    assert torch.equal(rsb.cpu(), ref_rs) and torch.equal(rsb, rsa * 2)
    assert torch.equal(w8b.cpu().view(torch.uint8), ref8.view(torch.uint8))
    _, rsc = int4_to_fp8_triton(packed, s, qw.log2_multiplier + 1, 256, 128)  # another multiplier
    assert torch.equal(rsc, rsb / 2)


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


@pytest.mark.parametrize("epilogue,bias,residual,dtype,lb", [
    (None, False, False, torch.bfloat16, 128), (None, True, True, torch.float32, 0),
    ("silu_mul", True, False, torch.bfloat16, 128), ("gelu_tanh_mul", False, True, torch.float32, 64)])
def test_linear_fp8_matches_twin(epilogue, bias, residual, dtype, lb):
    """The whole linear on the FP8 path (quantize x, convert, rowwise FP8 GEMM, epilogue pass) against its twin
    and a float64 reference; the gated case over interleaved gate/up rows with two multipliers."""
    from fireq_kernels.gemm_w4a8 import interleave_gate_up
    from fireq_kernels.reference import w4a8_linear_fp8_ref
    from fireq_kernels.w4_fp8 import w4a8_linear_fp8

    m, n, k, gs = 24, 64, 256, 64 if lb == 64 else 128
    g = torch.Generator().manual_seed(11)
    if epilogue:
        a, b2 = _weights(n // 2, k, gs, 1), _weights(n // 2, k, gs, 2)
        qw = a
        q = interleave_gate_up(a.qweight, b2.qweight)
        s = interleave_gate_up(a.scales, b2.scales)
        e, e2 = a.log2_multiplier, b2.log2_multiplier + 1
        n_out = n // 2
    else:
        qw = _weights(n, k, gs, 3)
        q, s, e, e2, n_out = qw.qweight, qw.scales, qw.log2_multiplier, None, n
    x = torch.randn(m, k, generator=g).to(dtype)
    bvec = torch.randn(n, generator=g) * 0.2 if bias else None
    res = torch.randn(m, n_out, generator=g).to(dtype) if residual else None
    # references on DEV: CUDA's torch divides by a scalar through its reciprocal, as the quantization kernel does
    d = dict(bias=None if bvec is None else bvec.to(DEV), epilogue=epilogue, log2_multiplier2=e2,
             residual=None if res is None else res.to(DEV))
    ref = w4a8_linear_fp8_ref(x.to(DEV), q.to(DEV), s.to(DEV), e, gs, acc_dtype=torch.float64,
                              gemm_dtype=torch.float64, out_dtype=torch.float64, **d).cpu()
    twin = w4a8_linear_fp8_ref(x.to(DEV), q.to(DEV), s.to(DEV), e, gs, **d).cpu()
    packed = repack_half(q, k, lb) if lb else q
    got = w4a8_linear_fp8(x.to(DEV), packed.to(DEV), s.to(DEV), e, gs, d["bias"], lb, epilogue, e2, d["residual"]).cpu()
    assert got.shape == (m, n_out) and got.dtype == dtype and torch.isfinite(got).all()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    err_twin = ((twin.double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * err_twin + (FP8_MMA_ACC_RTOL if GPU else 1e-6), (err, err_twin)
    # and it is the INT4 linear within the re-rounding (at most 2^-4 of each weight; gate and up each move)
    from fireq_kernels.reference import w4a8_linear_ref

    exact = w4a8_linear_ref(x.double(), q, s, e, gs, bvec, True, epilogue, e2,
                            None if res is None else res.double())
    assert ((ref - exact).norm() / exact.norm()).item() < (0.06 if epilogue else 0.03)


def test_quantlinear_prefill_fp8_switch():
    """set_prefill_fp8: calls with at least min_tokens tokens take the FP8 path (its twin on the CPU), fewer the
    INT4 GEMM; 0 switches it off; the state dict does not change."""
    from torch import nn

    from fireq.nn.linear import QuantLinear, set_prefill_fp8
    from fireq_kernels.reference import w4a8_linear_fp8_ref, w4a8_linear_ref

    qw = _weights(48, 256, 128, 4)
    model = nn.Sequential(QuantLinear.from_quantized(qw, None, dtype=torch.float32))
    lin = model[0]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    x_small, x_big = torch.randn(1, 3, 256), torch.randn(2, 8, 256)
    assert set_prefill_fp8(model, 8) == 1 and lin.prefill_fp8 == 8 and "prefill_fp8=8" in repr(lin)
    assert torch.equal(lin(x_big), w4a8_linear_fp8_ref(x_big, qw.qweight, qw.scales, qw.log2_multiplier, 128))
    assert torch.equal(lin(x_small), w4a8_linear_ref(x_small, qw.qweight, qw.scales, qw.log2_multiplier, 128))
    set_prefill_fp8(model, False)
    assert torch.equal(lin(x_big), w4a8_linear_ref(x_big, qw.qweight, qw.scales, qw.log2_multiplier, 128))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="min_tokens"):
        set_prefill_fp8(model, -1)


def test_row_scale_search_never_worse_than_the_largest_scale():
    """fp8_row_factors with the code histogram picks, per row, the row scale with the least re-rounding error;
    max / 56 (no histogram) is one of its candidates, so no row gets worse, and in total the error drops."""
    from fireq.formats.int4 import unpack_int4
    from fireq_kernels.reference import code_histogram, fp8_row_factors

    qw = _weights(64, 512, 128, 7)
    codes = unpack_int4(qw.qweight, 512)
    deq = qw.dequantize(torch.float64)

    def row_err(hist):
        inv, rs = fp8_row_factors(qw.scales, qw.log2_multiplier, None, hist)
        ratio = qw.scales.float() * inv[:, None]
        w8 = (codes.float() * ratio.repeat_interleave(128, dim=1)).to(torch.float8_e4m3fn)
        return ((w8.double() * rs.double()[:, None] - deq) ** 2).sum(dim=1)

    plain, searched = row_err(None), row_err(code_histogram(codes, 128))
    assert (searched <= plain * (1 + 1e-9)).all()
    assert searched.sum() < 0.8 * plain.sum()


def test_fp8_path_applies_only_where_cublas_can_run_it():
    """The switch sends a call to the FP8 path only when it is on, the call has enough tokens, and K and N are
    multiples of 16 (cuBLAS's FP8 GEMM); otherwise the INT4 GEMM runs, whatever the switch says."""
    from torch import nn

    from fireq.nn.linear import QuantLinear, set_prefill_fp8
    from fireq_kernels.ops import fp8_path_applies
    from fireq_kernels.reference import w4a8_linear_ref

    assert fp8_path_applies(1024, 4096, 4096, 1024) and not fp8_path_applies(1023, 4096, 4096, 1024)
    assert not fp8_path_applies(4096, 4096, 4096, 0) and not fp8_path_applies(4096, 4104, 4096, 16)
    assert not fp8_path_applies(4096, 4096, 4100, 16)
    qw = _weights(40, 200, 64, 9)  # K = 200: not a multiple of 16
    model = nn.Sequential(QuantLinear.from_quantized(qw, None, dtype=torch.float32))
    set_prefill_fp8(model, 2)
    x = torch.randn(3, 200)
    assert torch.equal(model(x), w4a8_linear_ref(x, qw.qweight, qw.scales, qw.log2_multiplier, 64))
