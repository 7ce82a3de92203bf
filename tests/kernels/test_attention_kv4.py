"""The Triton INT4-KV attention against float64 references on the same quantized operands.

Interpreter (CPU) at small sizes, native on an FP8 GPU. Error within 2x of the PyTorch twin's (which
computes in float32 from the dequantized operands), plus the GPU's FP8/fp16 MMA rounding of P."""

from __future__ import annotations

import math
import os

import pytest
import torch

from fireq.formats.fp8 import quantize_fp8_rows
from fireq.formats.kv import KVSpec, dequantize_kv, quantize_kv
from fireq_kernels.attention_kv4 import kv4_attention_triton, stage_kv_triton
from fireq_kernels.bias import alibi_factors, alibi_dense, factor_bias
from fireq_kernels.reference import kv4_attention_ref, stage_kv_ref

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEV = "cuda" if GPU else "cpu"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs an FP8 GPU or TRITON_INTERPRET=1", allow_module_level=True)
# P goes through fp16 (p * v_scale) before the P.V product: ~2^-11 relative per term
P_RTOL = 2.0**-10


def _mask(lq, lk, causal, window):
    qpos = torch.arange(lq)[:, None] + (lk - lq)
    kpos = torch.arange(lk)[None, :]
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        keep &= kpos <= qpos
    if window:
        keep &= kpos > qpos - window
    return keep


def _case(b, hq, hkv, lq, lk, d, spec, seed, bias_r=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g) * 2
    k = torch.randn(b, hkv, lk, d, generator=g) * 2
    v = torch.randn(b, hkv, lk, d, generator=g)
    q8, qs = quantize_fp8_rows(q)
    qk, qv = quantize_kv(k, spec), quantize_kv(v, spec)
    qb = kb = None
    if bias_r:
        qb = torch.randn(b, hq, lq, bias_r, generator=g)
        kb = torch.randn(b, hkv, lk, bias_r, generator=g) * 0.3
    return q8, qs, qk, qv, qb, kb


def _run(b, hq, hkv, lq, lk, d, spec, causal, window, splits, seed, bias_r=0, pv_fp8=False, staged=None,
         tiles=True):
    if GPU:  # FP8 tensor-core products need >= 32 channels a group
        d = max(d, 64)
        if spec.group_size not in (-1, 0):
            spec = KVSpec(spec.bits, max(spec.group_size, 32), spec.symmetric, spec.scale_dtype)
    q8, qs, qk, qv, qb, kb = _case(b, hq, hkv, lq, lk, d, spec, seed, bias_r)
    scale = 1 / math.sqrt(d)
    qd = q8.double() * qs.double()
    kd = dequantize_kv(qk, d, spec, torch.float64)
    vd = dequantize_kv(qv, d, spec, torch.float64)
    mask = _mask(lq, lk, causal, window)
    ref = kv4_attention_ref(qd, kd, vd, scale, mask, None if qb is None else qb.double(),
                            None if kb is None else kb.double(), acc_dtype=torch.float64)
    vs = qv.scales[..., 0].float() if pv_fp8 else None  # the twin rounds P to FP8 as the kernel does
    twin = kv4_attention_ref(qd.float(), kd.float(), vd.float(), scale, mask, qb, kb, pv_fp8_scale=vs)
    dv = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    got = kv4_attention_triton(q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV),
                               qv.packed.to(DEV), qv.scales.to(DEV), scale, causal, window, dv(qk.zeros),
                               dv(qv.zeros), dv(qb), dv(kb), out_dtype=torch.float32, splits=splits,
                               block_m=16 if tiles else None, block_n=(16 if not GPU else 64) if tiles else None,
                               pv_fp8=pv_fp8, staged=staged).cpu()
    assert torch.isfinite(got).all()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    err_twin = ((twin.double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * err_twin + P_RTOL, (err, err_twin)


@pytest.mark.parametrize("b,hq,hkv,lq,lk,d", [(1, 2, 2, 24, 24, 32), (2, 4, 1, 20, 20, 16), (1, 6, 2, 1, 40, 32),
                                             (1, 4, 2, 3, 37, 64)])
@pytest.mark.parametrize("causal,window", [(True, 0), (False, 0), (True, 7)])
def test_attention_masks_gqa(b, hq, hkv, lq, lk, d, causal, window):
    _run(b, hq, hkv, lq, lk, d, KVSpec(), causal, window, 1, seed=lq + lk + d)


@pytest.mark.parametrize("spec", [KVSpec(symmetric=False), KVSpec(group_size=16), KVSpec(scale_dtype="bf16"),
                                  KVSpec(group_size=16, symmetric=False)])
def test_attention_kv_formats(spec):
    _run(1, 4, 2, 18, 18, 32, spec, True, 0, 1, seed=3)


@pytest.mark.parametrize("splits", [2, 3])
def test_decode_split_kv(splits):
    _run(2, 8, 2, 1, 50, 32, KVSpec(), True, 0, splits, seed=splits)
    _run(1, 4, 1, 2, 45, 32, KVSpec(), True, 0, splits, seed=10 + splits)  # Lq = 2


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(symmetric=False)])
def test_decode_default_program_shape(spec, monkeypatch):
    # the wrapper's own decode choice (one-warp programs, 64-key tiles, splits up to DECODE_PROGRAMS), reached
    # at a small size by lowering the program target; a ragged last tile (600 keys)
    import fireq_kernels.attention_kv4 as ak

    monkeypatch.setattr(ak, "DECODE_PROGRAMS", 8)
    _run(2, 8, 2, 1, 600, 64, spec, True, 0, None, seed=21, tiles=False)


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(symmetric=False)])
def test_decode_short_cache_default(spec):
    # the wrapper's own choice for a short cache (4 blocks x 3 tiles of 128 keys <= SHORT_PROGRAMS): 128-key
    # 4-warp programs, one tile a split: 4 splits of 75 keys (the last tile of each ragged); and Lq = 2
    import fireq_kernels.attention_kv4 as ak

    assert 4 * 3 <= ak.SHORT_PROGRAMS and 2 * 2 * 300 // 256 < ak.DECODE_PROGRAMS // 2  # not the one-warp path
    _run(2, 8, 2, 1, 300, 64, spec, True, 0, None, seed=23, tiles=False)
    _run(1, 4, 2, 2, 260, 64, spec, True, 0, None, seed=24, tiles=False)


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(symmetric=False)])
@pytest.mark.parametrize("staged,bias_r", [(False, 0), (True, 2)])
def test_scale_prefetch_is_bit_identical(spec, staged, bias_r, monkeypatch):
    # the per-token scales (and zero points) loaded one tile ahead (UNSTAGED_PREFETCH, the decode kernel;
    # STAGED_KS_PREFETCH, the staged prefill's pointer-loaded key scales) give the very same output as
    # loading them in their own iteration; the prefetch switched on is also covered against float64 above
    import fireq_kernels.attention_kv4 as ak

    lq, lk = (1, 150) if not staged else (40, 75)
    d = 64 if GPU else 32
    q8, qs, qk, qv, qb, kb = _case(2, 4, 2, lq, lk, d, spec, seed=lq + lk, bias_r=bias_r)
    dv = lambda t: None if t is None else t.to(DEV)  # noqa: E731

    def run():
        return kv4_attention_triton(q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV),
                                    qv.packed.to(DEV), qv.scales.to(DEV), 1 / math.sqrt(d), True, 0,
                                    dv(qk.zeros), dv(qv.zeros), dv(qb), dv(kb), out_dtype=torch.float32,
                                    splits=None if staged else 2, block_m=16, block_n=16 if not GPU else 64,
                                    staged=staged)

    outs = []
    for on in (True, False):
        monkeypatch.setattr(ak, "UNSTAGED_PREFETCH", on)
        monkeypatch.setattr(ak, "STAGED_KS_PREFETCH", on)
        outs.append(run())
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(symmetric=False), KVSpec(scale_dtype="bf16")])
@pytest.mark.parametrize("lq,lk,causal,window,splits", [(24, 24, True, 0, 1), (17, 30, False, 0, 1),
                                                       (20, 20, True, 7, 1), (1, 50, True, 0, 3), (3, 41, True, 0, 2)])
def test_pv_fp8(spec, lq, lk, causal, window, splits):
    """The FP8 P.V option against the float64 reference, error within 2x of the twin that rounds P the same
    way (and far inside the FP16 path's bound of 2^-4 a term: the errors average over keys)."""
    # P's FP8 rounding is a random error of a few percent a term: enough rows (2 x 16 heads) that the norms
    # compare distributions, not a handful of roundings
    _run(2, 16, 4, lq, lk, 32, spec, causal, window, splits, seed=lq * 3 + lk, pv_fp8=True)
    _run(2, 12, 2, lq, lk, 32, spec, causal, window, splits, seed=lq * 3 + lk + 1, bias_r=2, pv_fp8=True)


def test_pv_fp8_twin_is_close_to_exact():
    """The FP8 P.V twin is an approximation of the exact attention at FP8's precision, not a different
    function: relative error of a few 1e-3 on random data, much more than the fp16 path's and bounded."""
    spec = KVSpec()
    q8, qs, qk, qv, _, _ = _case(1, 4, 2, 64, 64, 32, spec, seed=42)
    qd = q8.double() * qs.double()
    kd, vd = dequantize_kv(qk, 32, spec, torch.float64), dequantize_kv(qv, 32, spec, torch.float64)
    mask = _mask(64, 64, True, 0)
    ref = kv4_attention_ref(qd, kd, vd, 0.2, mask, acc_dtype=torch.float64)
    emu = kv4_attention_ref(qd, kd, vd, 0.2, mask, acc_dtype=torch.float64, pv_fp8_scale=qv.scales[..., 0].double())
    err = ((emu - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < 2e-2, err


def test_flashbias_factors():
    _run(1, 4, 2, 20, 20, 32, KVSpec(), True, 0, 1, seed=4, bias_r=4)
    _run(1, 4, 2, 1, 33, 32, KVSpec(), True, 0, 2, seed=5, bias_r=2)
    _run(1, 4, 2, 21, 21, 32, KVSpec(), True, 0, 1, seed=8, bias_r=1)
    _run(1, 4, 2, 17, 30, 32, KVSpec(symmetric=False), False, 0, 1, seed=9, bias_r=2)
    _run(1, 4, 2, 19, 19, 32, KVSpec(), True, 0, 1, seed=6, bias_r=20)  # R > 8: an MMA
    _run(1, 4, 2, 1, 40, 32, KVSpec(), True, 0, 2, seed=7, bias_r=64)


def test_alibi_factors_equal_dense_bias():
    b, hq, lq, lk = 1, 4, 9, 9
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    qb, kb = alibi_factors(slopes, lq, lk)
    dense = alibi_dense(slopes, lq, lk)
    assert torch.allclose(qb @ kb.transpose(-1, -2), dense, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, lq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(b, hq, lk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(b, hq, lk, 16, generator=g, dtype=torch.float64)
    a = kv4_attention_ref(q, k, v, 0.25, _mask(lq, lk, True, 0), qb[None].expand(b, -1, -1, -1),
                          kb[None].expand(b, hq, -1, -1), acc_dtype=torch.float64)
    d = kv4_attention_ref(q, k, v, 0.25, dense[None] + torch.where(_mask(lq, lk, True, 0), 0.0, float("-inf")),
                          acc_dtype=torch.float64)
    assert torch.allclose(a, d, atol=1e-12)


def test_svd_factorization_reports_error():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(30, 3, generator=g, dtype=torch.float64)
    w = torch.randn(40, 3, generator=g, dtype=torch.float64)
    bias = u @ w.t() + 1e-3 * torch.randn(30, 40, generator=g, dtype=torch.float64)
    pq, pk, err = factor_bias(bias, energy=0.999)
    assert pq.shape[1] == pk.shape[1] <= 4
    assert err == pytest.approx(((pq @ pk.t() - bias).norm() / bias.norm()).item(), rel=1e-9) and err < 0.01


@pytest.mark.parametrize("lq,lk,causal,window,splits", [(13, 29, True, 0, 1), (13, 29, False, 0, 1), (9, 9, True, 5, 1),
                                                       (1, 41, True, 0, 3), (2, 41, True, 0, 2)])
def test_ragged_batch(lq, lk, causal, window, splits):
    """Right-padded batch with per-sequence query and key lengths; padded query rows give zeros."""
    b, hq, hkv, d = 3, 4, 2, 64 if GPU else 32
    spec = KVSpec(symmetric=False)
    q8, qs, qk, qv, _, _ = _case(b, hq, hkv, lq, lk, d, spec, seed=lq * 7 + lk)
    lens_q = torch.tensor([lq, max(1, lq - 4), 1])
    lens_k = torch.tensor([lk, lk - 6, max(int(lens_q[2]), lk - 11)])
    lens_k[1] = max(int(lens_k[1]), int(lens_q[1]))
    keep = torch.zeros(b, 1, lq, lk, dtype=torch.bool)
    for i in range(b):
        keep[i, 0, :lens_q[i], :lens_k[i]] = _mask(int(lens_q[i]), int(lens_k[i]), causal, window)
    scale = 1 / math.sqrt(d)
    qd = q8.double() * qs.double()
    kd, vd = dequantize_kv(qk, d, spec, torch.float64), dequantize_kv(qv, d, spec, torch.float64)
    ref = kv4_attention_ref(qd, kd, vd, scale, keep, acc_dtype=torch.float64)
    twin = kv4_attention_ref(qd.float(), kd.float(), vd.float(), scale, keep)
    got = kv4_attention_triton(q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV),
                               qv.packed.to(DEV), qv.scales.to(DEV), scale, causal, window, qk.zeros.to(DEV),
                               qv.zeros.to(DEV), out_dtype=torch.float32, splits=splits, block_m=16,
                               block_n=16 if not GPU else 64, seqlens_q=lens_q.to(DEV), seqlens_k=lens_k.to(DEV)).cpu()
    for i in range(b):  # padded rows are zeros
        assert torch.all(got[i, :, lens_q[i]:] == 0)
    err = ((got.double() - ref).norm() / ref.norm()).item()
    err_twin = ((twin.double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * err_twin + P_RTOL, (err, err_twin)


@pytest.mark.parametrize("lq,splits", [(1, 3), (6, 1)])
def test_output_into_strided_buffer(lq, splits):
    """out= (a transposed view of a (B, Lq, Hq, D) buffer) gets exactly what a fresh output gets."""
    d = 64 if GPU else 32
    spec = KVSpec(symmetric=False)
    q8, qs, qk, qv, _, _ = _case(2, 4, 2, lq, 30, d, spec, seed=lq + 40)
    args = dict(causal=True, k_zero=qk.zeros.to(DEV), v_zero=qv.zeros.to(DEV), out_dtype=torch.float32,
                splits=splits, block_m=16, block_n=16 if not GPU else 64)
    ops = (q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV), qv.packed.to(DEV),
           qv.scales.to(DEV), 1 / math.sqrt(d))
    a = kv4_attention_triton(*ops, **args)
    buf = torch.full((2, lq, 4, d), float("nan"), device=DEV)
    b = kv4_attention_triton(*ops, out=buf.transpose(1, 2), **args)
    assert b.data_ptr() == buf.data_ptr() and torch.equal(a, b) and torch.equal(buf, a.transpose(1, 2))


@pytest.mark.parametrize("lq,splits", [(1, 2), (5, 1)])
def test_strided_cache_views(lq, splits):
    """The INT4 cache hands the kernel views of larger preallocated buffers (dim 2 sliced): the result
    equals the one from contiguous tensors, bit for bit."""
    d = 64 if GPU else 32
    spec = KVSpec(symmetric=False)
    q8, qs, qk, qv, _, _ = _case(2, 4, 2, lq, 37, d, spec, seed=lq + 20)
    cap = 64

    def padded(t):
        buf = torch.zeros((*t.shape[:2], cap, t.shape[3]), dtype=t.dtype)
        buf[:, :, :t.shape[2]] = t
        return buf.to(DEV)[:, :, :t.shape[2]]

    args = dict(causal=True, out_dtype=torch.float32, splits=splits, block_m=16, block_n=16 if not GPU else 64)
    scale = 1 / math.sqrt(d)
    a = kv4_attention_triton(q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV),
                             qv.packed.to(DEV), qv.scales.to(DEV), scale, k_zero=qk.zeros.to(DEV),
                             v_zero=qv.zeros.to(DEV), **args)
    b = kv4_attention_triton(q8.to(DEV), qs.squeeze(-1).to(DEV), padded(qk.packed), padded(qk.scales),
                             padded(qv.packed), padded(qv.scales), scale, k_zero=padded(qk.zeros),
                             v_zero=padded(qv.zeros), **args)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("pv_fp8,v_scaled", [(False, False), (False, True), (True, False)])
def test_stage_kv_matches_twin(sym, pv_fp8, v_scaled):
    """The staging kernel (the cache as MMA-ready codes for the staged prefill) equals its twin exactly,
    V along tokens for the FP8 P.V, V as codes times scales for v_scaled; the largest V scale only over
    each sequence's valid keys; keys past a sequence's length staged as zeros, whatever the buffer holds
    there (here: stray bytes, scales that are NaN in E4M3)."""
    spec = KVSpec(symmetric=sym)
    d = 64 if GPU else 32
    _, _, qk, qv, _, _ = _case(3, 2, 2, 1, 37, d, spec, seed=11 + sym + 2 * pv_fp8)
    lens = torch.tensor([37, 20, 5])
    g = torch.Generator().manual_seed(5)
    for b, n in enumerate(lens.tolist()):  # what a reused static buffer can hold past a sequence's length
        for t in (qk.packed, qv.packed, qk.scales.view(torch.uint8), qv.scales.view(torch.uint8), qk.zeros, qv.zeros):
            if t is not None:
                t[b, :, n:] = torch.randint(0, 256, t[b, :, n:].shape, dtype=torch.uint8, generator=g)
        qv.scales.view(torch.uint8)[b, :, n:] |= 0x7F  # E4M3 NaN
    dv = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    got = stage_kv_triton(qk.packed.to(DEV), qv.packed.to(DEV), qv.scales.to(DEV), dv(qk.zeros), dv(qv.zeros),
                          pv_fp8, lens.to(DEV, torch.int32), block_t=16, v_scaled=v_scaled, k_scale=qk.scales.to(DEV))
    want = stage_kv_ref(qk.packed, qv.packed, qv.scales, qk.zeros, qv.zeros, pv_fp8, lens, v_scaled=v_scaled,
                        k_scale=qk.scales)
    assert torch.equal(got[0].cpu().float(), want[0].float())
    assert torch.equal(got[1].cpu().float(), want[1].float())
    assert got[3].dtype == want[3].dtype == torch.float16  # the key scales' copy (FP8 scales: fp16, exact)
    valid = (torch.arange(qk.scales.shape[2])[None, :] < lens[:, None])[:, None, :].expand(qk.scales.shape[:3])
    assert torch.equal(got[3].cpu().float()[valid], qk.scales[..., 0].float()[valid])
    assert got[1].cpu().float().isfinite().all() and (got[1].cpu().float()[~valid] == 0).all()
    assert torch.equal(got[3].cpu(), want[3])
    if pv_fp8:
        assert got[1].stride(2) == 1  # tokens contiguous
        assert torch.equal(got[2].cpu(), want[2])
    else:
        assert got[2] is None


@pytest.mark.parametrize("sym", [True, False])
def test_staged_prefill_ignores_buffer_past_lengths(sym):
    """A static cache's buffer past the sequence's length (never written, or a previous sequence's: stray codes,
    zero points, NaN scales) does not reach the staged prefill's output: on the GPU its key tiles are loaded
    whole by TMA and their tails multiplied by p = 0, so they must stage as zeros, not Inf or NaN."""
    spec = KVSpec(symmetric=sym)
    n, lk, d = 100, 128, 64
    q8, qs, qk, qv, _, _ = _case(1, 4, 2, n, lk, d, spec, seed=21 + sym)
    lens = torch.tensor([n], dtype=torch.int32, device=DEV)
    dv = lambda t: None if t is None else t.to(DEV)  # noqa: E731

    def run(kv):
        k, v = kv
        return kv4_attention_triton(q8.to(DEV), qs[..., 0].to(DEV), k.packed.to(DEV), k.scales.to(DEV),
                                    v.packed.to(DEV), v.scales.to(DEV), d ** -0.5, causal=True, k_zero=dv(k.zeros),
                                    v_zero=dv(v.zeros), out_dtype=torch.float32, seqlens_q=lens, seqlens_k=lens,
                                    staged=True)

    clean = run((qk, qv))
    g = torch.Generator().manual_seed(7)
    for t in (qk.packed, qv.packed, qk.scales.view(torch.uint8), qv.scales.view(torch.uint8), qk.zeros, qv.zeros):
        if t is not None:
            t[:, :, n:] = torch.randint(0, 256, t[:, :, n:].shape, dtype=torch.uint8, generator=g)
    qv.scales.view(torch.uint8)[:, :, n:n + 8] |= 0x7F  # E4M3 NaN
    dirty = run((qk, qv))
    assert clean.isfinite().all() and torch.equal(dirty, clean)


@pytest.mark.parametrize("pv_fp8", [False, True])
@pytest.mark.parametrize("b,hq,hkv,lq,lk,causal,window,bias_r", [
    (1, 2, 2, 40, 40, True, 0, 0), (2, 4, 1, 33, 33, True, 0, 0), (1, 4, 2, 17, 30, False, 0, 0),
    (1, 2, 2, 36, 36, True, 9, 0), (1, 4, 2, 35, 35, True, 0, 2), (1, 4, 2, 19, 19, True, 0, 4),
    (1, 4, 2, 18, 18, True, 0, 20), (1, 4, 2, 21, 21, True, 0, 1)])
def test_staged_prefill(pv_fp8, b, hq, hkv, lq, lk, causal, window, bias_r):
    """The staged prefill (cache staged once, plain loads in the loop) against float64, within 2x of the
    twin's error (the FP8 P.V twin rounds P against each head's largest V scale, as the kernel does)."""
    if pv_fp8:  # enough rows that the norms compare error distributions (see test_pv_fp8)
        hq, hkv = hq * 4, hkv * 2
    for spec in (KVSpec(), KVSpec(symmetric=False)):
        _run(b, hq, hkv, lq, lk, 32, spec, causal, window, 1, seed=lq + lk + bias_r + 3 * window,
             bias_r=bias_r, pv_fp8=pv_fp8, staged=True)


@pytest.mark.parametrize("b,hq,hkv,lq,lk,causal,window,bias_r", [
    (1, 4, 2, 33, 33, True, 0, 0), (1, 2, 2, 36, 36, True, 9, 2)])
def test_staged_prefill_v_unscaled(b, hq, hkv, lq, lk, causal, window, bias_r):
    """The staged prefill with V staged as plain codes and its scales applied to P in the loop: bf16 scales
    (codes times a bf16 scale are not always exact in fp16), and FP8 scales with STAGED_V_SCALED off."""
    from fireq_kernels import attention_kv4

    for spec in (KVSpec(scale_dtype="bf16"), KVSpec(symmetric=False, scale_dtype="bf16")):
        _run(b, hq, hkv, lq, lk, 32, spec, causal, window, 1, seed=lq + 5, bias_r=bias_r, staged=True)
    old = attention_kv4.STAGED_V_SCALED
    attention_kv4.STAGED_V_SCALED = False
    try:
        _run(b, hq, hkv, lq, lk, 32, KVSpec(), causal, window, 1, seed=lq + 6, bias_r=bias_r, staged=True)
    finally:
        attention_kv4.STAGED_V_SCALED = old


def test_staged_ragged_batch_and_strided_out():
    """Ragged lengths over the staged path: padded rows zero, the rest as the unstaged kernel computes."""
    b, hq, hkv, lq, lk, d = 3, 4, 2, 21, 29, 64 if GPU else 32
    spec = KVSpec(symmetric=False)
    q8, qs, qk, qv, _, _ = _case(b, hq, hkv, lq, lk, d, spec, seed=77)
    lens_q = torch.tensor([21, 9, 1], dtype=torch.int32)
    lens_k = torch.tensor([29, 15, 12], dtype=torch.int32)
    ops = (q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV), qv.packed.to(DEV),
           qv.scales.to(DEV), 1 / math.sqrt(d))
    args = dict(causal=True, k_zero=qk.zeros.to(DEV), v_zero=qv.zeros.to(DEV), out_dtype=torch.float32,
                block_m=16, block_n=16 if not GPU else 64, seqlens_q=lens_q.to(DEV), seqlens_k=lens_k.to(DEV),
                splits=1)
    a = kv4_attention_triton(*ops, staged=False, **args).cpu()
    buf = torch.full((b, lq, hq, d), float("nan"), device=DEV)
    got = kv4_attention_triton(*ops, staged=True, out=buf.transpose(1, 2), **args).cpu()
    for i in range(b):
        assert torch.all(got[i, :, lens_q[i]:] == 0)
    assert torch.allclose(got, a, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("lq,lk,splits,staged", [(24, 24, 1, False), (40, 40, 1, True), (1, 45, 3, False)])
def test_alibi_factors_in_kernel_equal_dense_bias(lq, lk, splits, staged):
    """ALiBi through its R = 2 factors in the kernel (prefill, staged prefill, split decode) matches the
    float64 attention with the dense ALiBi bias."""
    b, hq, hkv, d = 1, 4, 2, 64 if GPU else 32
    spec = KVSpec()
    q8, qs, qk, qv, _, _ = _case(b, hq, hkv, lq, lk, d, spec, seed=lq + lk)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    qb, kb = alibi_factors(slopes, lq, lk)
    scale = 1 / math.sqrt(d)
    qd = q8.double() * qs.double()
    kd, vd = dequantize_kv(qk, d, spec, torch.float64), dequantize_kv(qv, d, spec, torch.float64)
    keep = _mask(lq, lk, True, 0)
    dense = alibi_dense(slopes, lq, lk)[None] + torch.where(keep, 0.0, float("-inf")).double()
    ref = kv4_attention_ref(qd, kd, vd, scale, dense, acc_dtype=torch.float64)
    twin = kv4_attention_ref(qd.float(), kd.float(), vd.float(), scale, dense.float())
    got = kv4_attention_triton(q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV),
                               qv.packed.to(DEV), qv.scales.to(DEV), scale, True, q_bias=qb[None].float().to(DEV),
                               k_bias=kb[None].float().to(DEV), out_dtype=torch.float32, splits=splits,
                               block_m=16, block_n=16 if not GPU else 64, staged=staged).cpu()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    err_twin = ((twin.double() - ref).norm() / ref.norm()).item()
    assert err <= 2 * err_twin + P_RTOL, (err, err_twin)


def test_bias_factor_shapes_are_checked():
    """Bias factors of the wrong batch, heads or length are refused with one ValueError (not read past)."""
    q8, qs, qk, qv, qb, kb = _case(1, 4, 2, 9, 9, 32, KVSpec(), 3, 2)
    args = (q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV), qv.packed.to(DEV),
            qv.scales.to(DEV), 0.1)
    for bad_q, bad_k in ((qb[:, :2], kb), (qb, kb[..., :5, :]), (qb, torch.cat([kb, kb])), (qb, kb[..., :1])):
        with pytest.raises(ValueError):
            kv4_attention_triton(*args, q_bias=bad_q.to(DEV), k_bias=bad_k.to(DEV))
    with pytest.raises(ValueError):
        kv4_attention_triton(*args, q_bias=qb.to(DEV))


def test_bias_mma_key_operand_carries_the_factors_to_fp32_accuracy():
    """The staged prefill's bias MMA operand: each key factor split into three bf16 parts, laid out so that
    (h, h, m, h, l, m) . (h, m, h, l, h, m) sums the factor products; the parts add back to the fp32 factor
    within 2^-24 relative, and the pairing reproduces q_bias k_bias^T to fp32 accuracy."""
    import triton

    from fireq_kernels.attention_kv4 import _split_bias_keys

    g = torch.Generator().manual_seed(5)
    lk = 77
    kb = (torch.randn(2, 3, lk, 2, generator=g) * torch.tensor([3.0, 4000.0])).to(DEV)
    out = torch.empty((2, 3, lk, 16), dtype=torch.bfloat16 if GPU else torch.float32, device=DEV)
    _split_bias_keys[(triton.cdiv(lk, 32), 2, 3)](kb, out, lk, kb.stride(0), kb.stride(1), kb.stride(2), RT=2,
                                                  BT=32, BF16=GPU)
    o = out.double().cpu()
    kbd = kb.double().cpu()
    for r in range(2):
        h, m, lo = o[..., 6 * r], o[..., 6 * r + 1], o[..., 6 * r + 3]
        assert torch.equal(o[..., 6 * r + 2], h) and torch.equal(o[..., 6 * r + 4], h)
        assert torch.equal(o[..., 6 * r + 5], m)
        assert ((h + m + lo - kbd[..., r]).abs() <= kbd[..., r].abs() * 2.0**-24).all()
    assert (o[..., 12:] == 0).all()
    # the query side pairs (h, h, m, h, l, m): the six products of each factor
    qf = torch.randn(5, 2, generator=g, dtype=torch.float64) * 100
    qh = qf.float().bfloat16().double()
    qm = (qf.float() - qh.float()).bfloat16().double()
    ql = (qf.float() - qh.float() - qm.float()).bfloat16().double()
    qmat = torch.zeros(5, 16, dtype=torch.float64)
    for r in range(2):
        for j, part in enumerate((qh, qh, qm, qh, ql, qm)):
            qmat[:, 6 * r + j] = part[:, r]
    got = qmat @ o[0, 0].t()
    want = qf.float().double() @ kbd[0, 0].t()
    assert ((got - want).abs() <= 1e-6 * (qf.abs() @ kbd[0, 0].abs().t())).all()


def test_staged_long_buffer_stages_only_the_used_keys():
    """A ragged batch in a long buffer (a static cache): staging writes each sequence's keys rounded up to
    STAGE_ALIGN and the staged attention equals the unstaged one."""
    from fireq_kernels.attention_kv4 import STAGE_ALIGN

    b, hq, hkv, lq, lk, d = 3, 2, 1, 20, 600, 64 if GPU else 32
    spec = KVSpec()
    q8, qs, qk, qv, _, _ = _case(b, hq, hkv, lq, lk, d, spec, seed=5)
    lens_q = torch.tensor([20, 9, 3], dtype=torch.int32)
    lens_k = torch.tensor([560, 100, 3], dtype=torch.int32)
    k8, vo, _, ks_copy = stage_kv_triton(qk.packed.to(DEV), qv.packed.to(DEV), qv.scales.to(DEV),
                                         seqlens_k=lens_k.to(DEV))
    assert ks_copy is None  # no key scales given, no copy
    want = stage_kv_ref(qk.packed, qv.packed, qv.scales, seqlens_k=lens_k, v_scaled=True)  # FP8 scales: V times scales
    for i in range(b):
        n = min(lk, -(-int(lens_k[i]) // STAGE_ALIGN.value) * STAGE_ALIGN.value)
        assert torch.equal(k8[i, :, :n].cpu().float(), want[0][i, :, :n].float())
        assert torch.equal(vo[i, :, :n].cpu().float(), want[1][i, :, :n].float())
    ops = (q8.to(DEV), qs.squeeze(-1).to(DEV), qk.packed.to(DEV), qk.scales.to(DEV), qv.packed.to(DEV),
           qv.scales.to(DEV), 1 / math.sqrt(d))
    args = dict(causal=True, out_dtype=torch.float32, block_m=16, block_n=16 if not GPU else 64,
                seqlens_q=lens_q.to(DEV), seqlens_k=lens_k.to(DEV), splits=1)
    a = kv4_attention_triton(*ops, staged=False, **args).cpu()
    got = kv4_attention_triton(*ops, staged=True, **args).cpu()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, a, rtol=2e-3, atol=2e-3)
