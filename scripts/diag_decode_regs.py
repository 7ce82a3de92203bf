"""Decode attention variants against the shipped choice and SDPA: a cap on registers (more programs an
SM), and the one-tile-ahead loads of the per-token scales (UNSTAGED_PREFETCH).

The shipped decode kernel (16 query rows x 128 keys, 2 warps, 3 stages) takes 255 registers a thread, so an
SM holds four programs, eight warps: few to hide the latency of a tile's chain (codes -> conversion ->
Q.K^T -> softmax -> P.V). scripts/diag_sass.py compiles the alternatives for sm_90: with Triton's maxnreg the
2-warp 64-key tile fits 128 registers with 136 B of spills (eight programs an SM), the 4-warp 128-key tile
with 48 B. This times such variants against the shipped choice and SDPA (BF16 cache, K and V separate
tensors, rotated past L2 as bench_attention does), at bench_attention's decode points.

    python scripts/diag_decode_regs.py --check                  # CPU or GPU: every variant against float64
    python scripts/diag_decode_regs.py --json FILE              # GPU: the timings
    python scripts/diag_decode_regs.py --json FILE --variants shipped,shipped_noprefetch,n64w2r128

attn-decode-regs-diag-h200.json ran every variant before UNSTAGED_PREFETCH existed (the *_noprefetch
behaviour); attn-decode-prefetch-diag-h200.json is the A/B of the prefetch.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# name: (block_n, warps, stages, max_regs, programs the splits aim at), or None for the wrapper's own choice;
# a name ending in a FLAGS suffix runs that variant with a switch changed
VARIANTS = {
    "shipped": None,
    "shipped_symtma": None,
    "n128w2s4": (128, 2, 4, None, 512),
    "n128w2s4_symtma": (128, 2, 4, None, 512),
    "n128w2p1k": (128, 2, 3, None, 1024),
    "n256w4": (256, 4, 3, None, 264),
    "n256w4_symtma": (256, 4, 3, None, 264),
    "n128w2s2": (128, 2, 2, None, 512),
    "n64w2p1k": (64, 2, 3, None, 1024),
    "n64w2s4p1k": (64, 2, 4, None, 1024),
    "n256w2": (256, 2, 3, None, 512),
    "shipped_noprefetch": None,
    "shipped_qkf8": None,
    "shipped_notma": None,
    "n64w2r128_noprefetch": (64, 2, 3, 128, 1024),
    "n128w4r128_noprefetch": (128, 4, 3, 128, 512),
    "n128w2r168": (128, 2, 3, 168, 512),
    "n128w2r128": (128, 2, 3, 128, 1024),
    "n128w4": (128, 4, 3, None, 512),
    "n128w4r128": (128, 4, 3, 128, 512),
    "n128w4r128p1k": (128, 4, 3, 128, 1024),
    "n64w2": (64, 2, 3, None, 1024),
    "n64w2r128": (64, 2, 3, 128, 1024),
    "n64w2r128p2k": (64, 2, 3, 128, 2048),
    "n64w2s4r128": (64, 2, 4, 128, 1024),
    # one-warp programs: a warp holds whole key tiles, so the softmax needs no cross-warp exchange (no
    # BAR.SYNC), and an SM holds eight (64 keys, 255 registers) or nine (32 keys, 222) of them
    "n64w1p1k": (64, 1, 3, None, 1024),
    "n64w1p2k": (64, 1, 3, None, 2048),
    "n64w1s4p2k": (64, 1, 4, None, 2048),
    "n32w1p2k": (32, 1, 3, None, 2048),
    "n32w1s4p2k": (32, 1, 4, None, 2048),
    "n64w1s2p1k": (64, 1, 2, None, 1024),
    "n64w1p512": (64, 1, 3, None, 512),
    "n64w1r224p1k": (64, 1, 3, 224, 1024),
    "n64w1r200p1k": (64, 1, 3, 200, 1024),
    "n64w1r168p1k": (64, 1, 3, 168, 1024),
}


def splits_for(blocks: int, lk: int, bn: int, programs: int) -> int:
    s = 1
    while blocks * s < programs and lk >= 4 * s * bn and s < 256:
        s *= 2
    return s


# name suffixes that run a variant with a module switch of attention_kv4 changed
FLAGS = {"_noprefetch": ("UNSTAGED_PREFETCH", False), "_symtma": ("UNSTAGED_TMA_SYM", True),
         "_qkf8": ("DECODE_QK_F16", False), "_notma": ("UNSTAGED_TMA", False)}


def call(variant, q8, qs, qk, qv, sm, B, L):
    import fireq_kernels.attention_kv4 as ak

    for suffix, (flag, value) in FLAGS.items():
        if variant.endswith(suffix):
            old = getattr(ak, flag)
            setattr(ak, flag, value)
            try:
                return _call(variant, q8, qs, qk, qv, sm, B, L)
            finally:
                setattr(ak, flag, old)
    return _call(variant, q8, qs, qk, qv, sm, B, L)


def _call(variant, q8, qs, qk, qv, sm, B, L):
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    v = VARIANTS[variant]
    if v is None:
        return kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, sm, True,
                                    k_zero=qk.zeros, v_zero=qv.zeros)
    bn, w, st, mr, progs = v
    sp = splits_for(B * qk.packed.shape[1], L, bn, progs)
    return kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, sm, True, k_zero=qk.zeros,
                                v_zero=qv.zeros, splits=sp, block_m=16, block_n=bn, num_warps=w, num_stages=st,
                                max_regs=mr if q8.is_cuda else None)


def make(B, L, sym, dev, hq=32, hkv=8, d=128, seed=0):
    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import KVSpec, quantize_kv

    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randn(B, hq, 1, d, generator=g, device=dev).to(torch.bfloat16)
    k = torch.randn(B, hkv, L, d, generator=g, device=dev).to(torch.bfloat16)
    v = torch.randn(B, hkv, L, d, generator=g, device=dev).to(torch.bfloat16)
    q8, qs = quantize_fp8_rows(q)
    spec = KVSpec(symmetric=sym)
    return q, k, v, q8, qs.squeeze(-1).contiguous(), quantize_kv(k, spec), quantize_kv(v, spec)


def rel_err(out, q8, qs, qk, qv, sym):
    """Relative error of a decode output (B, Hq, 1, D) against float64 attention over the same quantized
    operands (q8 (B, Hq, 1, D) with qs (B, Hq); the KV cache as quantize_kv gives it)."""
    from fireq.formats.kv import KVSpec, dequantize_kv

    d = q8.shape[-1]
    rep = q8.shape[1] // qk.packed.shape[1]
    spec = KVSpec(symmetric=sym)
    kd = dequantize_kv(qk, d, spec, torch.float64).repeat_interleave(rep, 1)
    vd = dequantize_kv(qv, d, spec, torch.float64).repeat_interleave(rep, 1)
    qd = q8.double() * qs[..., None].double()
    ref = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(d), -1) @ vd
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(dev, names):
    small = dev == "cpu"
    for sym in (True, False):
        B, L = (1, 600) if small else (2, 8192)
        hq, hkv, d = (8, 2, 64) if small else (32, 8, 128)
        q, k, v, q8, qs, qk, qv = make(B, L, sym, dev, hq, hkv, d, seed=L)
        base = rel_err(call("shipped", q8, qs, qk, qv, 1 / math.sqrt(d), B, L), q8, qs, qk, qv, sym)
        for name in names:
            if small and VARIANTS[name] is not None and VARIANTS[name][0] > 64:
                continue
            e = rel_err(call(name, q8, qs, qk, qv, 1 / math.sqrt(d), B, L), q8, qs, qk, qv, sym)
            print(f"sym={sym} {name}: err {e:.2e} (shipped {base:.2e})", flush=True)
            assert e <= 2 * base + 1e-6, name


def bench(path, names):
    import torch.nn.functional as F

    from _bench_util import DECODE_POINTS, bench_graph, copies_for, env_info, geomean, table, write_json
    from fireq.formats.kv import KVSpec, quantize_kv

    env = env_info()
    rows = []
    for sym, L, B in DECODE_POINTS:
        spec = KVSpec(symmetric=sym)
        q, k, v, q8, qs, qk, qv = make(B, L, sym, "cuda", seed=L + B)
        sm = 1 / math.sqrt(128)
        sets = copies_for(B * 8 * L * 65 * 2, env.get("l2_bytes"), min_sets=1, max_sets=4)
        caches = [(qk, qv)] + [(quantize_kv(torch.randn_like(k), spec), quantize_kv(torch.randn_like(v), spec))
                               for _ in range(sets - 1)]
        row = dict(sym=sym, L=L, B=B)
        for name in names:
            fns = [lambda a=a, c=c, n=name: call(n, q8, qs, a, c, sm, B, L) for a, c in caches]
            try:
                row[name] = bench_graph(fns)
            except Exception as e:  # a launch that does not fit: noted, the rest goes on
                print("failed", name, type(e).__name__, str(e)[:120], flush=True)
                row[name] = None
        ks = [k] + [torch.randn_like(k) for _ in range(min(sets, 2) - 1)]
        vs = [v] + [torch.randn_like(v) for _ in range(min(sets, 2) - 1)]
        row["sdpa"] = bench_graph([lambda kk=kk, vv=vv: F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)
                                   for kk, vv in zip(ks, vs)])
        for name in names:
            if row[name]:
                row[f"{name}_vs_sdpa"] = row["sdpa"] / row[name]
        rows.append(row)
        print({kk: (round(x, 4) if isinstance(x, float) else x) for kk, x in row.items()}, flush=True)
        del q, k, v, caches, ks, vs
        torch.cuda.empty_cache()
    summary = {}
    for sym in (True, False):
        for name in names:
            vals = [r.get(f"{name}_vs_sdpa") for r in rows if r["sym"] == sym]
            if all(vals):
                summary[f"{name}{'' if sym else '_asym'}"] = geomean(vals)
    print(table(rows, ["sym", "L", "B"] + [f"{n}_vs_sdpa" for n in names]))
    print(summary)
    write_json(path, dict(env=env, rows=rows, summary=summary, variants={k: VARIANTS[k] for k in names}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"diag_decode_regs: unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    from _bench_util import check_then_bench

    check_then_bench(args, check, bench, names)


if __name__ == "__main__":
    main()
