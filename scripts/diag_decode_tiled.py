"""Decode-regime W4A8 (M <= 16): does a tile-contiguous weight layout stream faster than the row-major kernel
layout? A stand-alone SWAP split-K kernel runs over (a) the repack_half layout (rows of K/2 bytes, a tile is
BN rows x 64 bytes) and (b) the same bytes re-ordered so that each (BN, 64 byte) tile is one contiguous
block and the tiles of an N block follow each other along K (group scales in the same tile order). cuBLAS
BF16/FP8, the shipped kernel (tuned configs) and an empty kernel (the launch floor) in the same run.

    python scripts/diag_decode_tiled.py --json OUT.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import (bench_graph, env_info, gemm_reference, geomean, int4_weight_copies, table,  # noqa: E402
                         write_json)
from fireq_kernels.int4cvt import nibbles_fp8  # noqa: E402
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@triton.jit
def _empty(x_ptr):
    pass


@triton.jit
def _dec_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, stride_wn,
                stride_wsn, inv_mult, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SPLIT_K: tl.constexpr, TILED: tl.constexpr, ASM: tl.constexpr, ABL: tl.constexpr = 0,
                TMA: tl.constexpr = False, PDL: tl.constexpr = False):
    """ABL (ablations, wrong results on purpose): 1 no group scale (chained accumulator), 2 no INT4
    conversion (the bytes bitcast to FP8), 3 neither, 4 loads only (no MMA)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_kh = tl.arange(0, BK // 2)
    mask_m = offs_m < M
    k_tiles = K // BK
    per = tl.cdiv(k_tiles, SPLIT_K)
    t0 = pid_k * per
    t1 = tl.minimum(t0 + per, k_tiles)
    NG = K // GROUP
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    junk = tl.zeros((BN, BK // 2), dtype=tl.int32)
    x_base = x_ptr + offs_m[:, None] * stride_xm
    if TILED:
        s_base = ws_ptr + pid_n.to(tl.int64) * NG * BN + tl.arange(0, BN)
    else:
        s_base = ws_ptr + offs_n * stride_wsn
    if TMA:
        w_base = w_ptr
    elif TILED:
        w_base = (w_ptr + pid_n.to(tl.int64) * k_tiles * (BN * BK // 2) + tl.arange(0, BN)[:, None] * (BK // 2)
                  + offs_kh[None, :])
        s_base = ws_ptr + pid_n.to(tl.int64) * NG * BN + tl.arange(0, BN)
    else:
        w_base = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_kh[None, :]
        s_base = ws_ptr + offs_n * stride_wsn
    if PDL:
        # programmatic dependent launch: let the next kernel launch, pull this program's weight bytes into L2
        # (they do not depend on the previous kernel), then wait for the previous kernel before anything else
        gdc_launch_dependents()
        rows = tl.minimum(offs_n, N - 1)
        nbytes = (t1 - t0) * (BK // 2) + tl.zeros((BN,), dtype=tl.int32)
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\nmov.u32 $0, 0;", "=r,l,r",
                                  [w_ptr + rows.to(tl.int64) * stride_wn + t0 * (BK // 2), nbytes], dtype=tl.int32,
                                  is_pure=False, pack=1)
        gdc_wait()
    for t in range(t0, t1):
        k0 = t * BK
        if TMA:  # w_ptr: a descriptor with (BN, BK/2) blocks over the tiled (rows, BK/2) or the (N, K/2) bytes
            if TILED:
                wb = w_ptr.load([(pid_n * k_tiles + t) * BN, 0])
            else:
                wb = w_ptr.load([pid_n * BN, k0 // 2])
        elif TILED:
            wb = tl.load(w_base + t * (BN * BK // 2))
        else:
            wb = tl.load(w_base + k0 // 2)
        if TILED:
            sg = tl.load(s_base + (k0 // GROUP) * BN)
        else:
            sg = tl.load(s_base + k0 // GROUP)
        xa = tl.load(x_base + k0 + offs_kh[None, :], mask=mask_m[:, None], other=0.0)
        xb = tl.load(x_base + k0 + BK // 2 + offs_kh[None, :], mask=mask_m[:, None], other=0.0)
        if ABL == 4:
            junk ^= wb.to(tl.int32)
        else:
            if ABL >= 2:
                wa = wb.to(tl.float8e4nv, bitcast=True)
                wz = wa
            else:
                wa, wz = nibbles_fp8(wb, wb, True, False, ASM)
            if ABL == 1 or ABL == 3:
                acc = tl.dot(wa, tl.trans(xa), acc)
                acc = tl.dot(wz, tl.trans(xb), acc)
            else:
                part = tl.dot(wa, tl.trans(xa))
                part = tl.dot(wz, tl.trans(xb), part)
                acc += part * sg.to(tl.float32)[:, None]
    if ABL == 4:
        acc += tl.sum(junk, axis=1).to(tl.float32)[:, None]
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0) * inv_mult
    msk = mask_m[None, :] & (offs_n[:, None] < N)
    o_off = offs_m[None, :] * N + offs_n[:, None]
    if SPLIT_K == 1:
        tl.store(out_ptr + o_off, (acc * xs[None, :]).to(out_ptr.dtype.element_ty), mask=msk)
    else:
        tl.store(part_ptr + pid_k * M * N + o_off, acc, mask=msk)
        tl.debug_barrier()
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tot = tl.load(part_ptr + o_off, mask=msk, other=0.0, volatile=True)
            for s in range(1, SPLIT_K):
                tot += tl.load(part_ptr + s * M * N + o_off, mask=msk, other=0.0, volatile=True)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
            tl.store(out_ptr + o_off, (tot * xs[None, :]).to(out_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _streamk_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, part_ptr, cnt_ptr, M, N, K, stride_xm, inv_mult, PER,
                    CMAX, GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    ASM: tl.constexpr, ABL: tl.constexpr = 0):
    """Stream-K over the tiled layout (BK == GROUP): program p walks units [p * PER, (p + 1) * PER) of the
    (N tile, K tile) sequence, i.e. one contiguous stretch of weight bytes. A tile that ends inside the
    range is stored; a tile shared with neighbours leaves an FP32 partial, and the last of its contributors
    to arrive sums them in order and stores. ABL 4: loads only."""
    p = tl.program_id(0)
    KT = K // BK
    NT = N // BN
    U = NT * KT
    u0 = p * PER
    u1 = tl.minimum(u0 + PER, U)
    offs_b = tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_kh = tl.arange(0, BK // 2)
    mask_m = offs_m < M
    xs = tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0) * inv_mult
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    junk = tl.zeros((BN, BK // 2), dtype=tl.int32)
    w_base = w_ptr + offs_b[:, None] * (BK // 2) + offs_kh[None, :]
    x_base = x_ptr + offs_m[:, None] * stride_xm + offs_kh[None, :]
    for u in range(u0, u1):
        j = u // KT
        t = u - j * KT
        wb = tl.load(w_base + u * (BN * BK // 2))
        if ABL == 4:
            junk ^= wb.to(tl.int32)
        else:
            sg = tl.load(ws_ptr + u * BN + offs_b)
            xa = tl.load(x_base + t * BK, mask=mask_m[:, None], other=0.0)
            xb = tl.load(x_base + t * BK + BK // 2, mask=mask_m[:, None], other=0.0)
            wa, wz = nibbles_fp8(wb, wb, True, False, ASM)
            part = tl.dot(wa, tl.trans(xa))
            part = tl.dot(wz, tl.trans(xb), part)
            acc += part * sg.to(tl.float32)[:, None]
        if (t == KT - 1) | (u == u1 - 1):
            if ABL == 4:
                acc += tl.sum(junk, axis=1).to(tl.float32)[:, None]
            first = (j * KT) // PER
            last = ((j + 1) * KT - 1) // PER
            o_off = offs_m[None, :] * N + j * BN + offs_b[:, None]
            msk = mask_m[None, :] & (offs_b[:, None] < BN)
            if first == last:
                tl.store(out_ptr + o_off, (acc * xs[None, :]).to(out_ptr.dtype.element_ty), mask=msk)
            else:
                p_off = (j * CMAX) * (BN * BM) + offs_b[:, None] * BM + offs_m[None, :]
                tl.store(part_ptr + p_off + (p - first) * (BN * BM), acc, mask=msk)
                tl.debug_barrier()
                arrived = tl.atomic_add(cnt_ptr + j, 1, sem="acq_rel")
                if arrived == last - first:
                    tot = tl.load(part_ptr + p_off, mask=msk, other=0.0, volatile=True)
                    for c in range(1, last - first + 1):
                        tot += tl.load(part_ptr + p_off + c * (BN * BM), mask=msk, other=0.0, volatile=True)
                    tl.atomic_xchg(cnt_ptr + j, 0)
                    tl.store(out_ptr + o_off, (tot * xs[None, :]).to(out_ptr.dtype.element_ty), mask=msk)
            acc = tl.zeros((BN, BM), dtype=tl.float32)


@triton.jit
def _flat_probe(w_ptr, out_ptr, NWORDS, PER, BLOCK: tl.constexpr):
    """Read int32 words [p * PER, (p + 1) * PER) in blocks of BLOCK; one int a program comes out."""
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.int32)
    end = tl.minimum(p * PER + PER, NWORDS)
    for i in range(p * PER, end, BLOCK):
        acc ^= tl.load(w_ptr + i + offs, mask=i + offs < end, other=0)
    tl.store(out_ptr + p, tl.sum(acc, axis=0))


def tile_weights(packed: torch.Tensor, scales: torch.Tensor, bn: int, bk: int = 128):
    """repack_half bytes (N, K/2) -> (N/bn, K/bk, bn, bk/2) contiguous; scales (N, G) -> (N/bn, G, bn)."""
    n, kh = packed.shape
    t = packed.reshape(n // bn, bn, kh // (bk // 2), bk // 2).permute(0, 2, 1, 3).contiguous()
    s = scales.reshape(n // bn, bn, -1).permute(0, 2, 1).contiguous()
    return t, s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--shapes", default=None, help="N:K,N:K (default: the four Llama-3-8B shapes)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ablate", action="store_true", help="time the ablations (ABL 0-4) of the tiled kernel")
    ap.add_argument("--streamk", action="store_true", help="time the stream-K kernel against the tiled split-K")
    ap.add_argument("--tma", action="store_true", help="TMA descriptor loads (row-major and tiled) + read roofs")
    ap.add_argument("--pdl", action="store_true", help="programmatic dependent launch with an L2 prefetch")
    ap.add_argument("--gemv", action="store_true", help="the shipped CUDA-core GEMV (M = 1) with wide K tiles")
    args = ap.parse_args()
    from fireq_kernels.gemm_w4a8 import (FP8_MMA_ACC_RTOL, _tile_counters, load_tuned, pick_config,
                                         quantize_fp8_rows_triton, repack_half, w4a8_gemm_triton)
    from fireq_kernels.int4cvt import use_asm

    load_tuned()
    env = env_info()
    l2 = env.get("l2_bytes")
    torch.manual_seed(0)
    dummy = torch.empty(1, device="cuda")
    t_empty = bench_graph([lambda: _empty[(132,)](dummy) for _ in range(8)])
    print(f"empty kernel in a graph: {t_empty * 1e3:.2f} us", flush=True)
    bns = (64, 128) if args.quick else (32, 64, 128)
    if args.gemv:
        cfgs = [dict(GEMV=True, BN=bn, BK=bk, SPLIT_K=sk, num_warps=w, num_stages=st)
                for bn, bk, sk, w, st in itertools.product((4, 8, 16), (1024, 2048), (1, 2), (4, 8), (1,))]
    elif args.pdl:
        cfgs = [dict(TILED=False, PDL=pdl, BN=bn, SPLIT_K=sk, num_stages=st, num_warps=4)
                for pdl, bn, sk, st in itertools.product((False, True), (32, 64, 128), (1, 2, 4, 8), (3, 4))]
    elif args.tma:
        cfgs = [dict(TILED=tiled, TMA=True, BN=bn, SPLIT_K=sk, num_stages=st, num_warps=w, ABL=abl)
                for abl, tiled, (bn, w), sk, st in itertools.product((0, 4), (False, True), ((64, 4), (128, 4), (128, 8)),
                                                                    (2, 8), (3, 5))]
        cfgs += [dict(TILED=True, BN=bn, SPLIT_K=sk, num_stages=3, num_warps=4, ABL=abl) for bn in (64, 128)
                 for sk in (2, 8) for abl in (0, 4)]
    elif args.streamk:
        cfgs = [dict(STREAMK=True, BN=bn, PMUL=pm, num_stages=st, num_warps=w, ABL=abl)
                for abl, (bn, w), pm, st in itertools.product((0, 4), ((64, 4), (128, 4), (128, 8)), (1, 2, 3, 4),
                                                              (3, 5))]
        cfgs += [dict(TILED=True, BN=bn, SPLIT_K=sk, num_stages=3, num_warps=4) for bn in (64, 128) for sk in (2, 4, 8)]
    elif args.ablate:
        cfgs = [dict(TILED=True, BN=bn, SPLIT_K=sk, num_stages=3, num_warps=w, ABL=abl)
                for abl, (bn, w), sk in itertools.product(range(5), ((64, 4), (128, 4), (128, 8)), (2, 8))]
    else:
        cfgs = [dict(TILED=tiled, BN=bn, SPLIT_K=sk, num_stages=st, num_warps=w)
                for tiled, bn, sk, st, w in itertools.product((False, True), bns, (1, 2, 4, 8), (3, 5), (4,))]
    rows = []
    roofs = {}
    shapes = [tuple(int(v) for v in a.split(":")) for a in args.shapes.split(",")] if args.shapes else SHAPES
    for n, k in shapes:
        qws = int4_weight_copies(n, k, l2)
        half = [(repack_half(q, k, 128), s, e) for q, s, e in qws]
        tiled = {bn: [tile_weights(h, s, bn) for h, s, _ in half] for bn in bns}
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(len(qws) // 4 + 2)]
        w8 = [w.to(torch.float8_e4m3fn) for w in wb]
        cnt = _tile_counters(torch.device("cuda"), 8192)
        descs = {}
        if args.tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            for bn in bns:
                for i, h in enumerate(half):
                    descs[(bn, False, i)] = TensorDescriptor(h[0], list(h[0].shape), [h[0].stride(0), 1], [bn, 64])
                    t2 = tiled[bn][i][0].view(-1, 64)
                    descs[(bn, True, i)] = TensorDescriptor(t2, list(t2.shape), [64, 1], [bn, 64])
            # read roofs: a flat Triton stream and torch's int32 sum over the same bytes
            roof = {}
            words = [h[0].view(torch.int32).reshape(-1) for h in half]
            for pm, blk, st in itertools.product((1, 4), (2048, 8192), (1, 3)):
                progs = pm * env["sms"]
                per = triton.cdiv(triton.cdiv(words[0].numel(), progs), blk) * blk
                o = torch.empty(progs, dtype=torch.int32, device="cuda")
                t = bench_graph([lambda wd=wd: _flat_probe[(progs,)](wd, o, wd.numel(), per, BLOCK=blk,
                                                                     num_warps=8, num_stages=st) for wd in words])
                roof[f"flat_P{pm}_B{blk}_S{st}"] = n * k / 2 / t / 1e9
            t = bench_graph([lambda wd=wd: wd.sum() for wd in words])
            roof["torch_sum"] = n * k / 2 / t / 1e9
            print(f"N={n} K={k} read roofs TB/s: torch_sum {roof['torch_sum']:.2f}, best flat "
                  f"{max((v, a) for a, v in roof.items() if a != 'torch_sum')}", flush=True)
            roofs[f"{n}x{k}"] = roof
        for m in [int(x) for x in args.ms.split(",")]:
            xs = [quantize_fp8_rows_triton(torch.randn(m, k, device="cuda", dtype=torch.bfloat16)) for _ in range(4)]
            xq0, xs0 = xs[0]
            q0 = qws[0]
            ref, e_twin = gemm_reference(xq0, xs0, q0)
            t_bf16 = bench_graph([lambda i=i: torch.matmul(xs[i % 4][0].to(torch.bfloat16), wb[i % len(wb)].t())
                                  for i in range(len(qws))])
            one = torch.ones((), device="cuda")
            a8 = torch.randn(16, k, device="cuda").to(torch.float8_e4m3fn)
            t_fp8 = bench_graph([lambda i=i: torch._scaled_mm(a8, w8[i % len(w8)].t(), scale_a=one, scale_b=one,
                                                              out_dtype=torch.bfloat16) for i in range(len(qws))])
            cur = pick_config(m, n, k, 128)
            t_cur = bench_graph([lambda i=i, h=h: w4a8_gemm_triton(xs[i % 4][0], xs[i % 4][1], h[0], h[1], h[2], 128,
                                                                   config=cur, layout_block=128)
                                 for i, h in enumerate(half)])
            out = torch.empty((m, n), dtype=torch.bfloat16, device="cuda")
            out32 = torch.empty((m, n), dtype=torch.float32, device="cuda")
            res = []
            for cfg in cfgs:
                bn, sk = cfg["BN"], cfg.get("SPLIT_K", 1)
                part = torch.empty((sk, m, n), dtype=torch.float32, device="cuda")
                if cfg.get("STREAMK"):
                    kt, nt = k // 128, n // bn
                    progs = min(nt * kt, cfg["PMUL"] * env["sms"])
                    per = triton.cdiv(nt * kt, progs)
                    progs = triton.cdiv(nt * kt, per)
                    cmax = triton.cdiv(kt, per) + 1
                    part = torch.empty((nt * cmax * bn * 16,), dtype=torch.float32, device="cuda")

                def launch_sk(i, o, cfg=cfg, bn=bn, part=part):
                    w, s = tiled[bn][i]
                    xq, xsc = xs[i % 4]
                    _streamk_kernel[(progs,)](xq, xsc, w, s, o, part, cnt, m, n, k, xq.stride(0), 2.0 ** -half[i][2],
                                              per, cmax, GROUP=128, BM=16, BN=bn, BK=128, ASM=use_asm(),
                                              ABL=cfg["ABL"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])

                def launch(i, o, cfg=cfg, bn=bn, sk=sk, part=part):
                    if cfg.get("GEMV"):
                        xq, xsc = xs[i % 4]
                        h = half[i]
                        r = w4a8_gemm_triton(xq, xsc, h[0], h[1], h[2], 128, out_dtype=o.dtype, config=dict(cfg),
                                             layout_block=128)
                        if o is out32:  # the correctness call (timed calls keep their own output)
                            o.copy_(r)
                        return r
                    if cfg.get("STREAMK"):
                        return launch_sk(i, o)
                    w, s = (tiled[bn][i][0], tiled[bn][i][1]) if cfg["TILED"] else (half[i][0], half[i][1])
                    if cfg.get("TMA"):
                        w = descs[(bn, cfg["TILED"], i)]
                    xq, xsc = xs[i % 4]
                    _dec_kernel[(n // bn, sk)](xq, xsc, w, s, o, part, cnt, m, n, k, xq.stride(0), k // 2,
                                               s.stride(0), 2.0 ** -half[i][2], GROUP=128, BM=16, BN=bn, BK=128,
                                               SPLIT_K=sk, TILED=cfg["TILED"], ASM=use_asm(), ABL=cfg.get("ABL", 0),
                                               TMA=cfg.get("TMA", False), PDL=cfg.get("PDL", False),
                                               launch_pdl=cfg.get("PDL", False),
                                               num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                try:
                    launch(0, out32)
                    e = ((out32.double() - ref).norm() / ref.norm()).item()
                    if not e <= 2 * e_twin + FP8_MMA_ACC_RTOL and not cfg.get("ABL"):
                        print(f"  WRONG {cfg}: {e:.2e} vs twin {e_twin:.2e}", flush=True)
                        continue
                    t = bench_graph([lambda i=i: launch(i, out) for i in range(len(qws))], warmup=5, rep=20)
                except Exception as ex:
                    print(f"  failed {cfg}: {type(ex).__name__} {str(ex)[:200]}", flush=True)
                    continue
                res.append((t, cfg, e))
            if args.gemv:
                row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3, fp8_us=t_fp8 * 1e3, shipped_us=t_cur * 1e3)
                t, c, e = min(res, key=lambda x: x[0])
                row.update(gemv_us=t * 1e3, gemv_cfg=c, gemv_err=e, err_twin=e_twin, gemv_vs_bf16=t_bf16 / t,
                           gemv_vs_fp8=t_fp8 / t, top=[(round(x[0] * 1e3, 2), x[1]) for x in sorted(
                               res, key=lambda x: x[0])[:5]])
                rows.append(row)
                print({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
                continue
            if args.pdl:
                row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3, fp8_us=t_fp8 * 1e3, shipped_us=t_cur * 1e3)
                for fam, pdl in (("nopdl", False), ("pdl", True)):
                    t, c, e = min((x for x in res if x[1]["PDL"] == pdl), key=lambda x: x[0])
                    row[f"{fam}_us"], row[f"{fam}_cfg"], row[f"{fam}_err"] = t * 1e3, c, e
                    row[f"{fam}_vs_bf16"], row[f"{fam}_vs_fp8"] = t_bf16 / t, t_fp8 / t
                row["err_twin"] = e_twin
                rows.append(row)
                print({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
                continue
            if args.tma:
                row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3, fp8_us=t_fp8 * 1e3, shipped_us=t_cur * 1e3)
                fams = dict(tma_rows=lambda c: c.get("TMA") and not c["TILED"] and c["ABL"] == 0,
                            tma_tiled=lambda c: c.get("TMA") and c["TILED"] and c["ABL"] == 0,
                            ptr_tiled=lambda c: not c.get("TMA") and c["ABL"] == 0,
                            tma_rows_loads=lambda c: c.get("TMA") and not c["TILED"] and c["ABL"] == 4,
                            tma_tiled_loads=lambda c: c.get("TMA") and c["TILED"] and c["ABL"] == 4,
                            ptr_tiled_loads=lambda c: not c.get("TMA") and c["ABL"] == 4)
                for fam, sel in fams.items():
                    t, c, e = min((x for x in res if sel(x[1])), key=lambda x: x[0])
                    row[f"{fam}_us"], row[f"{fam}_cfg"] = t * 1e3, c
                    if not fam.endswith("loads"):
                        row[f"{fam}_err"] = e
                row["err_twin"] = e_twin
                rows.append(row)
                print({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
                continue
            if args.streamk:
                row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3, fp8_us=t_fp8 * 1e3, shipped_us=t_cur * 1e3)
                fams = dict(streamk=lambda c: c.get("STREAMK") and c["ABL"] == 0,
                            streamk_loads=lambda c: c.get("STREAMK") and c["ABL"] == 4,
                            splitk=lambda c: not c.get("STREAMK"))
                for fam, sel in fams.items():
                    t, c, e = min((x for x in res if sel(x[1])), key=lambda x: x[0])
                    row[f"{fam}_us"], row[f"{fam}_cfg"], row[f"{fam}_err"] = t * 1e3, c, e
                row["err_twin"] = e_twin
                row["streamk_vs_bf16"] = row["bf16_us"] / row["streamk_us"]
                row["streamk_vs_fp8"] = row["fp8_us"] / row["streamk_us"]
                row["streamk_tbps"] = (n * k / 2 + n * k / 128) / row["streamk_us"] / 1e6
                rows.append(row)
                print({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
                continue
            if args.ablate:
                row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3, fp8_us=t_fp8 * 1e3, shipped_us=t_cur * 1e3)
                for abl in range(5):
                    t, c, _ = min((x for x in res if x[1]["ABL"] == abl), key=lambda x: x[0])
                    row[f"abl{abl}_us"] = t * 1e3
                    row[f"abl{abl}_cfg"] = c
                rows.append(row)
                print({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
                continue
            best = {}
            for tl_ in (False, True):
                r = min((x for x in res if x[1]["TILED"] == tl_), key=lambda x: x[0], default=None)
                if r:
                    best[tl_] = r
            wbytes = n * k / 2 + n * k / 128
            row = dict(N=n, K=k, M=m, bf16_us=t_bf16 * 1e3, fp8_us=t_fp8 * 1e3, shipped_us=t_cur * 1e3,
                       rows_us=best[False][0] * 1e3, tiled_us=best[True][0] * 1e3,
                       tiled_vs_bf16=t_bf16 / best[True][0], tiled_vs_fp8=t_fp8 / best[True][0],
                       shipped_vs_bf16=t_bf16 / t_cur, shipped_vs_fp8=t_fp8 / t_cur,
                       tiled_tbps=wbytes / best[True][0] / 1e9, rows_tbps=wbytes / best[False][0] / 1e9,
                       rows_cfg=best[False][1], tiled_cfg=best[True][1], err_tiled=best[True][2], err_twin=e_twin,
                       top=[(round(t * 1e3, 2), c) for t, c, _ in sorted(res, key=lambda x: x[0])[:6]])
            rows.append(row)
            print(f"N={n} K={k} M={m}: bf16 {row['bf16_us']:.1f} fp8 {row['fp8_us']:.1f} shipped "
                  f"{row['shipped_us']:.1f} rows {row['rows_us']:.1f} tiled {row['tiled_us']:.1f} us "
                  f"({row['tiled_tbps']:.2f} TB/s) x{row['tiled_vs_bf16']:.2f} bf16 x{row['tiled_vs_fp8']:.2f} fp8 "
                  f"top {row['top'][:3]}", flush=True)
        del qws, half, tiled, wb, w8
        torch.cuda.empty_cache()
    if args.gemv:
        print(table(rows, ["N", "K", "M", "bf16_us", "fp8_us", "shipped_us", "gemv_us", "gemv_vs_bf16", "gemv_vs_fp8"]))
        write_json(args.json, dict(env=env, rows=rows, empty_kernel_us=t_empty * 1e3,
                                   note="the shipped GEMV kernel (M = 1) with K tiles up to 2048"))
        return
    if args.pdl:
        print(table(rows, ["N", "K", "M", "bf16_us", "fp8_us", "shipped_us", "nopdl_us", "pdl_us", "pdl_vs_bf16",
                           "pdl_vs_fp8"]))
        summ = {f"{f}_vs_{b}": geomean([r[f"{f}_vs_{b}"] for r in rows]) for f in ("nopdl", "pdl")
                for b in ("bf16", "fp8")}
        print(summ)
        write_json(args.json, dict(env=env, rows=rows, summary=summ, empty_kernel_us=t_empty * 1e3))
        return
    if args.tma:
        cols = ["N", "K", "M", "bf16_us", "fp8_us", "shipped_us", "tma_rows_us", "tma_tiled_us", "ptr_tiled_us",
                "tma_rows_loads_us", "tma_tiled_loads_us", "ptr_tiled_loads_us"]
        print(table(rows, cols))
        best = {r["N"] * 100000 + r["K"] * 10 + r["M"]: min(r["tma_rows_us"], r["tma_tiled_us"], r["ptr_tiled_us"])
                for r in rows}
        summ = dict(best_vs_bf16=geomean([r["bf16_us"] / best[r["N"] * 100000 + r["K"] * 10 + r["M"]] for r in rows]),
                    best_vs_fp8=geomean([r["fp8_us"] / best[r["N"] * 100000 + r["K"] * 10 + r["M"]] for r in rows]),
                    shipped_vs_bf16=geomean([r["bf16_us"] / r["shipped_us"] for r in rows]),
                    shipped_vs_fp8=geomean([r["fp8_us"] / r["shipped_us"] for r in rows]))
        print(summ)
        write_json(args.json, dict(env=env, rows=rows, summary=summ, roofs=roofs, empty_kernel_us=t_empty * 1e3))
        return
    if args.streamk:
        print(table(rows, ["N", "K", "M", "bf16_us", "fp8_us", "shipped_us", "splitk_us", "streamk_us",
                           "streamk_loads_us", "streamk_tbps"]))
        summ = dict(streamk_vs_bf16=geomean([r["streamk_vs_bf16"] for r in rows]),
                    streamk_vs_fp8=geomean([r["streamk_vs_fp8"] for r in rows]),
                    shipped_vs_bf16=geomean([r["bf16_us"] / r["shipped_us"] for r in rows]),
                    shipped_vs_fp8=geomean([r["fp8_us"] / r["shipped_us"] for r in rows]))
        print(summ)
        write_json(args.json, dict(env=env, rows=rows, summary=summ, empty_kernel_us=t_empty * 1e3))
        return
    if args.ablate:
        print(table(rows, ["N", "K", "M", "bf16_us", "fp8_us", "shipped_us"] + [f"abl{a}_us" for a in range(5)]))
        write_json(args.json, dict(env=env, rows=rows, empty_kernel_us=t_empty * 1e3,
                                   note="ABL 0 full tiled kernel, 1 no group scale, 2 no INT4 conversion, "
                                        "3 neither, 4 loads only"))
        return
    summ = {f"{a}_vs_{b}": geomean([r[f"{a}_vs_{b}"] for r in rows]) for a in ("shipped", "tiled")
            for b in ("bf16", "fp8")}
    summ["rows_vs_bf16"] = geomean([r["bf16_us"] / r["rows_us"] for r in rows])
    summ["empty_kernel_us"] = t_empty * 1e3
    print(table(rows, ["N", "K", "M", "bf16_us", "fp8_us", "shipped_us", "rows_us", "tiled_us", "tiled_tbps"]))
    print(summ)
    write_json(args.json, dict(env=env, rows=rows, summary=summ))


if __name__ == "__main__":
    main()
