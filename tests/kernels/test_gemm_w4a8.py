"""The Triton W4A8 GEMM and activation quantization against float64 references.

On a CPU-only machine these run under TRITON_INTERPRET=1 (set in conftest) at small sizes; on a GPU
with FP8 (sm_89+) natively, also at full size. The kernel's error against the float64 reference on the
same quantized operands must be within 2x of the PyTorch twin's (FP32 accumulation)."""

from __future__ import annotations

import pytest
import torch

from fireq.formats.int4 import quantize_int4
from fireq_kernels.gemm_w4a8 import FP8_MMA_ACC_RTOL, quantize_fp8_rows_triton, w4a8_gemm_triton, w4a8_linear_triton
from fireq_kernels.reference import quantize_fp8_rows_ref, w4a8_gemm_ref, w4a8_linear_ref

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEV = "cuda" if GPU else "cpu"
if not GPU and not __import__("os").environ.get("TRITON_INTERPRET"):
    pytest.skip("needs an FP8 GPU or TRITON_INTERPRET=1", allow_module_level=True)


def _cfg(swap, split, bk, bm=16, bn=32):
    return dict(SWAP=swap, BM=bm, BN=bn, BK=bk, SPLIT_K=split, GROUP_M=4, num_warps=4, num_stages=2)


def _operands(m, n, k, gs, seed, bias=True, scale_dtype="fp8"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(DEV)
    w = torch.randn(n, k, generator=g) * 0.03
    qw = quantize_int4(w, gs, scale_dtype)
    b = (torch.randn(n, generator=g) * 0.1).to(DEV) if bias else None
    return x, qw.qweight.to(DEV), qw.scales.to(DEV), qw.log2_multiplier, b


@pytest.mark.parametrize("m,k", [(1, 64), (7, 300), (33, 576), (128, 4096)] if not GPU else
                         [(1, 4096), (17, 14336), (4096, 4096)])
def test_activation_quant_exact(m, k):
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * 3).to(DEV)
    x[0, :5] = 0.0
    q, s = quantize_fp8_rows_triton(x)
    qr, sr = quantize_fp8_rows_ref(x)
    assert torch.equal(s, sr)
    assert torch.equal(q.float(), qr.float())


def test_activation_quant_keeps_nan():
    """A NaN in a row stays NaN in its FP8 codes, as in the PyTorch quantizer (a plain GPU min/max would turn it
    into -448, a finite wrong value), and on the GPU the row's W4A8 GEMM output is NaN, not plausible garbage."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(3, 256, generator=g) * 3).to(DEV)
    x[1, 7] = float("nan")
    q, s = quantize_fp8_rows_triton(x)
    assert q[1, 7].float().isnan() and not q[[0, 2]].float().isnan().any()
    assert torch.equal(q[[0, 2]].float(), quantize_fp8_rows_ref(x[[0, 2]])[0].float())
    _, qw, ws, e, _ = _operands(3, 64, 256, 128, seed=9, bias=False)
    y = w4a8_gemm_triton(q, s, qw, ws, e, 128)
    assert y[[0, 2]].float().isfinite().all()
    if GPU:  # (the CPU interpreter's FP8 -> float casts read E4M3's NaN byte as a number)
        assert y[1].float().isnan().all()


CASES = [
    # m, n, k, group, config
    (1, 40, 256, 128, _cfg(True, 2, 128)),
    (3, 64, 576, 128, _cfg(True, 1, 128)),  # K not a multiple of the group: ragged last group
    (5, 48, 200, 64, _cfg(True, 3, 64)),
    (20, 72, 192, 32, _cfg(False, 1, 32)),
    (37, 64, 130, -1, _cfg(False, 1, 64)),  # per-channel, odd tile edges
    (9, 64, 256, 128, dict(_cfg(False, 1, 128), DEQ16=True)),  # fp16-dequant path
    (9, 64, 384, 64, dict(_cfg(True, 2, 64), DEQ16=True)),
    (16, 96, 512, 256, _cfg(True, 2, 128)),
    # the CUDA-core decode path (M <= 16), with and without the in-kernel split-K reduction
    (1, 40, 256, 128, dict(GEMV=True, BN=16, BK=128, SPLIT_K=2, num_warps=4, num_stages=2)),
    (1, 72, 577, 64, dict(GEMV=True, BN=32, BK=256, SPLIT_K=2, num_warps=4, num_stages=2)),  # odd K, 4 groups a tile
    (1, 64, 192, -1, dict(GEMV=True, BN=16, BK=64, SPLIT_K=1, num_warps=4, num_stages=2)),  # per-channel
    (1, 48, 256, 64, dict(GEMV=True, BN=16, BK=32, SPLIT_K=4, num_warps=4, num_stages=2)),
    (1, 40, 640, 128, dict(GEMV=True, BN=8, BK=512, SPLIT_K=2, num_warps=4, num_stages=2)),
    (5, 48, 384, 64, dict(_cfg(True, 3, 64), FUSED=False)),  # split-K partials summed outside
    (70, 100, 256, 128, dict(_cfg(True, 1, 128), PERSIST=1)),  # persistent: more tiles than programs
    (45, 64, 192, 64, dict(_cfg(False, 1, 64), PERSIST=1)),
]


@pytest.mark.parametrize("m,n,k,gs,cfg", CASES)
def test_gemm_matches_float64(m, n, k, gs, cfg):
    if GPU and not cfg.get("GEMV"):
        cfg = dict(cfg, BM=max(cfg["BM"], 16), BN=max(cfg["BN"], 64), num_stages=3)
    for seed in range(2):  # fresh random inputs each check
        x, qweight, scales, e, b = _operands(m, n, k, gs, seed)
        xq, xs = quantize_fp8_rows_ref(x)
        ref = w4a8_gemm_ref(xq, xs, qweight, scales, e, gs, b, torch.float64, torch.float64)
        twin = w4a8_gemm_ref(xq, xs, qweight, scales, e, gs, b, torch.float32, torch.float32)
        got = w4a8_gemm_triton(xq, xs, qweight, scales, e, gs, b, torch.float32, config=cfg)
        assert torch.isfinite(got).all()
        err = (got.double() - ref).norm() / ref.norm()
        err_twin = (twin.double() - ref).norm() / ref.norm()
        # the interpreter computes the dot exactly; the GPU's FP8 MMA accumulates in ~14 bits
        assert err <= 2 * err_twin + (FP8_MMA_ACC_RTOL if GPU else 1e-7), (err, err_twin)


def test_poisoned_output_fully_written(monkeypatch):
    """Every output element is written: the kernel's output buffer starts as NaN."""
    real_empty = torch.empty

    def poisoned(*a, **k):
        t = real_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    from fireq_kernels.gemm_w4a8 import repack_half

    for m, cfg, lb in ((9, _cfg(False, 1, 128), 0), (5, _cfg(True, 3, 128), 128),  # fused split-K partials
                       (1, dict(GEMV=True, BN=16, BK=256, SPLIT_K=2, num_warps=4, num_stages=2), 128)):
        x, qweight, scales, e, b = _operands(m, 80, 384, 128, 5)
        xq, xs = quantize_fp8_rows_ref(x)
        w = repack_half(qweight, 384, lb) if lb else qweight
        got = w4a8_gemm_triton(xq, xs, w, scales, e, 128, b, torch.float32, config=cfg, layout_block=lb)
        assert torch.isfinite(got).all(), cfg


def test_linear_bf16_end_to_end():
    x, qweight, scales, e, b = _operands(6, 64, 256, 128, 9)
    x = x.to(torch.bfloat16)
    got = w4a8_linear_triton(x, qweight, scales, e, 128, b.to(torch.bfloat16))
    ref = w4a8_linear_ref(x.double(), qweight, scales, e, 128, b.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - ref).norm() / ref.norm()) < 1e-2  # bf16 output rounding


def test_launcher_rejects_bad_input():
    x, qweight, scales, e, b = _operands(4, 32, 256, 128, 1)
    xq, xs = quantize_fp8_rows_ref(x)
    with pytest.raises(ValueError):
        w4a8_gemm_triton(xq, xs, qweight[:, :-1], scales, e, 128, b)
    with pytest.raises(TypeError):
        w4a8_gemm_triton(xq.float(), xs, qweight, scales, e, 128, b)


HALF_CASES = [
    # m, n, k, group, layout block, config
    (1, 40, 300, 128, 128, dict(GEMV=True, BN=16, BK=512, SPLIT_K=2, num_warps=4, num_stages=2)),
    (1, 48, 256, 64, 64, dict(GEMV=True, BN=16, BK=64, SPLIT_K=1, num_warps=4, num_stages=2)),
    (4, 64, 576, 128, 128, _cfg(True, 2, 128)),  # ragged last block (576 = 4.5 x 128)
    (21, 64, 256, -1, 64, _cfg(False, 1, 64)),  # per-channel
    (9, 96, 384, 64, 64, dict(_cfg(True, 3, 64), FUSED=False)),
    (1, 40, 384, 128, 128, dict(GEMV=True, BN=16, BK=256, SPLIT_K=1, num_warps=4, num_stages=2, SCALES="bf16")),
    (6, 64, 256, 128, 128, dict(_cfg(True, 2, 128), SCALES="bf16")),
    (20, 64, 256, 64, 64, dict(_cfg(False, 1, 64), SCALES="bf16")),
    (19, 64, 640, 128, 128, _cfg(False, 1, 128)),
    (5, 64, 576, 64, 64, _cfg(True, 2, 64)),
    (70, 128, 384, 128, 128, dict(_cfg(True, 1, 128), PERSIST=1)),
    (4, 64, 1024, 128, 128, dict(_cfg(True, 2, 128), UNROLL=2)),  # two K tiles an iteration, 4 a split
    (3, 64, 640, 128, 128, dict(_cfg(True, 1, 128), UNROLL=2)),  # 5 tiles: falls back to UNROLL=1
    # wide K tiles (16 groups a tile), no pipelining, ragged last block
    (1, 40, 2500, 128, 128, dict(GEMV=True, BN=4, BK=2048, SPLIT_K=1, num_warps=4, num_stages=1)),
]


@pytest.mark.parametrize("m,n,k,gs,lb,cfg", HALF_CASES)
def test_gemm_kernel_layout_matches_float64(m, n, k, gs, lb, cfg):
    from fireq_kernels.gemm_w4a8 import repack_half, unpack_half
    from fireq.formats.int4 import unpack_int4

    cfg = dict(cfg)
    sdt = cfg.pop("SCALES", "fp8")
    if GPU and not cfg.get("GEMV"):
        cfg = dict(cfg, BM=max(cfg["BM"], 16), BN=max(cfg["BN"], 64), num_stages=3)
    for seed in range(2):
        x, qweight, scales, e, b = _operands(m, n, k, gs, seed + 10, scale_dtype=sdt)
        half = repack_half(qweight, k, lb)
        assert torch.equal(unpack_half(half, k, lb), unpack_int4(qweight, k))  # exact round trip
        xq, xs = quantize_fp8_rows_ref(x)
        ref = w4a8_gemm_ref(xq, xs, qweight, scales, e, gs, b, torch.float64, torch.float64)
        twin = w4a8_gemm_ref(xq, xs, qweight, scales, e, gs, b, torch.float32, torch.float32)
        got = w4a8_gemm_triton(xq, xs, half, scales, e, gs, b, torch.float32, config=cfg, layout_block=lb)
        err = (got.double() - ref).norm() / ref.norm()
        err_twin = (twin.double() - ref).norm() / ref.norm()
        assert err <= 2 * err_twin + (FP8_MMA_ACC_RTOL if GPU else 1e-7), (err, err_twin)


@pytest.mark.parametrize("m,n,k,gs,lb,cfg", [c for c in HALF_CASES if not c[5].get("GEMV") and c[3] != -1])
def test_scale_prefetch_is_bit_identical(m, n, k, gs, lb, cfg, monkeypatch):
    # the group scales loaded one K tile ahead (GEMM_SCALE_PREFETCH) give the very same output as loading
    # them in their own iteration, with splits, ragged K and both scale dtypes
    import fireq_kernels.gemm_w4a8 as G

    cfg = dict(cfg)
    sdt = cfg.pop("SCALES", "fp8")
    if GPU:
        cfg = dict(cfg, BM=max(cfg["BM"], 16), BN=max(cfg["BN"], 64), num_stages=3)
    x, qweight, scales, e, b = _operands(m, n, k, gs, 31, scale_dtype=sdt)
    half = G.repack_half(qweight, k, lb)
    xq, xs = quantize_fp8_rows_ref(x)
    outs = []
    for on in (True, False):
        monkeypatch.setattr(G, "GEMM_SCALE_PREFETCH", on)
        outs.append(w4a8_gemm_triton(xq, xs, half, scales, e, gs, b, torch.float32, config=cfg, layout_block=lb))
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


EPI_CASES = [
    # m, n (gate = up channels), k, group, layout block, config
    (1, 40, 256, 128, 0, dict(GEMV=True, BN=16, BK=128, SPLIT_K=1, num_warps=4, num_stages=2)),
    (1, 48, 384, 128, 128, dict(GEMV=True, BN=32, BK=256, SPLIT_K=2, num_warps=4, num_stages=2)),
    (3, 40, 576, 128, 128, _cfg(True, 1, 128)),
    (5, 48, 384, 64, 64, _cfg(True, 3, 64)),  # split-K: the last program gates the sum
    (5, 48, 384, 64, 64, dict(_cfg(True, 3, 64), FUSED=False)),  # (forced in-kernel: the gate needs the sum)
    (20, 36, 192, 32, 0, _cfg(False, 1, 32)),  # plain schedule, checkpoint layout
    (19, 64, 256, -1, 64, _cfg(False, 1, 64)),  # per-channel
    (40, 80, 256, 128, 128, dict(_cfg(True, 1, 128), PERSIST=1)),  # persistent
    (1, 40, 1100, 128, 128, dict(GEMV=True, BN=4, BK=1024, SPLIT_K=2, num_warps=4, num_stages=1)),  # wide tiles
]


def _gate_up(m, n, k, gs, seed):
    from fireq_kernels.gemm_w4a8 import interleave_gate_up

    x, qg, sg, eg, bg = _operands(m, n, k, gs, seed)
    _, qu, su, eu, bu = _operands(m, n, k, gs, seed + 100)
    return (x, interleave_gate_up(qg, qu), interleave_gate_up(sg, su), eg, eu + (seed % 2),
            interleave_gate_up(bg, bu))


@pytest.mark.parametrize("m,n,k,gs,lb,cfg", EPI_CASES)
@pytest.mark.parametrize("epilogue", ["silu_mul", "gelu_tanh_mul"])
def test_gated_epilogue_matches_float64(m, n, k, gs, lb, cfg, epilogue):
    """Interleaved gate/up rows (each with its own multiplier) -> act(gate) * up (+ residual), against the
    float64 twin of the same quantized operands."""
    from fireq_kernels.gemm_w4a8 import repack_half

    if GPU and not cfg.get("GEMV"):
        cfg = dict(cfg, BM=max(cfg["BM"], 16), BN=max(cfg["BN"], 64), num_stages=3)
    for seed in range(2):
        x, qw, sc, eg, eu, b = _gate_up(m, n, k, gs, seed)
        res = (torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * 0.1).to(DEV) if seed else None
        xq, xs = quantize_fp8_rows_ref(x)
        args = dict(epilogue=epilogue, log2_multiplier2=eu, residual=res)
        ref = w4a8_gemm_ref(xq, xs, qw, sc, eg, gs, b, torch.float64, torch.float64, **args)
        twin = w4a8_gemm_ref(xq, xs, qw, sc, eg, gs, b, torch.float32, torch.float32, **args)
        w = repack_half(qw, k, lb) if lb else qw
        got = w4a8_gemm_triton(xq, xs, w, sc, eg, gs, b, torch.float32, config=cfg, layout_block=lb, **args)
        assert got.shape == (m, n) and torch.isfinite(got).all()
        err = (got.double() - ref).norm() / ref.norm()
        err_twin = (twin.double() - ref).norm() / ref.norm()
        assert err <= 2 * err_twin + (FP8_MMA_ACC_RTOL if GPU else 1e-6), (err, err_twin)


@pytest.mark.parametrize("m,cfg", [(1, dict(GEMV=True, BN=16, BK=128, SPLIT_K=2, num_warps=4, num_stages=2)),
                                   (7, _cfg(True, 2, 128)), (9, _cfg(False, 1, 128))])
def test_residual_epilogue_matches_float64(m, cfg):
    if GPU and not cfg.get("GEMV"):
        cfg = dict(cfg, BM=max(cfg["BM"], 16), BN=max(cfg["BN"], 64), num_stages=3)
    x, qweight, scales, e, b = _operands(m, 72, 384, 128, 3)
    res = torch.randn(m, 72, generator=torch.Generator().manual_seed(4)).to(DEV)
    xq, xs = quantize_fp8_rows_ref(x)
    ref = w4a8_gemm_ref(xq, xs, qweight, scales, e, 128, b, torch.float64, torch.float64, residual=res)
    twin = w4a8_gemm_ref(xq, xs, qweight, scales, e, 128, b, torch.float32, torch.float32, residual=res)
    got = w4a8_gemm_triton(xq, xs, qweight, scales, e, 128, b, torch.float32, config=cfg, residual=res)
    err = (got.double() - ref).norm() / ref.norm()
    err_twin = (twin.double() - ref).norm() / ref.norm()
    assert err <= 2 * err_twin + (FP8_MMA_ACC_RTOL if GPU else 1e-6), (err, err_twin)


def test_epilogue_rejects_bad_input():
    x, qweight, scales, e, b = _operands(4, 32, 256, 128, 1)
    xq, xs = quantize_fp8_rows_ref(x)
    with pytest.raises(ValueError, match="epilogue"):
        w4a8_gemm_triton(xq, xs, qweight, scales, e, 128, b, epilogue="relu")
    with pytest.raises(ValueError, match="residual"):
        w4a8_gemm_triton(xq, xs, qweight, scales, e, 128, b, residual=torch.zeros(4, 31, device=DEV))
