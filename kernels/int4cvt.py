"""INT4 -> FP8 / FP16 conversion in registers, four bytes (eight nibbles) at a time.

Every kernel here reads INT4 codes as bytes whose two nibbles belong to two separate operand tiles (the
kernel layouts put channel j in the low nibble and channel j + B/2 in the high one). `nibbles_fp8` and
`nibbles_f16` turn a tile of such bytes into its low-nibble and high-nibble tiles of values.

On the GPU this is inline PTX working on whole 32-bit registers, in the spirit of FireQ's table lookup
but with no table: a byte permute spreads two bytes over the halves of a register, one LOP3 keeps a
nibble and ORs (unsigned) or XORs (two's complement: flips bit 3, turning n into n + 8) it into the
mantissa of the FP16 number 1024, and one FP16x2 subtract (low nibble) or fused multiply-add by 1/16
(high nibble) leaves the exact integer; `cvt...e4m3x2.f16x2` packs two of them into FP8. That is about
two instructions an element, where Triton's own casts (shift, shift, int8 -> fp16 -> fp8 one element at a
time) take four to five. Asymmetric codes with zero points: the zero point's byte is spread and OR-ed
into 1024 the same way and subtracted in FP16, exact (|c - z| <= 15). All results are small integers,
exact in FP8 E4M3 and FP16.

Under TRITON_INTERPRET=1 (no PTX) the same values come from plain Triton casts (ASM=False).
"""

from __future__ import annotations

import triton
import triton.language as tl

_LUT_AND_XOR = 0x6A  # lop3 truth table of (a & b) ^ c
_LUT_AND_OR = 0xEA  # (a & b) | c


def _spread(src: str) -> str:
    """PTX: bytes 0,1 (and 2,3) of src into the low bytes of the two 16-bit halves of p01 (p23)."""
    return (f"prmt.b32 p01, {src}, 0, 0x4140;\n"
            f"prmt.b32 p23, {src}, 0, 0x4342;\n")


def _asm_values(signed: bool, zero: bool) -> str:
    """PTX leaving the FP16x2 integers in a01, a23 (low nibbles of bytes 0..3) and c01, c23 (high)."""
    lut = _LUT_AND_XOR if signed else _LUT_AND_OR
    c_lo = "0x64086408" if signed else "0x64006400"
    c_hi = "0x64806480" if signed else "0x64006400"
    s = _spread("$IN")
    s += (f"lop3.b32 a01, p01, 0x000F000F, {c_lo}, {lut};\n"
          f"lop3.b32 a23, p23, 0x000F000F, {c_lo}, {lut};\n"
          f"lop3.b32 c01, p01, 0x00F000F0, {c_hi}, {lut};\n"
          f"lop3.b32 c23, p23, 0x00F000F0, {c_hi}, {lut};\n"
          "mov.b32 k16, 0x2C002C00;\n")  # 1/16
    if zero:  # z: 1024 + z (OR into 1024's mantissa); c - z = (1024 + c) - (1024 + z)
        s += ("prmt.b32 z01, $Z, 0, 0x4140;\n"
              "prmt.b32 z23, $Z, 0, 0x4342;\n"
              "or.b32 z01, z01, 0x64006400;\n"
              "or.b32 z23, z23, 0x64006400;\n"
              "sub.rn.f16x2 a01, a01, z01;\n"
              "sub.rn.f16x2 a23, a23, z23;\n"
              "mov.b32 kb, 0x63806380;\n"  # 960 = 1024 - 64: hi = (1024 + 16c)/16 - 64 - z = raw/16 + (960 - (1024 + z))
              "sub.rn.f16x2 z01, kb, z01;\n"
              "sub.rn.f16x2 z23, kb, z23;\n"
              "fma.rn.f16x2 c01, c01, k16, z01;\n"
              "fma.rn.f16x2 c23, c23, k16, z23;\n")
    else:
        sub = "0x64086408" if signed else "0x64006400"  # 1032 (n + 8 was stored) or 1024
        add = "0xD480D480" if signed else "0xD400D400"  # -72 or -64
        s += (f"mov.b32 kb, {sub};\n"
              "sub.rn.f16x2 a01, a01, kb;\n"
              "sub.rn.f16x2 a23, a23, kb;\n"
              f"mov.b32 kb, {add};\n"
              "fma.rn.f16x2 c01, c01, k16, kb;\n"
              "fma.rn.f16x2 c23, c23, k16, kb;\n")
    return s


_DECL = ".reg .b32 p01, p23, a01, a23, c01, c23, k16, kb, z01, z23;\n"


def _fp8_asm(signed: bool, zero: bool) -> str:
    body = _asm_values(signed, zero).replace("$IN", "$2").replace("$Z", "$3")
    return ("{\n" + _DECL + ".reg .b16 h0, h1, h2, h3;\n" + body +
            "cvt.rn.satfinite.e4m3x2.f16x2 h0, a01;\n"
            "cvt.rn.satfinite.e4m3x2.f16x2 h1, a23;\n"
            "cvt.rn.satfinite.e4m3x2.f16x2 h2, c01;\n"
            "cvt.rn.satfinite.e4m3x2.f16x2 h3, c23;\n"
            "mov.b32 $0, {h0, h1};\n"
            "mov.b32 $1, {h2, h3};\n}")


def _f16_asm(signed: bool, zero: bool) -> str:
    body = _asm_values(signed, zero).replace("$IN", "$4").replace("$Z", "$5")
    return ("{\n" + _DECL + body +
            "mov.b32 $0, a01;\nmov.b32 $1, a23;\nmov.b32 $2, c01;\nmov.b32 $3, c23;\n}")


FP8_SIGNED = tl.constexpr(_fp8_asm(True, False))
FP8_UNSIGNED = tl.constexpr(_fp8_asm(False, False))
FP8_ZERO = tl.constexpr(_fp8_asm(False, True))
F16_SIGNED = tl.constexpr(_f16_asm(True, False))
F16_UNSIGNED = tl.constexpr(_f16_asm(False, False))
F16_ZERO = tl.constexpr(_f16_asm(False, True))


@triton.jit
def _values(codes, zero, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr):
    """Plain-Triton twin: (low, high) nibble values as int8 (minus the zero point when given)."""
    wi = codes.to(tl.int8, bitcast=True)
    if SIGNED:
        lo = (wi << 4) >> 4
        hi = wi >> 4
    else:
        lo = wi & 0xF
        hi = (wi >> 4) & 0xF
    if HAS_ZERO:
        z = zero.to(tl.int8)
        lo = lo - z
        hi = hi - z
    return lo, hi


@triton.jit
def nibbles_fp8(codes, zero, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, ASM: tl.constexpr):
    """codes: uint8 tensor; zero: uint8 tensor of zero points broadcastable to it (HAS_ZERO) or anything.
    Returns (low, high) float8e4nv tensors of codes' shape: the nibble values (minus the zero point)."""
    if ASM:
        if HAS_ZERO:
            lo, hi = tl.inline_asm_elementwise(FP8_ZERO, "=r,=r,r,r", [codes, zero.to(tl.uint8)],
                                               dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
        elif SIGNED:
            lo, hi = tl.inline_asm_elementwise(FP8_SIGNED, "=r,=r,r", [codes], dtype=(tl.uint8, tl.uint8),
                                               is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(FP8_UNSIGNED, "=r,=r,r", [codes], dtype=(tl.uint8, tl.uint8),
                                               is_pure=True, pack=4)
        return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)
    lo, hi = _values(codes, zero, SIGNED, HAS_ZERO)
    return lo.to(tl.float16).to(tl.float8e4nv), hi.to(tl.float16).to(tl.float8e4nv)


@triton.jit
def nibbles_f16(codes, zero, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, ASM: tl.constexpr):
    """As nibbles_fp8, into float16 tensors."""
    if ASM:
        if HAS_ZERO:
            lo, hi = tl.inline_asm_elementwise(F16_ZERO, "=r,=r,=r,=r,r,r", [codes, zero.to(tl.uint8)],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        elif SIGNED:
            lo, hi = tl.inline_asm_elementwise(F16_SIGNED, "=r,=r,=r,=r,r", [codes],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            lo, hi = tl.inline_asm_elementwise(F16_UNSIGNED, "=r,=r,=r,=r,r", [codes],
                                               dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        return lo, hi
    lo, hi = _values(codes, zero, SIGNED, HAS_ZERO)
    return lo.to(tl.float16), hi.to(tl.float16)


def use_asm() -> bool:
    """Inline PTX on the GPU; plain casts under the CPU interpreter (or with FIREQ_CVT_ASM=0, to compare)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") != "1" and os.environ.get("FIREQ_CVT_ASM", "1") != "0"
