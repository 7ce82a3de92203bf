"""The kernel of scripts/diag_decode_vt.py, in a module of its own: it is imported after diag_sass.setup()
when compiling for sm_90 without a GPU (Triton picks the interpreter or the compiler when a kernel is
defined)."""

import triton
import triton.language as tl

from fireq_kernels.int4cvt import nibbles_f16

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _decode_vt(q_ptr, qs_ptr, k_ptr, ks_ptr, kz_ptr, vt_ptr, vs_ptr, vz_ptr, part_ptr, lse_ptr,
               Lk, sm_scale, s_qb, s_qh, s_kb, s_kh, s_kl, s_ksb, s_ksh, s_vb, s_vh, s_pb, s_ph, s_ps,
               HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SYM: tl.constexpr, SPLITS: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, ASM: tl.constexpr):
    """One query a head (Lq = 1), rows = the REP query heads of a KV head (padded to BM); grid (1, B * Hkv,
    SPLITS). Writes each split's normalized partial output and log2-sum-exp, as the shipped kernel does."""
    REP: tl.constexpr = HQ // HKV
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV
    rows = tl.arange(0, BM)
    row_ok = rows < REP
    hq = hk * REP + tl.where(row_ok, rows, 0)
    per = tl.cdiv(tl.cdiv(Lk, BN), SPLITS) * BN
    k_lo = split * per
    k_hi = tl.minimum(Lk, k_lo + per)
    qs = tl.load(qs_ptr + b * HQ + hq, mask=row_ok, other=0.0)
    qk_scale = tl.where(row_ok, qs * (sm_scale * LOG2E), 1.0)
    offs_h = tl.arange(0, D // 2)
    qrow = q_ptr + b * s_qb + hq[:, None] * s_qh + offs_h[None, :]
    q_a = tl.load(qrow, mask=row_ok[:, None], other=0.0).to(tl.float16)
    q_b = tl.load(qrow + D // 2, mask=row_ok[:, None], other=0.0).to(tl.float16)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc_a = tl.zeros((BM, D // 2), dtype=tl.float32)
    acc_b = tl.zeros((BM, D // 2), dtype=tl.float32)
    kbase = b * s_kb + hk * s_kh
    sbase = b * s_ksb + hk * s_ksh
    vbase = b * s_vb + hk * s_vh
    offs_t = tl.arange(0, BN)
    for start in range(k_lo, k_hi, BN):
        kpos = start + offs_t
        k_ok = kpos < k_hi
        ksc = tl.load(ks_ptr + sbase + kpos, mask=k_ok, other=0.0).to(tl.float32)
        vsc = tl.load(vs_ptr + sbase + kpos, mask=k_ok, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + kbase + kpos[:, None] * s_kl + offs_h[None, :], mask=k_ok[:, None], other=0)
        if SYM:
            kz = kc
            vz = kc
        else:
            kz = tl.load(kz_ptr + sbase + kpos, mask=k_ok, other=0)[:, None]
            vz = tl.load(vz_ptr + sbase + kpos, mask=k_ok, other=0)[:, None]
        ka, kb = nibbles_f16(kc, kz, SYM, not SYM, ASM)
        s = tl.dot(q_a, tl.trans(ka))
        s = tl.dot(q_b, tl.trans(kb), s)
        s = tl.where(k_ok[None, :], s * ksc[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s * qk_scale[:, None] - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_a = acc_a * alpha[:, None]
        acc_b = acc_b * alpha[:, None]
        m_i = m_new
        # the V tile of this block: (D/2, BN) bytes, keys contiguous; padded keys past Lk are zero codes
        vct = tl.load(vt_ptr + vbase + (start // BN) * (D // 2) * BN + offs_h[:, None] * BN + offs_t[None, :])
        vc = tl.trans(vct)
        if not SYM:
            vz = tl.where(k_ok[:, None], vz, 0)
        va, vb = nibbles_f16(vc, vz, SYM, not SYM, ASM)
        pv = (p * vsc[None, :]).to(tl.float16)
        acc_a += tl.dot(pv, va)
        acc_b += tl.dot(pv, vb)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    cha = tl.arange(0, D // 2)
    optr = part_ptr + b * s_pb + hq[:, None] * s_ph + split * s_ps + cha[None, :]
    tl.store(optr, acc_a / l_safe[:, None], mask=row_ok[:, None])
    tl.store(optr + D // 2, acc_b / l_safe[:, None], mask=row_ok[:, None])
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
    tl.store(lse_ptr + (b * HQ + hq) * SPLITS + split, lse, mask=row_ok)
