"""Diagnosis (H100): the in-register INT4 conversion (inline PTX vs Triton casts), GEMM tile configs and
attention configs, each in one run with the baselines beside them.

    python scripts/diag_cvt.py --what gemm|tiles|attn|dec --json FILE

(The committed gemm-cvt-diag-h100.json also has rows for a delayed group-scale schedule and a
warp-specialized loop, timed with earlier versions of this script and the kernel; both were removed.)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import (bench_graph, decode_attention_operands, env_info, int4_weight_copies, table,  # noqa: E402
                         write_json)


def _asm(on: bool) -> None:
    os.environ["FIREQ_CVT_ASM"] = "1" if on else "0"


def gemm_tile_rows(env):
    """Prefill (M = 4096) tile sweep of the SWAP schedule around the tuned winner."""
    from fireq_kernels.gemm_w4a8 import repack_half, w4a8_gemm_triton
    from fireq.formats.fp8 import quantize_fp8_rows

    l2 = env.get("l2_bytes")
    rows = []
    for n, k in ((4096, 4096), (28672, 4096), (4096, 14336)):
        ws = int4_weight_copies(n, k, l2)
        kw = [(repack_half(q, k, 128), s, e) for q, s, e in ws]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(len(ws), 4))]
        m = 4096
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_fp8_rows(x)
        xs = xs.float()
        t_bf16 = bench_graph([lambda w=w: x @ w.T for w in wb])
        for bm, bn, w, st, gm in ((128, 128, 8, 4, 8), (128, 128, 8, 3, 8), (128, 128, 8, 5, 8), (128, 128, 8, 4, 4),
                                  (128, 128, 8, 4, 16), (128, 256, 8, 3, 8), (128, 256, 8, 4, 8), (256, 128, 8, 3, 8),
                                  (64, 256, 8, 4, 8), (128, 128, 4, 4, 8), (64, 128, 4, 5, 8), (256, 64, 8, 4, 8)):
            cfg = dict(SWAP=True, BM=bm, BN=bn, BK=128, SPLIT_K=1, GROUP_M=gm, num_warps=w, num_stages=st)
            try:
                fns = [lambda q=q, s=s, e=e, cfg=cfg: w4a8_gemm_triton(xq, xs, q, s, e, 128, None, torch.bfloat16,
                                                                       cfg, 128) for q, s, e in kw]
                t = bench_graph(fns, warmup=10, rep=40)
            except Exception as ex:
                print("failed", n, k, cfg, type(ex).__name__, str(ex)[:200], flush=True)
                continue
            rows.append(dict(kind="gemm", n=n, k=k, m=m, variant=f"S{bm}x{bn}w{w}s{st}g{gm}", asm=True, ms=t,
                             vs_bf16=t_bf16 / t, tflops=2 * m * n * k / t / 1e9))
            print(rows[-1], flush=True)
    return rows


def gemm_rows(env, quick):
    from fireq_kernels.gemm_w4a8 import load_tuned, pick_config, repack_half, w4a8_gemm_triton
    from fireq.formats.fp8 import quantize_fp8_rows

    load_tuned()
    l2 = env.get("l2_bytes")
    rows = []
    shapes = [(4096, 4096), (28672, 4096)] if quick else [(4096, 4096), (28672, 4096), (4096, 14336)]
    for n, k in shapes:
        ws = int4_weight_copies(n, k, l2)
        kw = [(repack_half(q, k, 128), s, e) for q, s, e in ws]
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(min(len(ws), 4))]
        w8 = [w.to(torch.float8_e4m3fn) for w in wb]
        for m in (1, 4, 16, 4096, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_fp8_rows(x)
            xs = xs.float()
            one = torch.ones((), device="cuda")
            t_bf16 = bench_graph([lambda w=w: x @ w.T for w in wb])
            mp = max(16, m)
            xq16 = torch.zeros(mp, k, device="cuda", dtype=torch.float8_e4m3fn)
            xq16[:m] = xq
            t_fp8 = bench_graph([lambda w=w: torch._scaled_mm(xq16, w.T, one, one, out_dtype=torch.bfloat16)
                                 for w in w8])
            base = pick_config(m, n, k, 128)
            cands = [("tuned", base)]
            if m >= 4096:
                for bm, bn, w, st, swap in ((128, 128, 8, 4, False), (128, 256, 8, 3, False), (256, 128, 8, 3, False),
                                            (128, 64, 4, 4, True), (128, 128, 8, 4, True)):
                    c = dict(SWAP=swap, BM=bm, BN=bn, BK=128, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st)
                    nm = f"{'S' if swap else 'P'}{bm}x{bn}w{w}s{st}"
                    cands.append((nm, c))
            for name, cfg in cands:
                for asm in (True, False):
                    if not asm and name != "tuned":
                        continue
                    _asm(asm)
                    try:
                        fns = [lambda q=q, s=s, e=e, cfg=cfg: w4a8_gemm_triton(xq, xs, q, s, e, 128, None,
                                                                               torch.bfloat16, cfg, 128)
                               for q, s, e in kw]
                        t = bench_graph(fns, warmup=10, rep=40)
                    except Exception as ex:  # a config that does not compile: report and go on
                        print("failed", n, k, m, name, asm, type(ex).__name__, str(ex)[:200], flush=True)
                        continue
                    rows.append(dict(kind="gemm", n=n, k=k, m=m, variant=name, asm=asm, ms=t,
                                     vs_bf16=t_bf16 / t, vs_fp8=t_fp8 / t,
                                     tflops=2 * m * n * k / t / 1e9))
                    print(rows[-1], flush=True)
            _asm(True)
    return rows


DECODE_SWEEP = ((16, 128, 4, 3), (16, 64, 4, 4), (16, 128, 4, 4), (16, 64, 4, 3), (16, 256, 8, 3), (16, 256, 4, 3))


def _prefill_rows(spec, S=8192):
    import torch.nn.functional as F

    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import quantize_kv
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    rows = []
    q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
    q8, qs = quantize_fp8_rows(q)
    qs = qs.squeeze(-1).contiguous()
    qk, qv = quantize_kv(k, spec), quantize_kv(v, spec)
    t_sdpa = bench_graph([lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)], warmup=5, rep=20)
    flops = 4 * S * S * 128 * 32 / 2
    for bm, bn, w, st in ((64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 4, 3),
                          (64, 128, 4, 2), (64, 256, 8, 3)):
        try:
            f = lambda: kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales,  # noqa: E731
                                             1 / math.sqrt(128), True, k_zero=qk.zeros, v_zero=qv.zeros,
                                             splits=1, block_m=bm, block_n=bn, num_warps=w, num_stages=st)
            t = bench_graph([f], warmup=5, rep=20)
        except Exception as ex:
            print("failed", bm, bn, w, st, type(ex).__name__, str(ex)[:200], flush=True)
            continue
        rows.append(dict(kind="prefill", sym=spec.symmetric, S=S, cfg=[bm, bn, w, st], ms=t, sdpa_ms=t_sdpa,
                         vs_sdpa=t_sdpa / t, tflops=flops / t / 1e9))
        print(rows[-1], flush=True)
    return rows


def attn_rows(env, quick, decode_only=False):
    import torch.nn.functional as F

    from fireq.formats.kv import KVSpec
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    rows = []
    for sym in (True, False):
        spec = KVSpec(symmetric=sym)
        if not decode_only:
            rows += _prefill_rows(spec)
        for L, B in ((32768, 8), (131072, 1), (8192, 1)):
            q, k, v, q8, qs, caches = decode_attention_operands(L, B, spec, env.get("l2_bytes"))
            t_sdpa = bench_graph([lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)], warmup=5, rep=20)
            for sp in (None, 32):
                for bm, bn, w, st in DECODE_SWEEP:
                    fns = [lambda a=a, c=c, sp=sp, bm=bm, bn=bn, w=w, st=st: kv4_attention_triton(
                        q8, qs, a.packed, a.scales, c.packed, c.scales, 1 / math.sqrt(128), True, k_zero=a.zeros,
                        v_zero=c.zeros, splits=sp, block_m=bm, block_n=bn, num_warps=w, num_stages=st)
                        for a, c in caches]
                    try:
                        t = bench_graph(fns, warmup=5, rep=20)
                    except Exception as ex:
                        print("failed", L, B, sp, bm, bn, w, st, type(ex).__name__, str(ex)[:200], flush=True)
                        continue
                    kv_bytes = 2 * B * 8 * L * (64 + 1 + (0 if sym else 1))
                    rows.append(dict(kind="decode", sym=sym, L=L, B=B, splits=sp, cfg=[bm, bn, w, st], ms=t,
                                     sdpa_ms=t_sdpa, vs_sdpa=t_sdpa / t, tbps=kv_bytes / t / 1e9))
                    print(rows[-1], flush=True)
            _asm(True)
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--what", default="gemm,attn")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    env = env_info()
    torch.manual_seed(0)
    rows = []
    if "dec" in a.what:  # decode sweep only, wider tiles
        global DECODE_SWEEP
        DECODE_SWEEP = ((16, 256, 4, 3), (16, 256, 4, 2), (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 8, 3),
                        (16, 512, 4, 2))
        rows += attn_rows(env, a.quick, decode_only=True)
    if "attn" in a.what:
        rows += attn_rows(env, a.quick)
    if "tiles" in a.what:
        rows += gemm_tile_rows(env)
    if "gemm" in a.what:
        rows += gemm_rows(env, a.quick)
    print(table(rows, ["kind", "n", "k", "m", "S", "L", "B", "sym", "variant", "cfg", "splits", "asm",
                       "ms", "vs_bf16", "vs_fp8", "vs_sdpa", "tflops", "tbps"]))
    write_json(a.json, dict(env=env, rows=rows))


if __name__ == "__main__":
    main()
