"""INT4 x FP8 GEMM (W4A8) and the fused per-token FP8 activation quantization, in Triton.

out (M, N) = (xq (M, K) fp8 * x_scale (M, 1)) @ (q (N, K) int4 * s (N, K/G) / 2^e)^T + bias

Weights come in the checkpoint layout (qweight (N, ceil(K/2)) uint8, two's-complement nibbles, even k in
the low nibble) or, on the GPU, in the kernel layout of `repack_half` (byte j of each BK-channel block
holds channels j and j + BK/2), which QuantLinear produces at its first GPU forward. In the kernel layout
a (BN, BK/2) byte tile becomes two FP8 tiles (the low and the high nibbles: the two halves of the K
block) by the inline-PTX conversion of int4cvt.py, and feeds two FP8 MMAs with no register interleave;
the checkpoint layout is unpacked with Triton casts (shift, interleave with tl.join, int8 -> fp16 ->
fp8). The FP8 x FP8 product of each K tile accumulates in FP32 and is scaled by its group scale (one K
tile never spans two groups: BK divides G, or G = K for per-channel); the per-token scale, 2^-e and the
bias come last.

Schedules:
- GEMV (one token): CUDA-core dot products over (BN, BK/2) byte tiles, split-K reduced in the kernel.
- SWAP (every M on the H100): out^T = W X^T, so the freshly converted weight tile is the MMA's first,
  register-side operand (never written back to shared memory) and tokens fill the MMA's N side (down to
  16). With SPLIT_K > 1 the K range is split over programs whose FP32 partials the last program of each
  tile sums in split order (deterministic, one launch).
- plain: (BM, BN) output tiles, the weights as the shared-memory operand (slower on the H100; kept for
  the checkpoint layout and as a tuning candidate).
- UNROLL (config, default 1): the K loop unrolled, UNROLL tiles (and their asynchronous copies) an
  iteration; used only where a split's tile count is a multiple of it.
- persistent (config PERSIST = programs an SM, SPLIT_K 1): a grid of PERSIST x SMs programs that walk the
  output tiles in the grouped order; a tuning candidate at large M.

Config lists come from functions below; winners per (bucketed M, N, K) for a GPU can be saved as JSON
(kernels/tuned/<gpu>.json) and are loaded explicitly by `load_tuned`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from .device import on_tensor_device
from .int4cvt import nibbles_f16, nibbles_fp8, use_asm

TUNED_DIR = Path(__file__).resolve().parent / "tuned"
# tiled kernel over the kernel layout: x and weight tiles by tensor-memory descriptors on sm_90+
# (benchmarks/results/gemm-tma-diag-h100.json)
GEMM_TMA = False  # measured 7-8% slower at prefill with the pointer-tuned configs
# Hopper's FP8 tensor cores accumulate a chain of MMAs in reduced precision (about 14 bits kept),
# before our FP32 accumulation of each K tile: the kernel's relative error against float64 is of this
# order on the GPU, whatever the twin's FP32 error. (cuBLAS FP8 without split accumulation shares it.)
FP8_MMA_ACC_RTOL = 2.0**-13
# tiled kernel over the kernel layout: the group scales of each K tile loaded one iteration ahead. Off: no gain
# on the H200 (decode 1.00x / 0.99x, prefill 0.96x: gemm-prefetch-diag-h200.json, gemm-scales-diag-h200.json)
GEMM_SCALE_PREFETCH = False
# attribute of an activation tensor carrying its FP8 per-token quantization (q (R, K), s (R, 1), the tensor's
# _version then), made by the kernel that produced it (the RMSNorm's): w4a8_linear_triton takes it instead of
# quantizing again, unless the tensor was written in place since
FP8_ATTR = "_fireq_fp8"


# ----------------------------------------------------------------------------- configs
def m_bucket(m: int) -> int:
    """Bucketed M for config lookup: 1, 2, 4, ..., 8192."""
    b = 1
    while b < m and b < 8192:
        b *= 2
    return b


def gemm_configs(m: int, n: int, k: int, group: int, kernel_layout: bool = False) -> list[dict]:
    """Candidate configs for a problem, pruned by its size (and the group, which caps BK). kernel_layout:
    for weights in the repack_half layout (no DEQ16 / UNPACK_DUP variants there)."""
    base = _gemm_configs(m, n, k, group)
    gemv = [dict(GEMV=True, BN=bn, BK=bk, SPLIT_K=sk, num_warps=4, num_stages=4)
            for bn in (8, 16, 32) for bk in (256, 512) for sk in (1, 2, 4, 8)] if m == 1 else []
    # wide K tiles, no pipelining: each program's row block is a few long loads in flight at once (the
    # H100 winners at M = 1 for K = 4096, benchmarks/results/gemm-decode-gemv-diag-h100.json)
    gemv += [dict(GEMV=True, BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=1)
             for bn in (4, 8, 16) for bk in (1024, 2048) for sk in (1, 2) for w in (4, 8)] if m == 1 else []
    return gemv + base + ([] if kernel_layout else [dict(c, DEQ16=True) for c in base])


def _gemm_configs(m: int, n: int, k: int, group: int) -> list[dict]:
    bk_max = 128 if group in (-1, 0) or group >= 128 else group
    out = []
    if m <= 64:
        bm = max(16, triton.next_power_of_2(m))
        for bn in (64, 128):
            for split in (1, 2, 4, 8):
                if k // bk_max >= split:
                    for st in (3, 4):
                        out.append(dict(SWAP=True, BM=bm, BN=bn, BK=bk_max, SPLIT_K=split, GROUP_M=8, num_warps=4,
                                        num_stages=st))
                    if (k // bk_max) % (2 * split) == 0:  # two K tiles an iteration (the H200's winners at
                        # N = 28672 and K = 14336: benchmarks/results/gemm-unroll-diag-h200.json)
                        out.append(dict(SWAP=True, BM=bm, BN=bn, BK=bk_max, SPLIT_K=split, GROUP_M=8, num_warps=4,
                                        num_stages=3, UNROLL=2))
    else:
        for swap, bm, bn, warps in ((True, 128, 64, 4), (True, 128, 128, 8), (False, 128, 128, 8),
                                    (True, 256, 128, 8), (True, 64, 128, 4), (True, 256, 64, 8)):
            for st in (3, 4):
                out.append(dict(SWAP=swap, BM=bm, BN=bn, BK=bk_max, SPLIT_K=1, GROUP_M=8, num_warps=warps,
                                num_stages=st))
        for bm, bn, warps, per_sm in ((128, 128, 8, 1), (128, 64, 4, 2), (128, 128, 8, 2)):  # persistent
            out.append(dict(SWAP=True, BM=bm, BN=bn, BK=bk_max, SPLIT_K=1, GROUP_M=8, num_warps=warps, num_stages=4,
                            PERSIST=per_sm))
    return out


def default_config(m: int, n: int, k: int, group: int) -> dict:
    """A reasonable config without tuning."""
    bk = 128 if group in (-1, 0) or group >= 128 else group
    if m == 1:  # one token: the CUDA-core GEMV over wide K tiles (H100 winners: BN 4-8, BK 2048, no split)
        wide = max(bk, min(2048, triton.next_power_of_2(k)))
        if per_tile_group_ok(wide, group):
            bk = wide
        tiles, split, k_tiles = triton.cdiv(n, 8), 1, triton.cdiv(k, bk)
        while tiles * split < 512 and split < 8 and k_tiles >= 2 * split:
            split *= 2
        return dict(GEMV=True, BN=8, BK=bk, SPLIT_K=split, num_warps=4, num_stages=1)
    if m <= 64:
        bm = max(16, min(64, triton.next_power_of_2(m)))
        tiles = triton.cdiv(n, 128)
        split = 1
        while tiles * split < 132 and split < 16 and k // bk >= 2 * split:
            split *= 2
        return dict(SWAP=True, BM=bm, BN=128, BK=bk, SPLIT_K=split, GROUP_M=8, num_warps=4, num_stages=4)
    # large M: the SWAP schedule too (the converted weights stay the register-side operand; the H100
    # winner at every M >= 1024 of benchmarks/results/gemm-h100.json)
    return dict(SWAP=True, BM=128, BN=128, BK=bk, SPLIT_K=1, GROUP_M=8, num_warps=8, num_stages=4)


def per_tile_group_ok(bk: int, group: int) -> bool:
    """Whether a K tile of bk channels holds whole groups or lies in one (what the kernels assume)."""
    return group in (-1, 0) or (bk % group == 0 if bk >= group else group % bk == 0)


_TUNED: dict[str, dict] = {}


def load_tuned(path: str | Path | None = None) -> int:
    """Load tuned winners {"M,N,K,G": config} from JSON (default: kernels/tuned/<device name>.json)."""
    if path is None:
        name = torch.cuda.get_device_name().replace(" ", "_")
        path = TUNED_DIR / f"{name}.json"
    path = Path(path)
    if not path.is_file():
        return 0
    _TUNED.update(json.loads(path.read_text()))
    return len(_TUNED)


def remember_config(m: int, n: int, k: int, group: int, config: dict) -> None:
    """Use `config` for this (bucketed M, N, K, group) from now on (what load_tuned does from a file)."""
    _TUNED[f"{m_bucket(m)},{n},{k},{group}"] = config


def pick_config(m: int, n: int, k: int, group: int) -> dict:
    return _TUNED.get(f"{m_bucket(m)},{n},{k},{group}") or default_config(m, n, k, group)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _round_to_fp8_grid(y):
    """y (fp32, |y| <= 448) rounded to the nearest E4M3 value (ties to even), still fp32.
    Used under the CPU interpreter, whose fp32 -> fp8 cast mis-rounds across binades; an exactly
    representable value then casts exactly."""
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    v = y / step
    r = tl.floor(v)
    d = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where((d > 0.5) | ((d == 0.5) & odd), r + 1.0, r)
    return r * step


@triton.jit
def _quant_fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr,
                           EXACT_ROUND: tl.constexpr, ONE_PASS: tl.constexpr):
    """One program per row: s = max|x| / 448; q = fp8(x / s). x: (M, K) bf16/fp16/fp32.
    EXACT_ROUND: round in fp32 arithmetic first (Triton's CPU interpreter mis-rounds fp32 -> fp8)."""
    row = tl.program_id(0).to(tl.int64)
    if ONE_PASS:  # the whole row in registers: one read
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        s = fp8_row_scale(tl.max(tl.abs(x), axis=0))
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + row * stride_q + offs, fp8_row_codes(x, s, EXACT_ROUND), mask=offs < K)
        return
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = fp8_row_scale(tl.max(amax, axis=0))
    tl.store(s_ptr + row, s)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + offs, fp8_row_codes(x, s, EXACT_ROUND), mask=offs < K)


@triton.jit
def fp8_row_scale(amax):
    """The per-token FP8 scale of a row whose largest |value| is amax: max(amax / 448, FLT_MIN)."""
    return tl.maximum(amax / 448.0, 1.1754943508222875e-38)


@triton.jit
def fp8_row_codes(y, s, EXACT_ROUND: tl.constexpr):
    """y (fp32) as FP8 E4M3 codes of scale s: fp8(clamp(y / s, +-448)), IEEE division (EXACT_ROUND: rounded in
    fp32 first, for the CPU interpreter). With fp8_row_scale, the one arithmetic of every kernel that quantizes
    activations per token (here, the RMSNorm's and the rotary embedding's FP8 outputs). A NaN stays NaN, as in
    the PyTorch twin (a plain GPU min/max would return the bound: -448, silently)."""
    v = tl.maximum(tl.math.div_rn(y, s), -448.0, propagate_nan=tl.PropagateNan.ALL)
    v = tl.minimum(v, 448.0, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_ROUND:  # the interpreter's cast also turns NaN into 384 (0x7C): E4M3's NaN (0x7F) set by hand
        bits = _round_to_fp8_grid(v).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        return tl.where(v != v, 0x7F, bits).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return v.to(tl.float8e4nv)


def taken_fp8(x: torch.Tensor, rows: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The FP8 per-token quantization (q, s) of x as `rows` (R, K) that the kernel which made x hung on it
    (FP8_ATTR), if x was not written since; else None."""
    pre = getattr(x, FP8_ATTR, None)
    if pre is not None and pre[0].shape == tuple(rows) and pre[2] == x._version:
        return pre[0], pre[1]
    return None


@triton.jit
def _w4a8_gemm_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, r_ptr,
    M, N, K, inv_mult, inv_mult2,
    stride_xm, stride_wn, stride_wsn, stride_om, stride_rm,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP: tl.constexpr, UNPACK_DUP: tl.constexpr, PRECISE_ACC: tl.constexpr, DEQ16: tl.constexpr,
    FUSED_SPLITK: tl.constexpr, HALF: tl.constexpr, ASM: tl.constexpr, EPI: tl.constexpr, HAS_RES: tl.constexpr,
    PERSIST: tl.constexpr, TMA: tl.constexpr, SCALE_PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
):
    """x: (M, K) fp8; xs: (M,) fp32; w: (N, ceil(K/2)) uint8; ws: (N, G) fp8/bf16; b: (N,);
    out: (M, N) out dtype, or (SPLIT_K, M, N) fp32 partials when SPLIT_K > 1 (summed in a fixed
    order afterwards, so results are deterministic). EPI > 0 (gated activation): rows 2i and 2i + 1 of w
    are gate and up channel i, scaled by inv_mult and inv_mult2, and out is (M, N/2) = act(gate) * up.
    HAS_RES: out += r (M, out columns)."""
    if PERSIST > 0:  # persistent: PERSIST programs walk the output tiles (SPLIT_K == 1)
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile in range(tl.program_id(0), num_tiles, PERSIST):
            _gemm_tile(tile, 0, x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, r_ptr, M, N, K,
                inv_mult, inv_mult2, stride_xm, stride_wn, stride_wsn, stride_om, stride_rm, GROUP, PER_CHANNEL,
                HAS_BIAS, BM, BN, BK, SPLIT_K, GROUP_M, SWAP, UNPACK_DUP, PRECISE_ACC, DEQ16, FUSED_SPLITK, HALF, ASM,
                EPI, HAS_RES, TMA, SCALE_PREFETCH, UNROLL)
    else:
        _gemm_tile(tl.program_id(0), tl.program_id(1), x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr,
            cnt_ptr, r_ptr, M, N, K, inv_mult, inv_mult2, stride_xm, stride_wn, stride_wsn, stride_om, stride_rm,
            GROUP, PER_CHANNEL, HAS_BIAS, BM, BN, BK, SPLIT_K, GROUP_M, SWAP, UNPACK_DUP, PRECISE_ACC, DEQ16,
            FUSED_SPLITK, HALF, ASM, EPI, HAS_RES, TMA, SCALE_PREFETCH, UNROLL)


@triton.jit
def _gemm_tile(
    pid, pid_k, x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, r_ptr,
    M, N, K, inv_mult, inv_mult2,
    stride_xm, stride_wn, stride_wsn, stride_om, stride_rm,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP: tl.constexpr, UNPACK_DUP: tl.constexpr, PRECISE_ACC: tl.constexpr, DEQ16: tl.constexpr,
    FUSED_SPLITK: tl.constexpr, HALF: tl.constexpr, ASM: tl.constexpr, EPI: tl.constexpr, HAS_RES: tl.constexpr,
    TMA: tl.constexpr, SCALE_PREFETCH: tl.constexpr, UNROLL: tl.constexpr,
):
    """One output tile (pid) and K split (pid_k) of _w4a8_gemm_kernel. TMA (kernel layout only): x_ptr and
    w_ptr are tensor descriptors with blocks (BM, BK/2) and (BN, BK/2); zeros past M, N and K.
    SCALE_PREFETCH (kernel layout, group scales): each K tile's group scales are loaded one iteration ahead
    (a byte a row gathered across rows: too narrow for the pipeliner's asynchronous copies, so the load
    would otherwise wait on memory inside each iteration)."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    gid = pid // width
    first_m = gid * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    offs_kh = tl.arange(0, BK // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    KH = (K + 1) // 2

    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)

    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    if not TMA:
        x_base = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
        w_base = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    PREFETCH: tl.constexpr = SCALE_PREFETCH and HALF and not PER_CHANNEL
    if PREFETCH:  # (the tile index as a vector: the interpreter takes no scalar in a load's mask)
        tv = t0 + 0 * offs_n
        sg_n = tl.load(ws_ptr + offs_n * stride_wsn + (tv * BK) // GROUP, mask=mask_n & (tv < t1), other=0.0)
    for t in tl.range(t0, t1, loop_unroll_factor=UNROLL):
        k0 = t * BK
        if PREFETCH:
            sg_t = sg_n
            tv = t + 1 + 0 * offs_n
            sg_n = tl.load(ws_ptr + offs_n * stride_wsn + (tv * BK) // GROUP, mask=mask_n & (tv < t1), other=0.0)
        if HALF:
            # kernel layout (repack_half): byte j of this K tile holds k0 + j (low nibble) and
            # k0 + BK/2 + j (high nibble); rows padded with zero codes to whole tiles. Two MMAs over the
            # halves of the tile, no register interleave.
            if TMA:
                xa = x_ptr.load([pid_m * BM, k0])
                xb = x_ptr.load([pid_m * BM, k0 + BK // 2])
                wb = w_ptr.load([pid_n * BN, k0 // 2])
            else:
                ka = k0 + offs_kh
                xa = tl.load(x_base + ka[None, :], mask=mask_m[:, None] & (ka[None, :] < K), other=0.0)
                xb = tl.load(x_base + (ka + BK // 2)[None, :], mask=mask_m[:, None] & (ka[None, :] + BK // 2 < K),
                             other=0.0)
                wb = tl.load(w_base + (k0 // 2 + offs_kh)[None, :], mask=mask_n[:, None], other=0)
            wa, wz = nibbles_fp8(wb, wb, True, False, ASM)
            if SWAP:
                part = tl.dot(wa, tl.trans(xa))
                part = tl.dot(wz, tl.trans(xb), part)
            else:
                part = tl.dot(xa, tl.trans(wa))
                part = tl.dot(xb, tl.trans(wz), part)
            if PER_CHANNEL:
                acc += part
            else:
                if PREFETCH:
                    sg = sg_t.to(tl.float32)
                else:
                    sg = tl.load(ws_ptr + offs_n * stride_wsn + k0 // GROUP, mask=mask_n, other=0.0).to(tl.float32)
                if SWAP:
                    acc += part * sg[:, None]
                else:
                    acc += part * sg[None, :]
        else:
            kk = k0 + offs_k
            x = tl.load(x_base + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
            if UNPACK_DUP:
                # each byte loaded for both of its k (the duplicate hits L1); the nibble is picked by a
                # per-column shift: no register shuffles
                wb = tl.load(w_base + (kk // 2)[None, :], mask=mask_n[:, None] & (kk[None, :] < K), other=0)
                wi = wb.to(tl.int8, bitcast=True)
                w = (wi << ((1 - (kk % 2)) * 4).to(tl.int8)[None, :]) >> 4
            else:
                kh = k0 // 2 + offs_kh
                wb = tl.load(w_base + kh[None, :], mask=mask_n[:, None] & (kh[None, :] < KH), other=0)
                wi = wb.to(tl.int8, bitcast=True)
                lo = (wi << 4) >> 4
                hi = wi >> 4
                w = tl.join(lo, hi).reshape(BN, BK)
            if DEQ16:
                # q * s is exact in fp16 (<= 7 significant bits for FP8 scales), as is the fp8 x: the group
                # scale rides on the operand and the MMA chain accumulates straight into acc (fp16 MMA)
                w16 = w.to(tl.float16)
                if not PER_CHANNEL:
                    s16 = tl.load(ws_ptr + offs_n * stride_wsn + k0 // GROUP, mask=mask_n, other=0.0).to(tl.float16)
                    w16 = w16 * s16[:, None]
                if SWAP:
                    acc = tl.dot(w16, tl.trans(x.to(tl.float16)), acc)
                else:
                    acc = tl.dot(x.to(tl.float16), tl.trans(w16), acc)
            elif PER_CHANNEL:
                w8 = w.to(tl.float16).to(tl.float8e4nv)
                if SWAP:
                    acc = tl.dot(w8, tl.trans(x), acc, max_num_imprecise_acc=PRECISE_ACC)
                else:
                    acc = tl.dot(x, tl.trans(w8), acc, max_num_imprecise_acc=PRECISE_ACC)
            else:
                w8 = w.to(tl.float16).to(tl.float8e4nv)
                if SWAP:
                    part = tl.dot(w8, tl.trans(x), max_num_imprecise_acc=PRECISE_ACC)
                else:
                    part = tl.dot(x, tl.trans(w8), max_num_imprecise_acc=PRECISE_ACC)
                s = tl.load(ws_ptr + offs_n * stride_wsn + k0 // GROUP, mask=mask_n, other=0.0).to(tl.float32)
                if SWAP:
                    acc += part * s[:, None]
                else:
                    acc += part * s[None, :]

    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)
    if EPI == 0:
        xs = xs * inv_mult
    if PER_CHANNEL:
        sn = tl.load(ws_ptr + offs_n * stride_wsn, mask=mask_n, other=0.0).to(tl.float32)
    if SWAP:
        acc = acc * xs[None, :]
        if PER_CHANNEL:
            acc = acc * sn[:, None]
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias[:, None], 0.0)
        ptrs = out_ptr + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None]
        msk = mask_m[None, :] & mask_n[:, None]
    else:
        acc = acc * xs[:, None]
        if PER_CHANNEL:
            acc = acc * sn[None, :]
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.where(pid_k == 0, bias[None, :], 0.0)
        ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        msk = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1 and FUSED_SPLITK:
        # partials to part_ptr (SPLIT_K, M, N); the last program of this tile to arrive sums them in split
        # order (deterministic) into out and re-zeroes the tile's counter
        if SWAP:
            p_off = offs_m[None, :].to(tl.int64) * N + offs_n[:, None]
        else:
            p_off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + p_off, acc, mask=msk)
        tl.debug_barrier()  # every thread's partial stores come before the count
        arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(part_ptr + p_off, mask=msk, other=0.0, volatile=True)
            for sk in range(1, SPLIT_K):
                total += tl.load(part_ptr + sk * M * N + p_off, mask=msk, other=0.0, volatile=True)
            tl.atomic_xchg(cnt_ptr + pid, 0)
            _tile_store(total, out_ptr, r_ptr, offs_m, pid_n, mask_m, N, stride_om, stride_rm, inv_mult, inv_mult2,
                        BM, BN, SWAP, EPI, HAS_RES)
    elif SPLIT_K > 1:
        tl.store(ptrs + pid_k.to(tl.int64) * M * stride_om, acc, mask=msk)
    else:
        _tile_store(acc, out_ptr, r_ptr, offs_m, pid_n, mask_m, N, stride_om, stride_rm, inv_mult, inv_mult2,
                    BM, BN, SWAP, EPI, HAS_RES)


@triton.jit
def _gated(g, u, inv_mult, inv_mult2, EPI: tl.constexpr):
    """act(g * inv_mult) * (u * inv_mult2) in fp32. EPI 1: SiLU, g * sigmoid(g); EPI 2: GELU with the tanh
    approximation, 0.5 g (1 + tanh(z)) = g * sigmoid(2 z), z = sqrt(2/pi) (g + 0.044715 g^3)."""
    g = g * inv_mult
    u = u * inv_mult2
    if EPI == 1:
        a = g * tl.sigmoid(g)
    else:
        a = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    return a * u


@triton.jit
def _tile_store(acc, out_ptr, r_ptr, offs_m, pid_n, mask_m, N, stride_om, stride_rm, inv_mult, inv_mult2,
                BM: tl.constexpr, BN: tl.constexpr, SWAP: tl.constexpr, EPI: tl.constexpr, HAS_RES: tl.constexpr):
    """The scaled FP32 tile (BN, BM) (SWAP) or (BM, BN) -> its gated activation (EPI > 0: interleaved gate/up
    rows, BN/2 outputs), plus the residual, stored in out's dtype."""
    if EPI > 0:
        if SWAP:
            g, u = tl.split(tl.permute(tl.reshape(acc, (BN // 2, 2, BM)), (0, 2, 1)))
        else:
            g, u = tl.split(tl.reshape(acc, (BM, BN // 2, 2)))
        y = _gated(g, u, inv_mult, inv_mult2, EPI)
        offs_o = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        n_out = N // 2
    else:
        y = acc
        offs_o = pid_n * BN + tl.arange(0, BN)
        n_out = N
    mask_o = offs_o < n_out
    if SWAP:
        row = offs_m[None, :].to(tl.int64)
        col = offs_o[:, None]
        msk = mask_m[None, :] & mask_o[:, None]
    else:
        row = offs_m[:, None].to(tl.int64)
        col = offs_o[None, :]
        msk = mask_m[:, None] & mask_o[None, :]
    if HAS_RES:
        y += tl.load(r_ptr + row * stride_rm + col, mask=msk, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + col, y.to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _gemv_epilogue(acc, xs_ptr, b_ptr, out_ptr, r_ptr, ws_ptr, pid_n, offs_n, mask_n, N, inv_mult, inv_mult2,
                   stride_wsn, BN: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   EPI: tl.constexpr, HAS_RES: tl.constexpr):
    """acc (BN,) fp32 sums over all of K -> scaled, biased (gated, plus the residual), stored as out (1, N)
    (or (1, N/2) gated)."""
    acc = acc * tl.load(xs_ptr)
    if EPI == 0:
        acc = acc * inv_mult
    if PER_CHANNEL:
        acc = acc * tl.load(ws_ptr + offs_n * stride_wsn, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if EPI > 0:
        g, u = tl.split(tl.reshape(acc, (BN // 2, 2)))
        acc = _gated(g, u, inv_mult, inv_mult2, EPI)
        offs_o = pid_n * (BN // 2) + tl.arange(0, BN // 2)
        mask_o = offs_o < N // 2
    else:
        offs_o = offs_n
        mask_o = mask_n
    if HAS_RES:
        acc += tl.load(r_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_o, acc.to(out_ptr.dtype.element_ty), mask=mask_o)


@triton.jit
def _w4a8_gemv_kernel(
    x_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr, r_ptr,
    N, K, inv_mult, inv_mult2, stride_wn, stride_wsn,
    GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, HALF_LB: tl.constexpr, ASM: tl.constexpr,
    EPI: tl.constexpr, HAS_RES: tl.constexpr,
):
    """One token (M = 1): CUDA-core dot products, no MMA padding to 16 rows.

    Each step streams a (BN, BK/2) byte tile of weights: the low nibbles meet the even k of x and the
    high nibbles the odd k (no register shuffles to restore k order). BK may span several groups
    (BK = NG * GROUP: per-group sums, then the (BN, NG) scales) or divide one. With SPLIT_K > 1 the
    programs of an N tile write FP32 partials and count themselves in on a per-tile counter; the last
    to arrive sums the partials in split order (deterministic), writes the output, re-zeroes the counter.
    (Accumulating (BN, BK/2) elementwise and reducing once at the end measured slower on the H100.)"""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_h = tl.arange(0, BK // 2)
    mask_n = offs_n < N
    if HALF_LB > 0:  # kernel layout (repack_half): rows padded to whole blocks of HALF_LB
        KH = tl.cdiv(K, HALF_LB) * (HALF_LB // 2)
    else:
        KH = (K + 1) // 2
    NGROUPS = tl.cdiv(K, GROUP)
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros((BN,), dtype=tl.float32)
    w_base = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    for t in range(t0, t1):
        kh = t * (BK // 2) + offs_h
        wb = tl.load(w_base + kh[None, :], mask=mask_n[:, None] & (kh[None, :] < KH), other=0)
        w_lo, w_hi = nibbles_f16(wb, wb, True, False, ASM)
        if HALF_LB > 0:  # byte j of a block: channels j and j + HALF_LB/2 of the block
            ke = (kh // (HALF_LB // 2)) * HALF_LB + kh % (HALF_LB // 2)
            ko = ke + HALF_LB // 2
        else:  # checkpoint layout: channels 2j and 2j + 1
            ke = 2 * kh
            ko = ke + 1
        xe = tl.load(x_ptr + ke, mask=ke < K, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + ko, mask=ko < K, other=0.0).to(tl.float32)
        prod = w_lo.to(tl.float32) * xe[None, :] + w_hi.to(tl.float32) * xo[None, :]
        if PER_CHANNEL:
            acc += tl.sum(prod, axis=1)
        elif BK > GROUP:
            NG: tl.constexpr = BK // GROUP
            part = tl.sum(tl.reshape(prod, (BN, NG, GROUP // 2)), axis=2)
            gi = t * NG + tl.arange(0, NG)
            sc = tl.load(ws_ptr + offs_n[:, None] * stride_wsn + gi[None, :],
                         mask=mask_n[:, None] & (gi[None, :] < NGROUPS), other=0.0).to(tl.float32)
            acc += tl.sum(part * sc, axis=1)
        else:
            sc = tl.load(ws_ptr + offs_n * stride_wsn + (t * BK) // GROUP, mask=mask_n, other=0.0).to(tl.float32)
            acc += tl.sum(prod, axis=1) * sc
    if SPLIT_K == 1:
        _gemv_epilogue(acc, xs_ptr, b_ptr, out_ptr, r_ptr, ws_ptr, pid_n, offs_n, mask_n, N, inv_mult, inv_mult2,
                       stride_wsn, BN, PER_CHANNEL, HAS_BIAS, EPI, HAS_RES)
    else:
        tl.store(part_ptr + pid_k.to(tl.int64) * N + offs_n, acc, mask=mask_n)
        tl.debug_barrier()  # every thread's partial stores come before the count
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.load(part_ptr + offs_n, mask=mask_n, other=0.0, volatile=True)
            for sk in range(1, SPLIT_K):
                total += tl.load(part_ptr + sk * N + offs_n, mask=mask_n, other=0.0, volatile=True)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
            _gemv_epilogue(total, xs_ptr, b_ptr, out_ptr, r_ptr, ws_ptr, pid_n, offs_n, mask_n, N, inv_mult,
                           inv_mult2, stride_wsn, BN, PER_CHANNEL, HAS_BIAS, EPI, HAS_RES)


_COUNTERS: dict = {}
_SMS: dict = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once; 4 elsewhere, for the interpreter)."""
    if device.type != "cuda":
        return 4
    if device not in _SMS:
        _SMS[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SMS[device]


def _tile_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters for split-K tiles, one buffer per device, left zeroed by every kernel."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


# ----------------------------------------------------------------------------- launchers
def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@on_tensor_device
def quantize_fp8_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (M, K) float -> (q (M, K) fp8 e4m3, s (M, 1) fp32). Same semantics as the reference."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError("quantize_fp8_rows_triton expects a 2-D tensor with contiguous rows")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        one = triton.next_power_of_2(k) <= 16384
        block = triton.next_power_of_2(k) if one else 4096
        _quant_fp8_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block,
                                     EXACT_ROUND=_interpreting(), ONE_PASS=one,
                                     num_warps=max(1, min(16, block // 512)))
    return q, s


def weight_geometry(qweight: torch.Tensor, w_scales: torch.Tensor, k: int, group_size: int,
                    layout_block: int = 0) -> tuple[bool, int]:
    """Check packed weights (N, row bytes: ceil(K/2), or whole blocks of layout_block channels in the
    repack_half layout) and their group scales (N, G) against K -> (per_channel, the effective group size:
    K when per channel)."""
    n = qweight.shape[0]
    row_bytes = (k + 1) // 2 if not layout_block else triton.cdiv(k, layout_block) * layout_block // 2
    if qweight.shape[1] != row_bytes:
        raise ValueError(f"qweight has {qweight.shape[1]} bytes a row, expected {row_bytes} for K={k}")
    per_channel = group_size in (-1, 0) or group_size >= k and w_scales.shape[1] == 1
    g = k if per_channel else group_size
    if w_scales.shape != (n, triton.cdiv(k, g)):
        raise ValueError(f"w_scales shape {tuple(w_scales.shape)} does not match N={n}, K={k}, group {g}")
    return per_channel, g


EPILOGUES = {None: 0, "silu_mul": 1, "gelu_tanh_mul": 2}


@on_tensor_device
def w4a8_gemm_triton(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                     log2_multiplier: int, group_size: int, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None,
                     layout_block: int = 0, epilogue: str | None = None, log2_multiplier2: int | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:
    """See reference.w4a8_gemm_ref. xq: (M, K) fp8; x_scale: (M, 1) fp32; qweight: (N, ceil(K/2)) uint8
    in the checkpoint layout, or with layout_block > 0 the kernel layout of repack_half(qweight, K,
    layout_block) (N, ceil(K / layout_block) * layout_block / 2); w_scales: (N, G) fp8/bf16; bias: (N,)
    or None -> (M, N) out_dtype.

    epilogue "silu_mul" / "gelu_tanh_mul": qweight's rows alternate gate and up channels
    (interleave_gate_up), the gate rows' multiplier is 2^log2_multiplier and the up rows'
    2^log2_multiplier2; the result is act(gate) * up, (M, N/2). residual: (M, N or N/2), added last."""
    if xq.dtype != torch.float8_e4m3fn or qweight.dtype != torch.uint8:
        raise TypeError("w4a8_gemm_triton: xq must be float8_e4m3fn and qweight uint8")
    m, k = xq.shape
    n = qweight.shape[0]
    if epilogue not in EPILOGUES:
        raise ValueError(f"w4a8_gemm_triton: unknown epilogue {epilogue!r} (one of {list(EPILOGUES)})")
    epi = EPILOGUES[epilogue]
    if epi and n % 2:
        raise ValueError("w4a8_gemm_triton: a gated epilogue needs interleaved gate/up rows (even N)")
    n_out = n // 2 if epi else n
    if residual is not None and (residual.shape != (m, n_out) or residual.stride(-1) != 1
                                 or residual.device != xq.device):
        raise ValueError(f"w4a8_gemm_triton: residual must be ({m}, {n_out}) with contiguous rows on the device")
    mult2 = 2.0 ** -(log2_multiplier if log2_multiplier2 is None else log2_multiplier2)
    per_channel, g = weight_geometry(qweight, w_scales, k, group_size, layout_block)
    if xq.stride(1) != 1 or qweight.stride(1) != 1:
        raise ValueError("w4a8_gemm_triton: xq and qweight rows must be contiguous")
    if not (xq.device == qweight.device == w_scales.device == x_scale.device):
        raise ValueError("w4a8_gemm_triton: all tensors must be on one device")
    cfg = dict(config or pick_config(m, n, k, -1 if per_channel else g))
    if not per_channel and g % cfg["BK"] and not cfg.get("GEMV"):
        raise ValueError(f"BK={cfg['BK']} must divide the group size {g}")
    split = cfg["SPLIT_K"]
    if cfg.get("GEMV"):
        return _launch_gemv(xq, x_scale, qweight, w_scales, log2_multiplier, g, per_channel, bias, out_dtype, cfg,
                            layout_block, epi, mult2, residual)
    half = layout_block > 0
    if half and (cfg["BK"] != layout_block or cfg.get("DEQ16") or cfg.get("UNPACK_DUP")):
        cfg = dict(cfg, BK=layout_block, DEQ16=False, UNPACK_DUP=False)
    fused = split > 1 and cfg.get("FUSED", True)
    if split > 1 and (epi or residual is not None):
        fused = True  # the gated epilogue and the residual need the whole sum: summed in the kernel
    if split > 1 and not fused:
        out = torch.empty((split, m, n), dtype=torch.float32, device=xq.device)
    else:
        out = torch.empty((m, n_out), dtype=out_dtype, device=xq.device)
    if m == 0:
        return torch.empty((0, n_out), dtype=out_dtype, device=xq.device)
    if triton.cdiv(k, cfg["BK"]) % (split * cfg.get("UNROLL", 1)):
        cfg = dict(cfg, UNROLL=1)  # unrolled loops only over whole multiples of UNROLL tiles a split
    tiles = triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"])
    persist = 0
    if cfg.get("PERSIST") and split == 1:  # persistent: PERSIST programs an SM walk the tiles
        persist = min(tiles, cfg["PERSIST"] * _sm_count(xq.device))
    grid = (persist or tiles, split)
    part = torch.empty((split, m, n), dtype=torch.float32, device=xq.device) if fused else out
    cnt = _tile_counters(xq.device, tiles) if fused else out
    xs = x_scale.reshape(-1).float().contiguous()
    x_arg, w_arg = xq, qweight
    tma = (GEMM_TMA and half and xq.is_cuda and torch.cuda.get_device_capability(xq.device) >= (9, 0)
           and xq.stride(0) % 16 == 0 and qweight.stride(0) % 16 == 0 and xq.data_ptr() % 16 == 0
           and qweight.data_ptr() % 16 == 0)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        bk2 = cfg["BK"] // 2
        x_arg = TensorDescriptor(xq, [m, k], [xq.stride(0), 1], [cfg["BM"], bk2])
        w_arg = TensorDescriptor(qweight, [n, qweight.shape[1]], [qweight.stride(0), 1], [cfg["BN"], bk2])
    _w4a8_gemm_kernel[grid](
        x_arg, xs, w_arg, w_scales, bias if bias is not None else xs, out, part, cnt,
        residual if residual is not None else xs,
        m, n, k, 2.0 ** -log2_multiplier, mult2,
        xq.stride(0), qweight.stride(0), w_scales.stride(0), out.stride(-2),
        residual.stride(0) if residual is not None else 0,
        GROUP=g, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], SPLIT_K=split, GROUP_M=cfg["GROUP_M"], SWAP=cfg["SWAP"],
        UNPACK_DUP=cfg.get("UNPACK_DUP", False), PRECISE_ACC=cfg.get("PRECISE_ACC", None),
        DEQ16=cfg.get("DEQ16", False) and w_scales.dtype == torch.float8_e4m3fn, FUSED_SPLITK=fused, HALF=half,
        ASM=use_asm(), EPI=epi, HAS_RES=residual is not None, PERSIST=persist, TMA=tma,
        SCALE_PREFETCH=GEMM_SCALE_PREFETCH, UNROLL=cfg.get("UNROLL", 1),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out.sum(0, dtype=torch.float32).to(out_dtype) if split > 1 and not fused else out


def repack_half(qweight: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Checkpoint layout (N, ceil(K/2)) -> the kernel layout: K padded with zero codes to whole blocks of
    `block` channels; byte j of a block holds channel j (low nibble) and channel j + block/2 (high).
    Unpacking it needs no register interleave: the two nibbles of a byte feed two MMAs over the two
    halves of the block. Exact: unpack_half(repack_half(q, K, b), K, b) == the codes of q."""
    from fireq.formats.int4 import unpack_int4

    n = qweight.shape[0]
    kp = triton.cdiv(k, block) * block
    codes = torch.zeros((n, kp), dtype=torch.int8, device=qweight.device)
    codes[:, :k] = unpack_int4(qweight, k)
    c = codes.reshape(n, kp // block, 2, block // 2).to(torch.int16)
    out = (c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)
    return out.reshape(n, kp // 2).to(torch.uint8).contiguous()


def unpack_half(packed: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """The kernel layout back to int8 codes (N, K)."""
    n = packed.shape[0]
    b = packed.to(torch.int16).reshape(n, -1, block // 2)
    lo = ((b & 0xF) ^ 8) - 8
    hi = (((b >> 4) & 0xF) ^ 8) - 8
    return torch.stack([lo, hi], dim=2).reshape(n, -1)[:, :k].to(torch.int8)


def _launch_gemv(xq, x_scale, qweight, w_scales, log2_multiplier, g, per_channel, bias, out_dtype, cfg,
                 layout_block=0, epi=0, mult2=1.0, residual=None):
    m, k = xq.shape
    n = qweight.shape[0]
    if m != 1:
        raise ValueError("the GEMV path takes one token (M = 1)")
    split, bn, bk = cfg["SPLIT_K"], cfg["BN"], cfg["BK"]
    if not per_channel and not per_tile_group_ok(bk, g):
        raise ValueError(f"GEMV: BK={bk} must divide the group size {g} or be a multiple of it")
    out = torch.empty((1, n // 2 if epi else n), dtype=out_dtype, device=xq.device)
    tiles = triton.cdiv(n, bn)
    part = torch.empty((split, n), dtype=torch.float32, device=xq.device) if split > 1 else out
    cnt = _tile_counters(xq.device, tiles)
    xs = x_scale.reshape(-1).float().contiguous()
    _w4a8_gemv_kernel[(tiles, split)](
        xq, xs, qweight, w_scales, bias if bias is not None else xs, out, part, cnt,
        residual if residual is not None else xs,
        n, k, 2.0 ** -log2_multiplier, mult2, qweight.stride(0), w_scales.stride(0),
        GROUP=g, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
        BN=bn, BK=bk, SPLIT_K=split, HALF_LB=layout_block, ASM=use_asm(), EPI=epi, HAS_RES=residual is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


@on_tensor_device
def w4a8_linear_triton(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int,
                       group_size: int, bias: torch.Tensor | None = None, layout_block: int = 0,
                       epilogue: str | None = None, log2_multiplier2: int | None = None,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) -> (..., N) in x.dtype (or (..., N/2) with a gated epilogue): fused FP8 activation
    quantization, then the GEMM (with its epilogue; residual (..., N or N/2) added last)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    pre = taken_fp8(x, x2.shape)  # quantized already, by the RMSNorm that made x (fireq.nn.norm)
    if pre is not None:
        xq, xs = pre
    else:
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        xq, xs = quantize_fp8_rows_triton(x2)
    r2 = None
    if residual is not None:
        r2 = residual.reshape(x2.shape[0], -1)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    out = w4a8_gemm_triton(xq, xs, qweight, w_scales, log2_multiplier, group_size, bias, out_dtype=x.dtype,
                           layout_block=layout_block, epilogue=epilogue, log2_multiplier2=log2_multiplier2,
                           residual=r2)
    return out.reshape(*x.shape[:-1], -1)


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Rows of gate (N, ...) and up (N, ...) alternated into one (2N, ...) tensor: row 2i is gate row i and
    row 2i + 1 up row i (the gated epilogue's layout; weights, scales and biases alike)."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError("interleave_gate_up: gate and up must have one shape and dtype")
    return torch.stack((gate, up), dim=1).reshape(2 * gate.shape[0], *gate.shape[1:])
