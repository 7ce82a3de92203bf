"""Attention over the INT4 KV cache with FP8 queries and an optional low-rank bias (FlashBias), in Triton.

Inputs (the cache format of fireq.formats.kv, head-major):
  q: (B, Hq, Lq, D) float8_e4m3fn with q_scale (B, Hq, Lq) fp32     (per token per head)
  k, v: (B, Hkv, Lk, D/2) uint8 codes (fireq.formats.kv's layout: byte j of channel group g holds
        channels g*G + j (low nibble) and g*G + G/2 + j (high); symmetric: two's complement,
        asymmetric: unsigned with zero points), k_scale, v_scale: (B, Hkv, Lk, D/G) fp8 or bf16,
        k_zero, v_zero: (B, Hkv, Lk, D/G) uint8 or None
  q_bias: (B, Hq, Lq, R), k_bias: (B, Hkv or 1, Lk, R) (FlashBias factors, R <= 64) or None
Output: (B, Hq, Lq, D) in out_dtype, = softmax(q k^T * scale + q_bias k_bias^T + mask) v with
  causal: query i (at absolute position Lk - Lq + i) sees keys j <= its position;
  window W > 0: and keys with position > query position - W (Gemma 3's local layers).

Schedule: one program per (batch, KV head, block of BM rows, KV split). The rows are the Lq x (Hq/Hkv)
(query, head) pairs of one GQA group, so K and V tiles are read once for the whole group (decode reads
each KV head's cache once). Q.K^T is an FP8 tensor-core product per channel group (two, over the
group's halves: the cache layout puts them in the two nibbles of a byte, so no register interleave is
needed) with the key scales applied to the scores; P.V multiplies P (scaled by V's per-token scales) in
fp16 with V's integer codes (exact in fp16), into two accumulators (low-nibble and high-nibble channels).
Online softmax in fp32 (exp2), the query's scale folded into the exponent's FMA. With SPLITS > 1 (decode),
each split writes a partial output and its log-sum-exp, combined by a second small kernel.

Staged prefill (staged=, default on the GPU for long queries; one scale a token): _stage_kv first writes
the cache once as MMA-ready codes (K: FP8 (Lk, D); V: fp16 (Lk, D), with FP8 scales as codes times the
token's scale (exact), or with pv_fp8 FP8 along tokens (D, Lk); on sm_90+ without bias factors also a
copy of the key scales (fp16, exact) for TMA loads), then _attn_fwd_staged runs the key loop on
TMA-loaded tiles with no conversion (and with V scaled, no V scale: H200 0.83x -> 0.96x SDPA,
benchmarks/results/attn-vscaled-diag-h200.json): one FP8 product over the head for Q.K^T, P.V in fp16
or FP8 (P times V's scales over the head's largest V scale, times PV_RANGE, rounded to E4M3: the twin's
rounding). H100: 0.79x SDPA (fp16 P.V) and 0.85x (FP8 P.V) against
0.65x for the unstaged kernel (benchmarks/results/attn-staged-diag-h100.json). Bias factors with R <= 2
(ALiBi) are one more MMA there (BIAS_MMA): _split_bias_keys writes the key factors once as a (Lk, 16) bf16
operand, each factor in three bf16 parts, the query side is built the same way per program, and the six
partial products of each factor (hh, hm, mh, hl, lh, mm) accumulate onto the scores in fp32: the bias at
fp32 accuracy with no per-score arithmetic (ALiBi overhead 1.26x -> 1.10x the no-bias time on the H100).

pv_fp8=True (one scale a token): P.V as an FP8 MMA instead. P times V's per-token scales over the
running largest V scale (a scalar per program, rescaled with the running max) times PV_RANGE = 256 is
rounded to E4M3, V's codes convert to FP8 (exact). 2.7% off the FP16 result (P's 3 mantissa bits), so it
is off by default. In this (unstaged) kernel it is also slower (prefill 0.64-0.80x, decode 0.82-0.92x,
benchmarks/results/attn-pvfp8-diag-h100.json): FP8 MMAs take their second operand K-major (keys
contiguous) and V's tile here is channel-contiguous, so the converted tile is transposed through shared
memory every step (8-bit types have no ldmatrix.trans); the staged prefill lays V out along tokens and
gains from it. The twin is kv4_attention_ref(pv_fp8_scale=...).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .gemm_w4a8 import _round_to_fp8_grid
from .int4cvt import nibbles_f16, nibbles_fp8, use_asm

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e)
# staged prefill defaults (H100: benchmarks/results/attn-staged-diag-h100.json)
STAGED_BM, STAGED_BN, STAGED_WARPS, STAGED_STAGES = 64, 128, 4, 2
STAGED_TMA = True  # K and V tiles by tensor-memory descriptors on sm_90+ (pointer loads otherwise)
# the decode kernel's code tiles by descriptors (one group a token, sm_90+): asymmetric caches 1.76 -> 1.87x
# SDPA on the H100 (attn-decode-tma-diag-h100.json). Symmetric caches lost there (2.07 -> 2.03) and gain on
# the H200 once the scales are prefetched (UNSTAGED_PREFETCH): 1.76 -> 1.90x (attn-decode-symtma-diag-h200.json)
UNSTAGED_TMA = True
UNSTAGED_TMA_SYM = True
# decode-sized row blocks (<= 16): Q.K^T as an fp16 MMA on fp16-converted key codes instead of FP8 (no cvt
# to FP8; the same products, exact either way): +1-9% at decode in an H100 sweep (scripts/diag_decode_attn.py)
# whose JSON was lost with its session; on by default in the H200 run of attention-h200.json
DECODE_QK_F16 = True
# the unstaged kernel (decode) loads each tile's per-token scales and zero points one iteration early:
# asymmetric caches 1.61 -> 1.78x SDPA, symmetric 1.74 -> 1.76x on the H200 (attn-decode-prefetch-diag-h200.json)
UNSTAGED_PREFETCH = True
# decode default: one-warp programs of 16 rows x 64 keys (a warp holds whole key tiles: its softmax needs no
# cross-warp exchange; 255 registers, eight programs an SM), split along the keys until the grid has about
# DECODE_PROGRAMS programs (one wave on 132 SMs). H200: 1.87 -> 1.97x SDPA (asymmetric 1.78 -> 1.89x) over the
# 2-warp 128-key programs at 512 (attn-decode-w1-diag-h200.json, attn-decode-w1b-diag-h200.json)
DECODE_BN, DECODE_WARPS, DECODE_PROGRAMS = 64, 1, 1024
# decode over short caches (one 128-key tile a split fits in SHORT_PROGRAMS programs: a chat turn's 0.5-4K
# tokens at B = 1, 512 at B = 8): 4-warp programs of 16 rows x 128 keys, one tile a split. Caches cold in L2 as
# in a model's step, H200: 1.07-1.25x the 256-key programs of two tiles a split at 512-4K x 1 and 512 x 8; no
# gain with more blocks, where the rule does not apply (attn-decode-short-diag-h200.json)
SHORT_BN, SHORT_PROGRAMS = 128, 256
# staged prefill with R <= 2 bias factors: the bias as one bf16 MMA chained onto the scores (each factor
# split into three bf16 parts, six partial products: fp32-level accuracy) instead of R FMAs a score
BIAS_MMA = True
# staged prefill, fp16 P.V: V staged as codes times their scale (exact with FP8 scales), no V scale in the
# loop (H200: 0.83x -> 0.96x SDPA, attn-vscaled-diag-h200.json)
STAGED_V_SCALED = True
# staged prefill on sm_90+ without bias factors: the key scales by a tensor-memory descriptor over a copy the
# staging pass writes (fp16 for FP8 scales): +3% on the H200 (attn-ks16-diag-h200.json); with the bias MMA
# 2-4% slower, and the bias operand by a descriptor no faster (attn-kbtma-diag-h200.json,
# attn-ks16-bias-diag-h200.json)
STAGED_KS_TMA = True
# where the key scales are pointer loads (bias factors, or no TMA): loaded one tile ahead. ALiBi overhead
# 1.09 -> 1.075 (asymmetric: 1.05 at 3 stages) on the H200, attn-alibi-prefetch-diag-h200.json
STAGED_KS_PREFETCH = True
PV_RANGE = tl.constexpr(256.0)  # FP8 P.V: P * v_scale / max(v_scale) is scaled into [0, PV_RANGE]
STAGE_ALIGN = tl.constexpr(256)  # ragged staging covers each sequence's keys rounded up to this (>= BN)


@triton.jit
def _block_ranges(pid_m, split, b, hk, lq_ptr, lk_ptr, Lq, Lk, window, REP: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, SPLITS: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENS: tl.constexpr):
    """The rows of a block (flattened (query, head in group)) and its key ranges: [k_lo, k_hi) for this
    split, of which [k_lo, k_full) are whole tiles that every row sees (no mask needed)."""
    if HAS_LENS:  # ragged batch: this sequence's queries and keys are the first lq_b and lk_b
        LQB = tl.load(lq_ptr + b)
        LKB = tl.load(lk_ptr + b)
    else:
        LQB = Lq
        LKB = Lk
    rows = pid_m * BM + tl.arange(0, BM)
    qpos = rows // REP
    hq = hk * REP + rows % REP
    in_mem = qpos < Lq  # rows of the (padded) output
    row_ok = qpos < LQB
    abs_q = LKB - LQB + qpos  # absolute position of each query
    hi = LKB
    if CAUSAL:
        hi = tl.minimum(LKB, LKB - LQB + (pid_m * BM + BM - 1) // REP + 1)
    lo_w = tl.maximum(0, LKB - LQB + (pid_m * BM) // REP - window + 1)
    lo = tl.where(window > 0, (lo_w // BN) * BN, 0)
    per = tl.cdiv(tl.cdiv(hi - lo, BN), SPLITS) * BN
    k_lo = lo + split * per
    k_hi = tl.minimum(hi, k_lo + per)
    if CAUSAL:
        lim = tl.minimum(k_hi, LKB - LQB + (pid_m * BM) // REP + 1)
    else:
        lim = k_hi
    k_full = k_lo + (tl.maximum(lim - k_lo, 0) // BN) * BN
    k_full = tl.where(window > 0, k_lo, k_full)
    return rows, qpos, hq, in_mem, row_ok, abs_q, k_lo, k_hi, k_full


@triton.jit
def _bias_rows(qb_ptr, b, hq, qpos, row_ok, bias_unit, s_qbb, s_qbh, s_qbl,
               BM: tl.constexpr, R: tl.constexpr, RT: tl.constexpr):
    """The query side of the bias factors, in the units of the unscaled scores: (qb0, qb1) for R <= 2 (kept
    in registers), the (BM, R) tile for R > 8 (an MMA); the unused ones are zeros the compiler drops."""
    qb0 = tl.zeros((BM,), dtype=tl.float32)
    qb1 = qb0
    qbias = tl.zeros((BM, R), dtype=tl.float32)
    qrow = qb_ptr + b * s_qbb + hq * s_qbh + qpos * s_qbl
    if RT <= 2:
        qb0 = tl.load(qrow, mask=row_ok, other=0.0).to(tl.float32) * bias_unit
        qb1 = qb0
        if RT == 2:
            qb1 = tl.load(qrow + 1, mask=row_ok, other=0.0).to(tl.float32) * bias_unit
    elif RT > 8:
        offs_r = tl.arange(0, R)
        qbias = tl.load(qrow[:, None] + offs_r[None, :], mask=row_ok[:, None],
                        other=0.0).to(tl.float32) * bias_unit[:, None]
    return qb0, qb1, qbias


@triton.jit
def _bias_keys(kb_ptr, b, hk, kpos, k_ok, s_kbb, s_kbh, s_kbl, RT: tl.constexpr):
    """A key tile's factors for R <= 2 (loaded at the top of the iteration, so their latency hides); for a
    larger R _add_bias loads them itself and these are zeros the compiler drops."""
    kb0 = tl.zeros(kpos.shape, dtype=tl.float32)
    kb1 = kb0
    if RT <= 2:
        krow = kb_ptr + b * s_kbb + hk * s_kbh + kpos * s_kbl
        kb0 = tl.load(krow, mask=k_ok, other=0.0).to(tl.float32)
        kb1 = kb0
        if RT == 2:
            kb1 = tl.load(krow + 1, mask=k_ok, other=0.0).to(tl.float32)
    return kb0, kb1


@triton.jit
def _add_bias(s, qb0, qb1, qbias, kb0, kb1, qb_ptr, kb_ptr, b, hq, hk, qpos, kpos, row_ok, k_ok, bias_unit,
              s_qbb, s_qbh, s_qbl, s_kbb, s_kbh, s_kbl, R: tl.constexpr, RT: tl.constexpr):
    """s + q_bias k_bias^T for one (BM, BN) tile, in fp32: factors like ALiBi's slope * [1, i] and [-j, 1]
    cancel to slope * (i - j)."""
    if RT <= 2:
        s += qb0[:, None] * kb0[None, :]
        if RT == 2:
            s += qb1[:, None] * kb1[None, :]
    elif RT <= 8:  # a few rank-1 updates of the score tile
        for r in tl.static_range(RT):
            qbr = tl.load(qb_ptr + b * s_qbb + hq * s_qbh + qpos * s_qbl + r, mask=row_ok, other=0.0).to(tl.float32)
            kbr = tl.load(kb_ptr + b * s_kbb + hk * s_kbh + kpos * s_kbl + r, mask=k_ok, other=0.0).to(tl.float32)
            s += (qbr * bias_unit)[:, None] * kbr[None, :]
    else:
        offs_r = tl.arange(0, R)
        kbias = tl.load(kb_ptr + b * s_kbb + hk * s_kbh + kpos[:, None] * s_kbl + offs_r[None, :],
                        mask=k_ok[:, None], other=0.0).to(tl.float32)
        s += tl.dot(qbias, tl.trans(kbias), input_precision="ieee")
    return s


@triton.jit
def _phase_range(phase: tl.constexpr, k_lo, k_full, k_hi):
    """The key range of a phase of the key loop: 0, the tiles every row of the block sees whole (no mask
    arithmetic); 1, the rest (the causal diagonal, the window, the ragged ends)."""
    p_lo = k_full
    p_hi = k_hi
    if phase == 0:
        p_lo = k_lo
        p_hi = k_full
    return p_lo, p_hi


@triton.jit
def _per_token(ptr, sbase, s_ksl, start, p_hi, k_hi, BN: tl.constexpr):
    """A per-token value (scale or zero point, one a token) of the BN keys from start; zeros past the
    phase's or the split's end."""
    kpos = start + tl.arange(0, BN)
    return tl.load(ptr + sbase + kpos * s_ksl, mask=(kpos < k_hi) & (kpos < p_hi), other=0.0)


@triton.jit
def _token_params(ks_ptr, vs_ptr, kz_ptr, vz_ptr, sbase, s_ksl, start, p_hi, k_hi, BN: tl.constexpr,
                  SYM: tl.constexpr):
    """One scale a token: the key and value scales (and zero points; SYM: the scales again, unused) of the
    BN keys from start, zeros past the phase's or the split's end."""
    ksc = _per_token(ks_ptr, sbase, s_ksl, start, p_hi, k_hi, BN)
    vsc = _per_token(vs_ptr, sbase, s_ksl, start, p_hi, k_hi, BN)
    kz = ksc
    vz = vsc
    if not SYM:
        kz = _per_token(kz_ptr, sbase, s_ksl, start, p_hi, k_hi, BN)
        vz = _per_token(vz_ptr, sbase, s_ksl, start, p_hi, k_hi, BN)
    return ksc, vsc, kz, vz


@triton.jit
def _mask_and_max(s, m_i, qk_scale, kpos, k_ok, row_ok, abs_q, window, CAUSAL: tl.constexpr,
                  MASKED: tl.constexpr):
    """The masks (MASKED: the causal diagonal, the window, the ragged ends; otherwise every key of the tile
    is visible to every row and every score finite) and the new running max in log2 units: (s, m_new, m_safe)
    with m_safe = 0 for rows that have seen no key yet."""
    if MASKED:
        keep = k_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (kpos[None, :] <= abs_q[:, None])
        if window > 0:
            keep = keep & (kpos[None, :] > abs_q[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        m_safe = m_new
    return s, m_new, m_safe


@triton.jit
def _softmax_tile(s, m_i, l_i, qk_scale, kpos, k_ok, row_ok, abs_q, window, CAUSAL: tl.constexpr,
                  MASKED: tl.constexpr):
    """One key tile of the online softmax over the unscaled scores s: (p, alpha, l_i, m_new), the tile's
    probabilities (unnormalized, exp2 in log2 units), the factor that rescales what came before, the new
    running sum and the new running max."""
    s, m_new, m_safe = _mask_and_max(s, m_i, qk_scale, kpos, k_ok, row_ok, abs_q, window, CAUSAL, MASKED)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale[:, None] - m_safe[:, None])
    return p, alpha, l_i * alpha + tl.sum(p, axis=1), m_new


@triton.jit
def _attn_fwd(
    q_ptr, qs_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, qb_ptr, kb_ptr,
    out_ptr, lse_ptr, lq_ptr, lk_ptr,
    Lq, Lk, sm_scale, window,
    s_qb, s_qh, s_ql, s_qsb, s_qsh,
    s_kb, s_kh, s_kl, s_ksb, s_ksh, s_ksl,
    s_qbb, s_qbh, s_qbl, s_kbb, s_kbh, s_kbl,
    s_ob, s_oh, s_ol, s_os,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G: tl.constexpr, R: tl.constexpr,
    SYM: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, SPLITS: tl.constexpr, RT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, HAS_LENS: tl.constexpr, ASM: tl.constexpr, PV_FP8: tl.constexpr,
    EXACT_ROUND: tl.constexpr, TMA: tl.constexpr, QK_F16: tl.constexpr, PREFETCH: tl.constexpr,
):
    REP: tl.constexpr = HQ // HKV
    NG: tl.constexpr = D // G
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // HKV
    hk = bh % HKV

    rows, qpos, hq, in_mem, row_ok, abs_q, k_lo, k_hi, k_full = _block_ranges(
        pid_m, split, b, hk, lq_ptr, lk_ptr, Lq, Lk, window, REP, BM, BN, SPLITS, CAUSAL, HAS_LENS)

    qs = tl.load(qs_ptr + b * s_qsb + hq * s_qsh + qpos, mask=row_ok, other=0.0)
    # per row, in log2 units (padded rows: 1, so that -inf * scale stays -inf; their output is zeroed). It
    # rides in exp2's FMA: max(c s) = c max(s) for c > 0, p = exp2(s c - m), and the bias factors come
    # divided by it (one multiply a score less; prefill +4-7%, attn-foldq-diag-h100.json)
    qk_scale = tl.where(row_ok, qs * (sm_scale * LOG2E), 1.0)
    bias_unit = LOG2E / qk_scale  # a bias term in the units of the unscaled scores
    offs_gh = tl.arange(0, G // 2)
    offs_dh = tl.arange(0, D // 2)
    if HAS_BIAS:
        qb0, qb1, qbias = _bias_rows(qb_ptr, b, hq, qpos, row_ok, bias_unit, s_qbb, s_qbh, s_qbl, BM, R, RT)
    if NG == 1:  # the query tile stays in registers for the whole key loop
        qrow0 = q_ptr + b * s_qb + hq[:, None] * s_qh + qpos[:, None] * s_ql + offs_gh[None, :]
        q_a = tl.load(qrow0, mask=row_ok[:, None], other=0.0)
        q_b = tl.load(qrow0 + G // 2, mask=row_ok[:, None], other=0.0)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc_a = tl.zeros((BM, D // 2), dtype=tl.float32)  # channels cha (low nibbles)
    acc_b = tl.zeros((BM, D // 2), dtype=tl.float32)  # channels cha + G/2 (high nibbles)
    if PV_FP8:  # running max of V's per-token scales: the accumulators hold P.V * PV_RANGE / c_i
        c_i = tl.max(tl.full((BM,), 1e-30, dtype=tl.float32), axis=0)  # one value for the program (one KV head)
    gcol = offs_dh // (G // 2)  # group of each nibble column
    cha = gcol * G + offs_dh % (G // 2)
    kbase = b * s_kb + hk * s_kh
    sbase = b * s_ksb + hk * s_ksh
    # two phases: key tiles that every row of the block sees whole (no mask arithmetic), then the rest
    # (the causal diagonal, the window, the ragged ends) with masks
    for phase in tl.static_range(2):
        p_lo, p_hi = _phase_range(phase, k_lo, k_full, k_hi)
        if NG == 1 and PREFETCH:  # the phase's first tile of per-token scales (and zero points)
            ksc_n, vsc_n, kz_n, vz_n = _token_params(ks_ptr, vs_ptr, kz_ptr, vz_ptr, sbase, s_ksl, p_lo, p_hi, k_hi,
                                                     BN, SYM)
        for start in range(p_lo, p_hi, BN):
            kpos = start + tl.arange(0, BN)
            k_ok = kpos < k_hi
            # the tile's small loads first (per-token scales, bias factors), so their latency
            # hides behind the code loads, conversions and MMAs that come before their use; PREFETCH:
            # those of the next tile, one iteration early (a byte a key is too narrow for the pipeliner's
            # asynchronous copies, so these loads would otherwise wait on memory inside each iteration)
            if NG == 1 and PREFETCH:
                ksc1 = ksc_n
                vsc1 = vsc_n
                kz1 = kz_n
                vz1 = vz_n
                ksc_n, vsc_n, kz_n, vz_n = _token_params(ks_ptr, vs_ptr, kz_ptr, vz_ptr, sbase, s_ksl, start + BN,
                                                         p_hi, k_hi, BN, SYM)
            elif NG == 1:
                ksc1 = tl.load(ks_ptr + sbase + kpos * s_ksl, mask=k_ok, other=0.0)
                vsc1 = tl.load(vs_ptr + sbase + kpos * s_ksl, mask=k_ok, other=0.0)
            if HAS_BIAS:
                kb0, kb1 = _bias_keys(kb_ptr, b, hk, kpos, k_ok, s_kbb, s_kbh, s_kbl, RT)
            s = tl.zeros((BM, BN), dtype=tl.float32)
            for gi in tl.static_range(NG):
                # byte j of group gi holds channels gi*G + j (low nibble) and gi*G + G/2 + j (high): two
                # products over the group's halves, no register interleave
                if NG == 1:
                    qa = q_a
                    qb = q_b
                else:
                    qrow = q_ptr + b * s_qb + hq[:, None] * s_qh + qpos[:, None] * s_ql + gi * G + offs_gh[None, :]
                    qa = tl.load(qrow, mask=row_ok[:, None], other=0.0)
                    qb = tl.load(qrow + G // 2, mask=row_ok[:, None], other=0.0)
                if TMA:  # one group a token: a 3-d descriptor (B * Hkv, Lk, D/2), zeros past Lk
                    kc = k_ptr.load([bh, start, 0]).reshape(BN, D // 2)
                else:
                    kc = tl.load(k_ptr + kbase + kpos[:, None] * s_kl + gi * (G // 2) + offs_gh[None, :],
                                 mask=k_ok[:, None], other=0)
                if SYM:
                    kz = kc
                elif NG == 1 and PREFETCH:
                    kz = kz1[:, None]
                else:
                    kz = tl.load(kz_ptr + sbase + kpos * s_ksl + gi, mask=k_ok, other=0)[:, None]
                if G // 2 >= 32 and not QK_F16:  # FP8 tensor cores (K >= 32 a product)
                    ka, kb = nibbles_fp8(kc, kz, SYM, not SYM, ASM)
                    sg = tl.dot(qa, tl.trans(ka))
                    sg = tl.dot(qb, tl.trans(kb), sg)
                else:  # groups of 32 (or QK_F16): fp16 products (FP8 values are exact in fp16)
                    ka, kb = nibbles_f16(kc, kz, SYM, not SYM, ASM)
                    sg = tl.dot(qa.to(tl.float16), tl.trans(ka))
                    sg = tl.dot(qb.to(tl.float16), tl.trans(kb), sg)
                if NG == 1:
                    ksc = ksc1.to(tl.float32)
                else:
                    ksc = tl.load(ks_ptr + sbase + kpos * s_ksl + gi, mask=k_ok, other=0.0).to(tl.float32)
                s += sg * ksc[None, :]
            if HAS_BIAS:
                s = _add_bias(s, qb0, qb1, qbias, kb0, kb1, qb_ptr, kb_ptr, b, hq, hk, qpos, kpos, row_ok, k_ok,
                              bias_unit, s_qbb, s_qbh, s_qbl, s_kbb, s_kbh, s_kbl, R, RT)
            p, alpha, l_i, m_new = _softmax_tile(s, m_i, l_i, qk_scale, kpos, k_ok, row_ok, abs_q, window, CAUSAL,
                                                 phase == 1)
            if PV_FP8:
                vsc = vsc1.to(tl.float32)
                c_new = tl.maximum(c_i, tl.max(vsc, axis=0))
                alpha = alpha * (c_i / c_new)
                c_i = c_new
            acc_a = acc_a * alpha[:, None]
            acc_b = acc_b * alpha[:, None]
            m_i = m_new
            # P V: V's per-token (per group) scales go on P's columns; V's codes are exact in fp16. Column c
            # of a nibble tile is channel cha[c] (low) or cha[c] + G/2 (high)
            if TMA:
                vc = v_ptr.load([bh, start, 0]).reshape(BN, D // 2)
            else:
                vc = tl.load(v_ptr + kbase + kpos[:, None] * s_kl + offs_dh[None, :], mask=k_ok[:, None], other=0)
            if NG == 1:
                if SYM:
                    vz = vc
                elif PREFETCH:
                    vz = vz1[:, None]
                else:
                    vz = tl.load(vz_ptr + sbase + kpos * s_ksl, mask=k_ok, other=0)[:, None]
                if PV_FP8:
                    # FP8 P.V: P times V's per-token scales over their running max, into [0, PV_RANGE]
                    # (E4M3's normal range reaches 448; 2^-14 of a row's largest term stays normal)
                    va8, vb8 = nibbles_fp8(vc, vz, SYM, not SYM, ASM)
                    pv = p * (vsc * (PV_RANGE / c_i))[None, :]
                    if EXACT_ROUND:
                        pv = _round_to_fp8_grid(pv)
                    pv8 = pv.to(tl.float8e4nv)
                    acc_a = tl.dot(pv8, va8, acc_a)
                    acc_b = tl.dot(pv8, vb8, acc_b)
                else:
                    va, vb = nibbles_f16(vc, vz, SYM, not SYM, ASM)
                    vsc = vsc1.to(tl.float32)
                    pv = (p * vsc[None, :]).to(tl.float16)
                    acc_a += tl.dot(pv, va)
                    acc_b += tl.dot(pv, vb)
            else:
                if SYM:
                    vz = vc
                else:
                    vz = tl.load(vz_ptr + sbase + kpos[:, None] * s_ksl + gcol[None, :], mask=k_ok[:, None], other=0)
                va, vb = nibbles_f16(vc, vz, SYM, not SYM, ASM)
                vsc = tl.load(vs_ptr + sbase + kpos[:, None] * s_ksl + gcol[None, :], mask=k_ok[:, None],
                              other=0.0).to(tl.float32)
                p16 = p.to(tl.float16)
                acc_a += tl.dot(p16, (va.to(tl.float32) * vsc).to(tl.float16))
                acc_b += tl.dot(p16, (vb.to(tl.float32) * vsc).to(tl.float16))
    acc_a = tl.where(row_ok[:, None], acc_a, 0.0)  # padded rows of a ragged batch: zeros
    acc_b = tl.where(row_ok[:, None], acc_b, 0.0)
    l_i = tl.where(row_ok, l_i, 0.0)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    den = l_safe
    if PV_FP8:
        den = l_safe * (PV_RANGE / c_i)
    optr = out_ptr + b * s_ob + hq[:, None] * s_oh + qpos[:, None] * s_ol + split * s_os + cha[None, :]
    tl.store(optr, (acc_a / den[:, None]).to(out_ptr.dtype.element_ty), mask=in_mem[:, None])
    tl.store(optr + G // 2, (acc_b / den[:, None]).to(out_ptr.dtype.element_ty), mask=in_mem[:, None])
    if SPLITS > 1:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(lse_ptr + ((b * HQ + hq) * Lq + qpos) * SPLITS + split, lse, mask=in_mem)


@triton.jit
def _combine(part_ptr, lse_ptr, out_ptr, s_pb, s_ph, s_pl, s_ps, s_ob, s_oh, s_ol, Lq,
             HQ: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, SP2: tl.constexpr):
    """out = sum_s exp2(lse_s - max) * part_s / sum_s exp2(lse_s - max), one program per (b, h, q)."""
    pid = tl.program_id(0)
    qpos = pid % Lq
    bh = pid // Lq
    b = bh // HQ
    h = bh % HQ
    offs_s = tl.arange(0, SP2)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < SPLITS
    lse = tl.load(lse_ptr + pid * SPLITS + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    part = tl.load(part_ptr + b * s_pb + h * s_ph + qpos * s_pl + offs_s[:, None] * s_ps + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)
    o = tl.sum(part * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    tl.store(out_ptr + b * s_ob + h * s_oh + qpos * s_ol + offs_d, o.to(out_ptr.dtype.element_ty))


@triton.jit
def _stage_kv(k_ptr, kz_ptr, v_ptr, vz_ptr, vs_ptr, k8_ptr, vo_ptr, vmax_ptr, lk_ptr, ks_ptr, ksc_ptr, Lk,
              s_kb, s_kh, s_kl, s_ksb, s_ksh, s_ksl, s_vob, s_voh, s_vol, s_vod,
              HKV: tl.constexpr, D: tl.constexpr, SYM: tl.constexpr, PV_FP8: tl.constexpr,
              HAS_LENS: tl.constexpr, BT: tl.constexpr, ASM: tl.constexpr, V_SCALED: tl.constexpr,
              KS_COPY: tl.constexpr):
    """The INT4 cache of one (batch, KV head) as MMA-ready codes, once per call (one scale a token):
    K as FP8 codes (Lk, D) in channel order; V as fp16 codes (Lk, D), or (V_SCALED) fp16 values codes
    times the token's scale (exact: a code of at most 4 bits, less its zero point, times an FP8 scale has
    at most 8 significant bits and stays inside fp16's range), or (PV_FP8) FP8 codes along tokens (D, Lk)
    with the largest V scale of the head's valid keys (atomic max) in vmax. KS_COPY: the key scales also as a (B * Hkv, Lk) copy in
    ksc_ptr's dtype (fp16 for FP8 scales, exact; fp32 otherwise), for tensor-memory loads."""
    pid_t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    tok = pid_t * BT + tl.arange(0, BT)
    ok = tok < Lk
    valid = ok
    if HAS_LENS:  # a ragged batch in a longer buffer (static cache): only whole key tiles the attention can
        # read (its tiles start at multiples of BN <= STAGE_ALIGN) are staged
        LKB = tl.load(lk_ptr + b)
        if pid_t * BT >= tl.cdiv(LKB, STAGE_ALIGN) * STAGE_ALIGN:
            return
        # keys past the sequence's length are staged as zeros: the attention loads a tile's tail whole (by
        # TMA) and multiplies it by p = 0, and what a buffer holds there (never written, or a previous
        # sequence's) can stage as Inf (codes minus a stray zero point, times its scale, past fp16) or NaN
        valid = tok < LKB
    offs = tl.arange(0, D // 2)
    src = b * s_kb + hk * s_kh + tok[:, None] * s_kl + offs[None, :]
    sbase = b * s_ksb + hk * s_ksh + tok * s_ksl
    kc = tl.load(k_ptr + src, mask=valid[:, None], other=0)
    vc = tl.load(v_ptr + src, mask=valid[:, None], other=0)
    if SYM:
        kz = kc
        vz = vc
    else:
        kz = tl.load(kz_ptr + sbase, mask=valid, other=0)[:, None]
        vz = tl.load(vz_ptr + sbase, mask=valid, other=0)[:, None]
    klo, khi = nibbles_fp8(kc, kz, SYM, not SYM, ASM)
    dst = (bh * Lk + tok[:, None]) * D + offs[None, :]  # k8: (B, Hkv, Lk, D) contiguous
    tl.store(k8_ptr + dst, klo, mask=ok[:, None])
    tl.store(k8_ptr + dst + D // 2, khi, mask=ok[:, None])
    if KS_COPY:
        ks = tl.load(ks_ptr + sbase, mask=valid, other=0.0).to(ksc_ptr.dtype.element_ty)
        tl.store(ksc_ptr + bh * Lk + tok, ks, mask=ok)
    if PV_FP8:
        vlo, vhi = nibbles_fp8(vc, vz, SYM, not SYM, ASM)
    else:
        vlo, vhi = nibbles_f16(vc, vz, SYM, not SYM, ASM)
        if V_SCALED:
            vsc = tl.load(vs_ptr + sbase, mask=valid, other=0.0).to(tl.float16)[:, None]
            vlo = vlo * vsc
            vhi = vhi * vsc
    vdst = b * s_vob + hk * s_voh + tok[:, None] * s_vol + offs[None, :] * s_vod
    tl.store(vo_ptr + vdst, vlo, mask=ok[:, None])
    tl.store(vo_ptr + vdst + (D // 2) * s_vod, vhi, mask=ok[:, None])
    if PV_FP8:
        vs = tl.load(vs_ptr + sbase, mask=valid, other=0.0).to(tl.float32)
        tl.atomic_max(vmax_ptr + bh, tl.max(vs, axis=0))


@triton.jit
def _split3(x):
    """x (fp32) as three bf16 parts h + m + l (each residual exact in fp32): 24 significant bits."""
    h = x.to(tl.bfloat16)
    r = x - h.to(tl.float32)
    m = r.to(tl.bfloat16)
    return h, m, (r - m.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _bias_operand(f0, f1, QSIDE: tl.constexpr, BF16: tl.constexpr):
    """(n, 16) bf16 MMA operand of two bias factors (n,) fp32: factor r in columns 6r..6r+5, the parts
    (h, h, m, h, l, m) on the query side and (h, m, h, l, h, m) on the key side, so that the product sums
    hh + hm + mh + hl + lh + mm of each factor (the dropped terms are below fp32's rounding); zeros after.
    BF16 False (the interpreter, whose bf16 dot is not usable): the same values held in fp32."""
    c = tl.arange(0, 16)[None, :]
    part = c % 6
    h0, m0, l0 = _split3(f0)
    h1, m1, l1 = _split3(f1)
    h = tl.where(c < 6, h0.to(tl.float32)[:, None], h1.to(tl.float32)[:, None])
    m = tl.where(c < 6, m0.to(tl.float32)[:, None], m1.to(tl.float32)[:, None])
    lo = tl.where(c < 6, l0.to(tl.float32)[:, None], l1.to(tl.float32)[:, None])
    if QSIDE:
        v = tl.where((part == 2) | (part == 5), m, tl.where(part == 4, lo, h))
    else:
        v = tl.where((part == 1) | (part == 5), m, tl.where(part == 3, lo, h))
    v = tl.where(c < 12, v, 0.0)
    if BF16:
        v = v.to(tl.bfloat16)
    return v


@triton.jit
def _split_bias_keys(kb_ptr, out_ptr, L, s_kbb, s_kbh, s_kbl, RT: tl.constexpr, BT: tl.constexpr,
                     BF16: tl.constexpr):
    """k_bias (Bk, Hk, L, R <= 2) -> the key-side bf16 operand (Bk, Hk, L, 16) of the bias MMA; grid
    (L / BT, Bk, Hk)."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    b = tl.program_id(1)
    h = tl.program_id(2)
    ok = t < L
    row = kb_ptr + b * s_kbb + h * s_kbh + t * s_kbl
    f0 = tl.load(row, mask=ok, other=0.0).to(tl.float32)
    f1 = tl.zeros_like(f0)
    if RT == 2:
        f1 = tl.load(row + 1, mask=ok, other=0.0).to(tl.float32)
    v = _bias_operand(f0, f1, False, BF16)
    bh = b * tl.num_programs(2) + h
    o = out_ptr + (bh.to(tl.int64) * L + t[:, None]) * 16 + tl.arange(0, 16)[None, :]
    tl.store(o, v, mask=ok[:, None])


@triton.jit
def _attn_fwd_staged(
    q_ptr, qs_ptr, k8_ptr, ks_ptr, vo_ptr, vs_ptr, vmax_ptr, qb_ptr, kb_ptr, out_ptr, lq_ptr, lk_ptr,
    Lq, Lk, sm_scale, window,
    s_qb, s_qh, s_ql, s_qsb, s_qsh,
    s_ksb, s_ksh, s_ksl, s_vob, s_voh, s_vol, s_vod,
    s_qbb, s_qbh, s_qbl, s_kbb, s_kbh, s_kbl,
    s_ob, s_oh, s_ol,
    HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, R: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr, RT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_LENS: tl.constexpr,
    PV_FP8: tl.constexpr, EXACT_ROUND: tl.constexpr, TMA: tl.constexpr, BIAS_MMA: tl.constexpr,
    BIAS_BF16: tl.constexpr, V_SCALED: tl.constexpr, KS_TMA: tl.constexpr, KS_PREFETCH: tl.constexpr,
):
    """Prefill over the staged cache (_stage_kv): the key and value tiles are MMA operands as loaded (no
    conversion in the loop), one FP8 product over the whole head for Q.K^T, P.V in fp16 or (PV_FP8) FP8
    with V along tokens. Same masks, bias and softmax as _attn_fwd; one split. BIAS_MMA (R <= 2): kb_ptr
    is _split_bias_keys's (Bk, Hk, Lk, 16) operand and the bias is a bf16 MMA chained onto the scores.
    V_SCALED: the staged V already carries its scales (vs_ptr unused). KS_TMA: ks_ptr is a descriptor over
    the staging pass's (B * Hkv, Lk) copy of the key scales."""
    REP: tl.constexpr = HQ // HKV
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # causal: the longest rows first (shorter tail)
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    rows, qpos, hq, in_mem, row_ok, abs_q, k_lo, k_hi, k_full = _block_ranges(
        pid_m, 0, b, hk, lq_ptr, lk_ptr, Lq, Lk, window, REP, BM, BN, 1, CAUSAL, HAS_LENS)
    qs = tl.load(qs_ptr + b * s_qsb + hq * s_qsh + qpos, mask=row_ok, other=0.0)
    qk_scale = tl.where(row_ok, qs * (sm_scale * LOG2E), 1.0)  # as in _attn_fwd: rides in exp2's FMA
    bias_unit = LOG2E / qk_scale
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + qpos[:, None] * s_ql + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if HAS_BIAS:
        qb0, qb1, qbias = _bias_rows(qb_ptr, b, hq, qpos, row_ok, bias_unit, s_qbb, s_qbh, s_qbl, BM, R, RT)
        if BIAS_MMA:
            qmat = _bias_operand(qb0, qb1 if RT == 2 else tl.zeros_like(qb0), True, BIAS_BF16)
            offs_c = tl.arange(0, 16)
            kb_base = kb_ptr + b * s_kbb + hk * s_kbh
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, D), dtype=tl.float32)
    if PV_FP8:
        vmax = tl.maximum(tl.load(vmax_ptr + bh), 1e-30)
        vfac = PV_RANGE / vmax
    if not TMA:
        k8_base = k8_ptr + bh.to(tl.int64) * Lk * D
        vo_base = vo_ptr + b.to(tl.int64) * s_vob + hk * s_voh
    sbase = b * s_ksb + hk * s_ksh
    for phase in tl.static_range(2):
        p_lo, p_hi = _phase_range(phase, k_lo, k_full, k_hi)
        if KS_PREFETCH and not KS_TMA:  # the phase's first tile of key scales
            kpos = p_lo + tl.arange(0, BN)
            ksc_n = tl.load(ks_ptr + sbase + kpos * s_ksl, mask=(kpos < k_hi) & (kpos < p_hi), other=0.0)
        for start in range(p_lo, p_hi, BN):
            kpos = start + tl.arange(0, BN)
            k_ok = kpos < k_hi
            if KS_TMA:  # (B * Hkv, Lk) descriptor, tiles of BN scales (past Lk: zeros)
                ksc = ks_ptr.load([bh, start]).reshape(BN).to(tl.float32)
            elif KS_PREFETCH:  # pointer loads one tile ahead (a byte a key: too narrow to be pipelined)
                ksc = ksc_n.to(tl.float32)
                npos = kpos + BN
                ksc_n = tl.load(ks_ptr + sbase + npos * s_ksl, mask=(npos < k_hi) & (npos < p_hi), other=0.0)
            elif phase == 0:
                ksc = tl.load(ks_ptr + sbase + kpos * s_ksl).to(tl.float32)
            else:
                ksc = tl.load(ks_ptr + sbase + kpos * s_ksl, mask=k_ok, other=0.0).to(tl.float32)
            if not V_SCALED:
                vsc = tl.load(vs_ptr + sbase + kpos * s_ksl, mask=k_ok, other=0.0).to(tl.float32)
            if HAS_BIAS:
                if BIAS_MMA and phase == 0:
                    kmat = tl.load(kb_base + kpos[:, None] * s_kbl + offs_c[None, :])
                elif BIAS_MMA:
                    kmat = tl.load(kb_base + kpos[:, None] * s_kbl + offs_c[None, :], mask=k_ok[:, None], other=0.0)
                else:
                    kb0, kb1 = _bias_keys(kb_ptr, b, hk, kpos, k_ok, s_kbb, s_kbh, s_kbl, RT)
            if not TMA:
                kp = k8_base + kpos[:, None] * D + offs_d[None, :]
                vp = vo_base + kpos[:, None] * s_vol + offs_d[None, :] * s_vod
            if TMA:  # tensor-memory loads of 3-d descriptors (one head a slice; past Lk: zeros)
                k8 = k8_ptr.load([bh, start, 0]).reshape(BN, D)
            elif phase == 0:  # whole tiles inside the cache: plain loads
                k8 = tl.load(kp)
            else:
                k8 = tl.load(kp, mask=k_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k8)) * ksc[None, :]
            if HAS_BIAS:
                if BIAS_MMA:
                    if BIAS_BF16:
                        s = tl.dot(qmat, tl.trans(kmat), s)
                    else:
                        s = tl.dot(qmat, tl.trans(kmat), s, input_precision="ieee")
                else:
                    s = _add_bias(s, qb0, qb1, qbias, kb0, kb1, qb_ptr, kb_ptr, b, hq, hk, qpos, kpos, row_ok, k_ok,
                                  bias_unit, s_qbb, s_qbh, s_qbl, s_kbb, s_kbh, s_kbl, R, RT)
            p, alpha, l_i, m_new = _softmax_tile(s, m_i, l_i, qk_scale, kpos, k_ok, row_ok, abs_q, window, CAUSAL,
                                                 phase == 1)
            acc = acc * alpha[:, None]
            m_i = m_new
            if TMA:
                if PV_FP8:
                    vt = tl.trans(vo_ptr.load([bh, 0, start]).reshape(D, BN))
                else:
                    vt = vo_ptr.load([bh, start, 0]).reshape(BN, D)
            elif phase == 0:
                vt = tl.load(vp)
            else:
                vt = tl.load(vp, mask=k_ok[:, None], other=0.0)
            if PV_FP8:
                pv = p * (vsc * vfac)[None, :]
                if EXACT_ROUND:
                    pv = _round_to_fp8_grid(pv)
                acc = tl.dot(pv.to(tl.float8e4nv), vt, acc)
            elif V_SCALED:  # V staged as codes times scales: P alone rounds to fp16
                acc = tl.dot(p.to(tl.float16), vt, acc)
            else:
                acc = tl.dot((p * vsc[None, :]).to(tl.float16), vt, acc)
    acc = tl.where(row_ok[:, None], acc, 0.0)
    l_i = tl.where(row_ok, l_i, 0.0)
    den = tl.where(l_i == 0.0, 1.0, l_i)
    if PV_FP8:
        den = den * vfac
    optr = out_ptr + b * s_ob + hq[:, None] * s_oh + qpos[:, None] * s_ol + offs_d[None, :]
    tl.store(optr, (acc / den[:, None]).to(out_ptr.dtype.element_ty), mask=in_mem[:, None])


@on_tensor_device
def stage_kv_triton(k: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, k_zero: torch.Tensor | None = None,
                    v_zero: torch.Tensor | None = None, pv_fp8: bool = False,
                    seqlens_k: torch.Tensor | None = None, block_t: int = 64, v_scaled: bool | None = None,
                    k_scale: torch.Tensor | None = None, num_warps: int = 4):
    """The INT4 cache (one scale a token) as MMA operands for the staged prefill: k8 (B, Hkv, Lk, D)
    float8 codes, vo (B, Hkv, Lk, D) fp16 codes, or with pv_fp8 FP8 codes along tokens (a
    (B, Hkv, Lk, D) view of (B, Hkv, D, Lk') storage, Lk' = Lk rounded up to 16) and vmax (B * Hkv,) fp32
    the largest V scale of each head's valid keys (None without pv_fp8). Codes minus zero points: exact
    small integers. With seqlens_k only the first seqlens_k[b] keys rounded up to STAGE_ALIGN are written
    (the rest of a long static-cache buffer is never read), those past seqlens_k[b] as zeros (whatever the
    buffer holds there). v_scaled (fp16 V only; None: when the scales
    are FP8, where it is exact): V as fp16 codes times their token's scale, so the attention loop needs no
    V scale. Returns (k8, vo, vmax, ks_copy): ks_copy, with k_scale given (sharing v_scale's strides), the key
    scales as a (B, Hkv, Lk) copy (fp16 for FP8 scales, exact; fp32 otherwise), else None. Twin:
    reference.stage_kv_ref."""
    if v_scaled is None:
        v_scaled = staged_v_scaled(v_scale, pv_fp8)
    bsz, hkv, lk, dh = k.shape
    d = 2 * dh
    dev = k.device
    sym = k_zero is None
    k8 = torch.empty((bsz, hkv, lk, d), dtype=torch.float8_e4m3fn, device=dev)
    if pv_fp8:
        lkp = (lk + 15) // 16 * 16
        vo = torch.empty((bsz, hkv, d, lkp), dtype=torch.float8_e4m3fn, device=dev)[..., :lk].transpose(2, 3)
        vmax = torch.zeros(bsz * hkv, dtype=torch.float32, device=dev)
    else:
        vo = torch.empty((bsz, hkv, lk, d), dtype=torch.float16, device=dev)
        vmax = None
    has_lens = seqlens_k is not None
    dummy = v_scale
    ks_copy = None
    if k_scale is not None:
        if k_scale.shape != v_scale.shape or k_scale.stride() != v_scale.stride():
            raise ValueError("stage_kv_triton: k_scale must match v_scale's shape and strides")
        ks_copy = torch.empty((bsz, hkv, lk), device=dev,
                              dtype=torch.float16 if k_scale.dtype == torch.float8_e4m3fn else torch.float32)
    _stage_kv[(triton.cdiv(lk, block_t), bsz * hkv)](
        k, k_zero if not sym else dummy, v, v_zero if not sym else dummy, v_scale, k8, vo,
        vmax if pv_fp8 else dummy, seqlens_k if has_lens else dummy, k_scale if ks_copy is not None else dummy,
        ks_copy if ks_copy is not None else dummy, lk,
        k.stride(0), k.stride(1), k.stride(2), v_scale.stride(0), v_scale.stride(1), v_scale.stride(2),
        *vo.stride(), HKV=hkv, D=d, SYM=sym, PV_FP8=pv_fp8, HAS_LENS=has_lens, BT=block_t, ASM=use_asm(),
        V_SCALED=v_scaled and not pv_fp8, KS_COPY=ks_copy is not None, num_warps=num_warps)
    return k8, vo, vmax, ks_copy


def staged_v_scaled(v_scale: torch.Tensor, pv_fp8: bool) -> bool:
    """Whether the staged prefill stages V as fp16 codes times scales (STAGED_V_SCALED, fp16 P.V, FP8
    scales: the products are exact in fp16)."""
    return STAGED_V_SCALED and not pv_fp8 and v_scale.dtype == torch.float8_e4m3fn


@on_tensor_device
def kv4_attention_triton(q8: torch.Tensor, q_scale: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor,
                         v: torch.Tensor, v_scale: torch.Tensor, sm_scale: float, causal: bool = True,
                         window: int = 0, k_zero: torch.Tensor | None = None, v_zero: torch.Tensor | None = None,
                         q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.bfloat16, splits: int | None = None,
                         block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                         num_stages: int | None = None, seqlens_q: torch.Tensor | None = None,
                         seqlens_k: torch.Tensor | None = None, pv_fp8: bool = False,
                         out: torch.Tensor | None = None, staged: bool | None = None,
                         max_regs: int | None = None) -> torch.Tensor:
    """See the module docstring for shapes. Returns (B, Hq, Lq, D).

    Ragged batches: seqlens_q, seqlens_k (B,) int32 on the device; sequence b's queries are rows
    0..seqlens_q[b]-1 of Lq and its keys the first seqlens_k[b] of Lk (right padding, values not
    checked here: <= Lq and <= Lk); its query i sits at position seqlens_k[b] - seqlens_q[b] + i.
    Padded query rows come back as zeros.

    Defaults: prefill blocks of 64 query rows x 128 keys, 4 warps, 3 stages (H100,
    benchmarks/results/attn-diag-h100.json); decode with long caches one-warp programs of 16 rows x 64 keys,
    3 stages, split along the keys to about DECODE_PROGRAMS programs (H200); short caches (one 128-key tile a
    split within SHORT_PROGRAMS programs) 16 rows x 128 keys, 4 warps, one tile a split; otherwise 16 rows x
    256 keys, 4 warps, 3 stages, split until the grid has about two waves (at most 32 splits).

    pv_fp8: P.V as an FP8 MMA (needs one scale a token; slower on the H100 with this cache layout, see
    the module docstring). out: where to write (B, Hq, Lq, D) in out_dtype, any strides with the last dim
    contiguous (e.g. a transposed view of a (B, Lq, Hq, D) buffer); returned.

    max_regs (unstaged kernel, GPU): a cap on registers a thread (Triton's maxnreg), for more programs an SM
    at the cost of spills; None: the compiler's choice.

    staged (prefill, one scale a token, one split): the cache is first turned into MMA-ready codes
    (stage_kv_triton: K as FP8 codes, V as fp16 codes or, with pv_fp8, FP8 codes along tokens), once,
    and the attention loop then runs on plain loads (_attn_fwd_staged). None: on the GPU when every
    KV head has at least four blocks of query rows (each key tile would otherwise be converted that
    many times)."""
    bsz, hq, lq, d = q8.shape
    _, hkv, lk, dh = k.shape
    if q8.dtype != torch.float8_e4m3fn or k.dtype != torch.uint8 or v.dtype != torch.uint8:
        raise TypeError("kv4_attention_triton: q must be float8_e4m3fn, k and v uint8 codes")
    if dh * 2 != d or v.shape != k.shape or hq % hkv:
        raise ValueError("kv4_attention_triton: shapes of q, k, v do not match (D/2 codes a token, Hq % Hkv == 0)")
    ng = k_scale.shape[-1]
    if k_scale.shape != (bsz, hkv, lk, ng) or v_scale.shape != k_scale.shape or d % ng:
        raise ValueError("kv4_attention_triton: k_scale/v_scale must be (B, Hkv, Lk, D/G)")
    g = d // ng
    if pv_fp8 and g != d:
        raise ValueError("kv4_attention_triton: pv_fp8 needs one scale a token (KV group = head_dim)")
    if q8.is_cuda and g < 32:
        raise ValueError(f"kv4_attention_triton: KV groups of {g} channels; FP8 tensor cores need >= 32")
    sym = k_zero is None
    if (k_zero is None) != (v_zero is None):
        raise ValueError("kv4_attention_triton: give both zero points or neither")
    for t in (k, v, k_scale, v_scale):
        if t.stride(-1) != 1:
            raise ValueError("kv4_attention_triton: cache tensors must be contiguous in their last dim")
    if k_scale.stride() != v_scale.stride() or k.stride() != v.stride():
        raise ValueError("kv4_attention_triton: K and V caches must share strides")
    rep = hq // hkv
    has_bias = q_bias is not None
    r, rt = 16, 0
    if has_bias:
        r0 = rt = q_bias.shape[-1]
        if q_bias.dim() != 4 or q_bias.shape[:3] != (bsz, hq, lq):
            raise ValueError(f"kv4_attention_triton: q_bias must be ({bsz}, {hq}, {lq}, R), got {tuple(q_bias.shape)}")
        if (k_bias is None or k_bias.dim() != 4 or k_bias.shape[-1] != r0 or k_bias.shape[0] != bsz
                or k_bias.shape[1] not in (1, hkv) or k_bias.shape[2] != lk):
            raise ValueError(f"kv4_attention_triton: k_bias must be ({bsz}, {hkv} or 1, {lk}, {r0}) matching q_bias's "
                             f"R, got {None if k_bias is None else tuple(k_bias.shape)}")
        r = max(16, triton.next_power_of_2(r0))
        if r != r0 and r0 > 8:
            q_bias = torch.nn.functional.pad(q_bias, (0, r - r0))
            k_bias = torch.nn.functional.pad(k_bias, (0, r - r0))
    rows = lq * rep
    if staged is None:
        staged = (q8.is_cuda and g == d and splits in (None, 1)
                  and triton.cdiv(rows, block_m or STAGED_BM) >= 4)
    if staged:
        if g != d or splits not in (None, 1):
            raise ValueError("kv4_attention_triton: staged needs one scale a token and one split")
        splits = 1
        bm = block_m or STAGED_BM
        bn = block_n or (64 if d > 128 else STAGED_BN)
        if bn > STAGE_ALIGN.value:
            raise ValueError(f"kv4_attention_triton: staged key tiles of at most {STAGE_ALIGN.value}")
        num_warps = num_warps or STAGED_WARPS
        num_stages = num_stages or STAGED_STAGES
    else:
        bm = block_m or (16 if rows <= 16 else 64)
        bn = block_n or (64 if d > 128 else 256 if bm <= 16 else 128)
        blocks = triton.cdiv(rows, bm) * bsz * hkv
        if (block_n is None and num_warps is None and splits is None and bm <= 16 and d <= 128
                and blocks * (lk // 256) >= DECODE_PROGRAMS // 2):
            # decode with keys enough for half of DECODE_PROGRAMS programs of 256 keys or more (fewer keys,
            # e.g. 8K x 1: 16 x 256-key programs of 4 warps stay faster, attn-decode-w1-diag-h200.json)
            bn, num_warps, splits = DECODE_BN, DECODE_WARPS, 1
            while blocks * splits < DECODE_PROGRAMS:
                splits *= 2
        elif (block_n is None and num_warps is None and splits is None and bm <= 16 and d <= 128
              and blocks * triton.cdiv(lk, SHORT_BN) <= SHORT_PROGRAMS):
            bn, num_warps, splits = SHORT_BN, 4, 1  # short cache: one tile a split (powers of two: few compiles)
            while splits * bn < lk and blocks * splits * 2 <= SHORT_PROGRAMS:
                splits *= 2
        num_warps = num_warps or 4
        num_stages = num_stages or 3
    if splits is None:
        blocks = triton.cdiv(rows, bm) * bsz * hkv
        splits = 1
        while blocks * splits < 264 and splits < 32 and lk >= 2 * splits * bn:
            splits *= 2
    has_lens = seqlens_q is not None or seqlens_k is not None
    if has_lens:
        if seqlens_q is None or seqlens_k is None or seqlens_q.shape != (bsz,) or seqlens_k.shape != (bsz,):
            raise ValueError("kv4_attention_triton: give both seqlens_q and seqlens_k, each (B,)")
        seqlens_q = seqlens_q.to(device=q8.device, dtype=torch.int32).contiguous()
        seqlens_k = seqlens_k.to(device=q8.device, dtype=torch.int32).contiguous()
    q_scale = q_scale.float().contiguous()
    dev = q8.device
    if out is not None:
        if out.shape != (bsz, hq, lq, d) or out.dtype != out_dtype or out.stride(-1) != 1 or out.device != dev:
            raise ValueError(f"kv4_attention_triton: out must be ({bsz}, {hq}, {lq}, {d}) {out_dtype} on the "
                             "device with a contiguous last dim")
    if splits > 1:
        part = torch.empty((bsz, hq, lq, splits, d), dtype=torch.float32, device=dev)
        lse = torch.empty((bsz, hq, lq, splits), dtype=torch.float32, device=dev)
        o, so = part, (part.stride(0), part.stride(1), part.stride(2), part.stride(3))
    else:
        if out is None:
            out = torch.empty((bsz, hq, lq, d), dtype=out_dtype, device=dev)
        lse = out
        o, so = out, (out.stride(0), out.stride(1), out.stride(2), 0)
    kb_h = 0 if not has_bias else (0 if k_bias.shape[1] == 1 else k_bias.stride(1))
    dummy = q_scale
    if staged:
        v_scaled = staged_v_scaled(v_scale, pv_fp8)
        tma = STAGED_TMA and q8.is_cuda and torch.cuda.get_device_capability(dev) >= (9, 0)
        ks_tma = STAGED_KS_TMA and tma and not has_bias and lk % 8 == 0  # (strides shared: checked above)
        staged_kv = stage_kv_triton(k, v, v_scale, k_zero, v_zero, pv_fp8, seqlens_k if has_lens else None,
                                    v_scaled=v_scaled, k_scale=k_scale if ks_tma else None)
        k8, vo, vmax, ks_copy = staged_kv
        k8_arg, vo_arg = k8, vo
        if tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            k8_arg = TensorDescriptor(k8, [bsz * hkv, lk, d], [lk * d, d, 1], [1, bn, d])
            if pv_fp8:  # (B, Hkv, D, Lk') storage: tokens along the rows
                st = vo.stride()
                vo_arg = TensorDescriptor(vo.transpose(2, 3), [bsz * hkv, d, lk], [st[1], st[3], 1], [1, d, bn])
            else:
                vo_arg = TensorDescriptor(vo, [bsz * hkv, lk, d], [lk * d, d, 1], [1, bn, d])
        ks_arg = k_scale
        if ks_tma:  # the copy of the key scales the staging pass wrote (rows of 16-byte multiples)
            ks_arg = TensorDescriptor(ks_copy, [bsz * hkv, lk], [lk, 1], [1, bn])
        bias_mma = BIAS_MMA and has_bias and rt <= 2
        if bias_mma:  # its (BN, 16) operand is one more tile a stage: with 3 stages (FP8 P.V's best) a program
            num_stages = min(num_stages, 2)  # no longer leaves room for a second one an SM (1.8x slower, H100)
        kb_arg, kb_strides = k_bias, ((k_bias.stride(0), kb_h, k_bias.stride(2)) if has_bias else (0, 0, 0))
        if bias_mma:  # the key side of the bias as a bf16 MMA operand, once
            bf16 = q8.is_cuda  # (the interpreter's bf16 dot is unusable: fp32 holds the same values there)
            kbm = torch.empty((k_bias.shape[0], k_bias.shape[1], lk, 16),
                              dtype=torch.bfloat16 if bf16 else torch.float32, device=dev)
            _split_bias_keys[(triton.cdiv(lk, 128), k_bias.shape[0], k_bias.shape[1])](
                k_bias, kbm, lk, k_bias.stride(0), k_bias.stride(1), k_bias.stride(2), RT=rt, BT=128, BF16=bf16)
            kb_arg = kbm
            kb_strides = (kbm.stride(0), 0 if kbm.shape[1] == 1 else kbm.stride(1), kbm.stride(2))
        _attn_fwd_staged[(triton.cdiv(rows, bm), bsz * hkv)](
            q8, q_scale, k8_arg, ks_arg, vo_arg, v_scale, vmax if pv_fp8 else dummy,
            q_bias if has_bias else dummy, kb_arg if has_bias else dummy, out,
            seqlens_q if has_lens else dummy, seqlens_k if has_lens else dummy,
            lq, lk, sm_scale, window,
            q8.stride(0), q8.stride(1), q8.stride(2), q_scale.stride(0), q_scale.stride(1),
            k_scale.stride(0), k_scale.stride(1), k_scale.stride(2), *vo.stride(),
            *(q_bias.stride()[:3] if has_bias else (0, 0, 0)), *kb_strides,
            out.stride(0), out.stride(1), out.stride(2),
            HQ=hq, HKV=hkv, D=d, R=r, HAS_BIAS=has_bias, CAUSAL=causal, RT=rt, BM=bm, BN=bn, HAS_LENS=has_lens,
            PV_FP8=pv_fp8, EXACT_ROUND=pv_fp8 and not q8.is_cuda, TMA=tma, BIAS_MMA=bias_mma, BIAS_BF16=bias_mma and q8.is_cuda,
            V_SCALED=v_scaled, KS_TMA=ks_tma, KS_PREFETCH=STAGED_KS_PREFETCH, num_warps=num_warps,
            num_stages=num_stages)
        return out
    grid = (triton.cdiv(rows, bm), bsz * hkv, splits)
    # TMA for the code tiles: one group a token, heads laid out evenly (a 3-d view over batch and heads)
    tma = (UNSTAGED_TMA and (UNSTAGED_TMA_SYM or not sym) and g == d and q8.is_cuda and torch.cuda.get_device_capability(dev) >= (9, 0)
           and k.stride(0) == hkv * k.stride(1) and (k.stride(1) % 16 == 0) and k.stride(2) % 16 == 0
           and k.data_ptr() % 16 == 0 and v.data_ptr() % 16 == 0)
    k_arg, v_arg = k, v
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        k_arg = TensorDescriptor(k, [bsz * hkv, lk, dh], [k.stride(1), k.stride(2), 1], [1, bn, dh])
        v_arg = TensorDescriptor(v, [bsz * hkv, lk, dh], [v.stride(1), v.stride(2), 1], [1, bn, dh])
    _attn_fwd[grid](
        q8, q_scale, k_arg, k_scale, k_zero if not sym else dummy, v_arg, v_scale, v_zero if not sym else dummy,
        q_bias if has_bias else dummy, k_bias if has_bias else dummy, o, lse,
        seqlens_q if has_lens else dummy, seqlens_k if has_lens else dummy,
        lq, lk, sm_scale, window,
        q8.stride(0), q8.stride(1), q8.stride(2), q_scale.stride(0), q_scale.stride(1),
        k.stride(0), k.stride(1), k.stride(2), k_scale.stride(0), k_scale.stride(1), k_scale.stride(2),
        *(q_bias.stride()[:3] if has_bias else (0, 0, 0)), *((k_bias.stride(0), kb_h, k_bias.stride(2))
                                                              if has_bias else (0, 0, 0)),
        *so,
        HQ=hq, HKV=hkv, D=d, G=g, R=r, SYM=sym, HAS_BIAS=has_bias, CAUSAL=causal, SPLITS=splits, RT=rt, BM=bm, BN=bn,
        HAS_LENS=has_lens, ASM=use_asm(), PV_FP8=pv_fp8, EXACT_ROUND=pv_fp8 and not q8.is_cuda, TMA=tma,
        QK_F16=DECODE_QK_F16 and bm <= 16, PREFETCH=UNSTAGED_PREFETCH, num_warps=num_warps, num_stages=num_stages,
        **({} if max_regs is None else dict(maxnreg=max_regs)),
    )
    if splits == 1:
        return out
    if out is None:
        out = torch.empty((bsz, hq, lq, d), dtype=out_dtype, device=dev)
    _combine[(bsz * hq * lq,)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
                               out.stride(0), out.stride(1), out.stride(2), lq, HQ=hq, D=d, SPLITS=splits,
                               SP2=triton.next_power_of_2(splits))
    return out
