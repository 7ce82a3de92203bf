"""The Triton KV cache write equals fireq.formats.kv.quantize_kv bit for bit (codes, scales, zero points)."""

from __future__ import annotations

import os

import pytest
import torch

from fireq.formats.kv import KVSpec, quantize_kv
from fireq_kernels.kv_write import quantize_kv_triton

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEV = "cuda" if GPU else "cpu"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs an FP8 GPU or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(symmetric=False), KVSpec(group_size=32),
                                  KVSpec(group_size=32, symmetric=False, scale_dtype="bf16"),
                                  KVSpec(scale_dtype="bf16")])
@pytest.mark.parametrize("d", [64, 128])
def test_kv_write_matches_format(spec, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2, 3, 37, d, generator=g) * torch.rand(2, 3, 37, 1, generator=g) * 5
    x[0, 0, 0] = 0.0  # an all-zero token: scale 0
    x[1, 2, 5, :7] = 1000.0  # an outlier group
    x = x.to(DEV).to(torch.bfloat16).transpose(1, 2).transpose(1, 2)  # strided like HF's key states
    ref = quantize_kv(x, spec)
    got = quantize_kv_triton(x, spec)
    bad_s = (got.scales.float() != ref.scales.float()).sum().item()
    bad_q = (got.packed != ref.packed).sum().item()
    bad_z = 0 if spec.symmetric else (got.zeros != ref.zeros).sum().item()
    assert bad_s == bad_q == bad_z == 0, f"mismatches: scales {bad_s}, code bytes {bad_q}, zeros {bad_z}"
    if spec.symmetric:
        assert got.zeros is None
    else:
        assert torch.equal(got.zeros, ref.zeros)


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(symmetric=False)])
def test_kv_write_many_rows(spec):
    # enough rows for whole multi-row programs (the launch takes up to 4096 // d rows a program once the rows
    # outnumber the SMs; few rows go one a program), ragged last program
    from fireq_kernels.kv_write import _launch_shape

    x = (torch.randn(2, 3, 700, 128, generator=torch.Generator().manual_seed(7)) * 3).to(DEV).to(torch.bfloat16)
    assert _launch_shape(2 * 3 * 700, 128)[0] == 32 and _launch_shape(8, 128) == (1, 1)
    ref, got = quantize_kv(x, spec), quantize_kv_triton(x, spec)
    assert torch.equal(got.packed, ref.packed) and torch.equal(got.scales.float(), ref.scales.float())
    assert spec.symmetric or torch.equal(got.zeros, ref.zeros)


@pytest.mark.parametrize("spec", [KVSpec(), KVSpec(symmetric=False), KVSpec(group_size=32, scale_dtype="bf16")])
@pytest.mark.parametrize("n,pos", [(5, 0), (1, 9), (3, 17)])
def test_write_into_cache_buffers(spec, n, pos):
    """write_kv_triton puts quantize_kv's codes, scales and zero points at token positions pos.. of
    preallocated (B, H, CAP, .) buffers and leaves every other slot untouched."""
    from fireq.formats.kv import QuantizedKV
    from fireq_kernels.kv_write import write_kv_triton

    d, cap = 64, 20
    g = torch.Generator().manual_seed(n + pos)
    x = (torch.randn(2, 3, n, d, generator=g) * 3).to(DEV).to(torch.bfloat16)
    ref = quantize_kv(x, spec)

    def filled(t):
        if t is None:
            return None
        return torch.full((2, 3, cap, t.shape[-1] * t.element_size()), 0x5A, dtype=torch.uint8,
                          device=DEV).view(t.dtype)

    dst = QuantizedKV(filled(ref.packed), filled(ref.scales), filled(ref.zeros))
    parts = (dst.packed, dst.scales, dst.zeros)
    before = [None if t is None else t.clone() for t in parts]
    write_kv_triton(x, spec, dst, torch.tensor(pos, device=DEV))
    for got, want, old in zip(parts, (ref.packed, ref.scales, ref.zeros), before):
        if got is None:
            continue
        gb, ob = got.view(torch.uint8), old.view(torch.uint8)
        assert torch.equal(gb[:, :, pos:pos + n], want.view(torch.uint8))
        assert torch.equal(gb[:, :, :pos], ob[:, :, :pos]) and torch.equal(gb[:, :, pos + n:], ob[:, :, pos + n:])
