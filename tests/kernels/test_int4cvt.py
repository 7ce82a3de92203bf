"""The in-register INT4 -> FP8 / FP16 conversion, on every byte value and zero point.

On an FP8 GPU this runs the inline PTX; under the interpreter, its plain-Triton twin."""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from fireq_kernels.int4cvt import nibbles_f16, nibbles_fp8, use_asm

GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEV = "cuda" if GPU else "cpu"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs an FP8 GPU or TRITON_INTERPRET=1", allow_module_level=True)


@triton.jit
def _cvt_kernel(c_ptr, z_ptr, lo_ptr, hi_ptr, R: tl.constexpr, C: tl.constexpr, SIGNED: tl.constexpr,
                HAS_ZERO: tl.constexpr, FP8: tl.constexpr, ROW_ZERO: tl.constexpr, ASM: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    codes = tl.load(c_ptr + offs)
    if ROW_ZERO:  # one zero point a row, broadcast (the attention kernel's per-token case)
        zero = tl.load(z_ptr + tl.arange(0, R) * C)[:, None]
    else:
        zero = tl.load(z_ptr + offs)
    if FP8:
        lo, hi = nibbles_fp8(codes, zero, SIGNED, HAS_ZERO, ASM)
    else:
        lo, hi = nibbles_f16(codes, zero, SIGNED, HAS_ZERO, ASM)
    tl.store(lo_ptr + offs, lo.to(tl.float32))
    tl.store(hi_ptr + offs, hi.to(tl.float32))


def _expected(codes, zero, signed, has_zero):
    c = codes.long()
    lo, hi = c & 0xF, (c >> 4) & 0xF
    if signed:
        lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8
    if has_zero:
        lo, hi = lo - zero.long(), hi - zero.long()
    return lo.float(), hi.float()


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("mode", ["signed", "unsigned", "zero", "row_zero"])
def test_every_byte(fp8, mode):
    r, c = 16, 64
    g = torch.Generator().manual_seed(hash((fp8, mode)) % 1000)
    codes = torch.randperm(r * c, generator=g).remainder(256).to(torch.uint8).reshape(r, c)  # all 256 values
    zero = torch.randint(0, 16, (r, c), generator=g, dtype=torch.uint8)
    if mode == "row_zero":
        zero = zero[:, :1].expand(r, c).contiguous()
    signed, has_zero = mode == "signed", mode in ("zero", "row_zero")
    lo = torch.empty(r, c, device=DEV)
    hi = torch.empty(r, c, device=DEV)
    _cvt_kernel[(1,)](codes.to(DEV), zero.to(DEV), lo, hi, R=r, C=c, SIGNED=signed, HAS_ZERO=has_zero, FP8=fp8,
                      ROW_ZERO=mode == "row_zero", ASM=use_asm())
    elo, ehi = _expected(codes, zero, signed, has_zero)
    torch.testing.assert_close(lo.cpu(), elo, rtol=0, atol=0)
    torch.testing.assert_close(hi.cpu(), ehi, rtol=0, atol=0)
