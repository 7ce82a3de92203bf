"""Benchmark the INT4-KV attention kernel against SDPA (BF16) in the same run (H100).

    python scripts/bench_attention.py --json benchmarks/results/attention-h100.json

Prefill: B = 1, 32 heads, d = 128, causal, S in {4096, 8192, 16384}, vs SDPA on BF16 Q/K/V.
Decode: 32 query / 8 KV heads, d = 128, L in {8192, 32768, 131072}, B in {1, 8}, vs SDPA over a BF16
cache with enable_gqa=True. ALiBi: prefill S = 8192 with R = 2 factors vs SDPA with the dense BF16 bias,
and the time with factors over the time without (the two timed in alternation, ALIBI_PAIRS times, medians;
the row keeps every pair's ratio). CUDA-graph timing (do_bench medians), random inputs,
inputs rotated past L2 where one set fits in it. Each point is checked against a float reference first.
I/O: for prefill, HBM bytes from the kernel's tiles (Q, O once; the staging pass; staged K and V + scales once
per query block) next to the Saha-Ye lower bound N^2 d^2 / M for the on-chip memory M the tiles use.
Both cache formats: symmetric INT4 (summary keys without suffix) and asymmetric with zero points (the
default recipe's, keys ending in _asym). Each point times a few tile configs and reports the best.
P.V FP16 (rows with pv = "fp16"); with --pv fp16,fp8 also the FP8 option (pv_fp8=True; rows with
pv = "fp8", summary keys ending in _pvfp8).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, copies_for, env_info, geomean, table, write_json  # noqa: E402


# candidates (H100 winners in benchmarks/results/attn-diag-h100.json); the best is timed per point
# prefill runs the staged kernel (kv4_attention_triton's default for long queries on the GPU; winners in
# attn-staged-diag-h100.json)
PREFILL_CFGS = ((64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2))
# (splits, block_n); (None, None): the wrapper's own decode choice (one-warp 64-key programs where the keys allow)
ALIBI_PAIRS = 5  # ALiBi: bias / no-bias timings taken in alternation, medians
DECODE_CFGS = ((None, None), (None, 256), (16, 256), (32, 256), (None, 128), (32, 128))


def main():
    from fireq.formats.kv import KVSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pv", default="fp16", help="P.V variants to time: fp16, fp8 or fp16,fp8")
    args = ap.parse_args()
    env = env_info()
    dev = "cuda"
    torch.manual_seed(0)
    rows = []
    pvs = args.pv.split(",")
    for sym in (True, False):
        for pv in pvs:
            run_format(args, env, dev, KVSpec(symmetric=sym), rows, pv == "fp8")
    summary = {}
    for pv in pvs:
        for sym in (True, False):
            tag = ("" if sym else "_asym") + ("_pvfp8" if pv == "fp8" else "")
            sel = [r for r in rows if r["sym"] == sym and r["pv"] == pv]
            summary.update({
                f"prefill_vs_sdpa_bf16{tag}": geomean([r["vs_sdpa"] for r in sel if r["kind"] == "prefill"]),
                f"decode_vs_sdpa_bf16{tag}": geomean([r["vs_sdpa"] for r in sel if r["kind"] == "decode"]),
                f"alibi_vs_sdpa_dense_bias{tag}": [r["vs_sdpa"] for r in sel if r["kind"] == "alibi"][0],
                f"alibi_overhead_vs_nobias_max{tag}": max(r["overhead"] for r in sel if r["kind"] == "alibi")})
    print(table(rows, ["kind", "sym", "pv", "S", "L", "B", "ours_ms", "sdpa_ms", "vs_sdpa", "hbm_tbps", "err", "cfg"]))
    print({k: round(v, 3) for k, v in summary.items()})
    write_json(args.json, dict(env=env, rows=rows, summary=summary,
                               note="summary keys without a suffix: symmetric INT4 KV (KVSpec()); _asym: asymmetric "
                                    "with zero points, the default recipe's format"))


def run_format(args, env, dev, spec, rows, pv_fp8=False):
    import torch.nn.functional as F

    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import dequantize_kv, quantize_kv
    from fireq_kernels.attention_kv4 import kv4_attention_triton
    from fireq_kernels.bias import alibi_factors, alibi_dense, alibi_slopes

    sym = spec.symmetric
    pv = "fp8" if pv_fp8 else "fp16"
    best_cfg = {}

    def make(b, hq, hkv, lq, lk, d=128):
        q = torch.randn(b, hq, lq, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(b, hkv, lk, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(b, hkv, lk, d, device=dev, dtype=torch.bfloat16)
        q8, qs = quantize_fp8_rows(q)
        qk, qv = quantize_kv(k, spec), quantize_kv(v, spec)
        return q, k, v, q8, qs.squeeze(-1).contiguous(), qk, qv

    def check(out, q8, qs, qk, qv, lq, lk, causal, qb=None, kb=None):
        # float reference on the same quantized operands, on a slice of heads to bound memory
        h = min(2, q8.shape[1])
        rep = q8.shape[1] // qk.packed.shape[1]
        qd = (q8[:1, :h].float() * qs[:1, :h, :, None]).double()
        kd = dequantize_kv(type(qk)(qk.packed[:1, :1], qk.scales[:1, :1], None if sym else qk.zeros[:1, :1]), 128,
                           spec, torch.float64)
        vd = dequantize_kv(type(qv)(qv.packed[:1, :1], qv.scales[:1, :1], None if sym else qv.zeros[:1, :1]), 128,
                           spec, torch.float64)
        h = min(h, rep)
        qd = qd[:, :h]
        lq_c = min(lq, 512)
        qd = qd[:, :, -lq_c:]
        s = (qd @ kd.transpose(-1, -2)) / math.sqrt(128)
        if qb is not None:
            s = s + qb[:1, :h, -lq_c:].double() @ kb[:1, :1].double().transpose(-1, -2)
        if causal:
            i = torch.arange(lk - lq_c, lk, device=dev)[:, None]
            s = s.masked_fill(torch.arange(lk, device=dev)[None, :] > i, float("-inf"))
        ref = torch.softmax(s, -1) @ vd
        got = out[:1, :h, -lq_c:].double()
        return ((got - ref).norm() / ref.norm()).item()

    # ---- prefill
    for S in ([4096] if args.quick else [4096, 8192, 16384]):
        q, k, v, q8, qs, qk, qv = make(1, 32, 32, S, S)
        scale = 1 / math.sqrt(128)
        best = None
        for bm, bn, w, st in PREFILL_CFGS:
            try:
                f = lambda bm=bm, bn=bn, w=w, st=st: kv4_attention_triton(  # noqa: E731
                    q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, scale, True, k_zero=qk.zeros,
                    v_zero=qv.zeros, splits=1, block_m=bm, block_n=bn, num_warps=w, num_stages=st, pv_fp8=pv_fp8)
                t = bench_graph([f], warmup=5, rep=20)
                if best is None or t < best[0]:
                    best = (t, bm, bn, w, st, f)
            except Exception as e:
                print("prefill config failed", bm, bn, w, st, type(e).__name__, str(e)[:100], flush=True)
        t_ours, bm, bn, w, st, f = best
        best_cfg[S] = (bm, bn, w, st)
        err = check(f(), q8, qs, qk, qv, S, S, True)
        t_ours = bench_graph([f])
        t_sdpa = bench_graph([lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)])
        flops = 4 * S * S * 128 * 32 / 2
        tiles_q = math.ceil(S / bm)
        # staged: the pass reads the codes (+ zero points) and writes K as FP8 and V as fp16 (FP8) codes once;
        # each query block (causal: ~half of them a key) then reads those and the two fp8 scales a token
        vb = 128 if pv_fp8 else 256
        stage_bytes = 32 * S * (2 * 64 + (0 if sym else 2) + 128 + vb)
        kv_bytes = stage_bytes + 32 * S * (128 + vb + 2) * tiles_q / 2
        q_o_bytes = 32 * S * 128 * (1 + 2) + 32 * S * 4
        onchip = (bm * 128 + bn * (128 + vb) + bm * bn * 4 + bm * 128 * 4)  # Q fp8, K/V tiles, S fp32, acc fp32
        lower = 32 * (S * S * 128 * 128 / onchip) / 2
        rows.append(dict(kind="prefill", sym=sym, pv=pv, S=S, B=1, ours_ms=t_ours, sdpa_ms=t_sdpa, vs_sdpa=t_sdpa / t_ours,
                         tflops=flops / t_ours / 1e9, hbm_bytes=kv_bytes + q_o_bytes,
                         hbm_tbps=(kv_bytes + q_o_bytes) / t_ours / 1e9, saha_ye_lower_bound_bytes=lower,
                         err=err, cfg=[bm, bn, w, st]))
        print(rows[-1], flush=True)
        del q, k, v, q8, qk, qv
        torch.cuda.empty_cache()

    # ---- decode
    for L in ([8192] if args.quick else [8192, 32768, 131072]):
        for B in (1, 8):
            q, k, v, q8, qs, qk, qv = make(B, 32, 8, 1, L)
            scale = 1 / math.sqrt(128)
            sets = copies_for(B * 8 * L * 65 * 2, env.get("l2_bytes"), min_sets=1, max_sets=4)
            caches = [(qk, qv)] + [(quantize_kv(torch.randn_like(k), spec), quantize_kv(torch.randn_like(v), spec))
                                   for _ in range(sets - 1)]
            best = None
            for sp, bn in DECODE_CFGS:
                fns = [lambda a=a, c=c, sp=sp, bn=bn: kv4_attention_triton(
                    q8, qs, a.packed, a.scales, c.packed, c.scales, scale, True, k_zero=a.zeros, v_zero=c.zeros,
                    splits=sp, block_n=bn, pv_fp8=pv_fp8) for a, c in caches]
                try:
                    t = bench_graph(fns, warmup=5, rep=20)
                except Exception as e:
                    print("decode config failed", sp, bn, type(e).__name__, str(e)[:100], flush=True)
                    continue
                if best is None or t < best[0]:
                    best = (t, (sp, bn), fns)
            t_ours, sp, fns = best
            err = check(fns[0](), q8, qs, qk, qv, 1, L, True)
            t_ours = bench_graph(fns)
            ks = [k] + [torch.randn_like(k) for _ in range(min(sets, 2) - 1)]
            t_sdpa = bench_graph([lambda kk=kk: F.scaled_dot_product_attention(q, kk, v, enable_gqa=True)
                                  for kk in ks])
            kv_bytes = 2 * B * 8 * L * (64 + 1 + (0 if sym else 1))
            rows.append(dict(kind="decode", sym=sym, pv=pv, L=L, B=B, ours_ms=t_ours, sdpa_ms=t_sdpa, vs_sdpa=t_sdpa / t_ours,
                             hbm_tbps=kv_bytes / t_ours / 1e9, err=err, cfg=list(sp)))
            print(rows[-1], flush=True)
            del q, k, v, q8, qk, qv, caches, ks
            torch.cuda.empty_cache()

    # ---- ALiBi
    S = 4096 if args.quick else 8192
    q, k, v, q8, qs, qk, qv = make(1, 32, 32, S, S)
    slopes = alibi_slopes(32)
    qb, kb = alibi_factors(slopes, S, S)
    qb = qb[None].to(dev, torch.float32)  # (1, H, S, 2): bias values reach -slope*S, kept in fp32 here
    kb = kb[None].to(dev, torch.float32)
    scale = 1 / math.sqrt(128)
    best_prefill_cfg = best_cfg.get(S) or next(iter(best_cfg.values()))
    bm, bn, w, st = best_prefill_cfg
    # the bias run picks its own best of the same candidates (the no-bias one keeps the prefill's)
    best = None
    for cfg in PREFILL_CFGS:
        f = lambda cfg=cfg: kv4_attention_triton(  # noqa: E731
            q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, scale, True, k_zero=qk.zeros, v_zero=qv.zeros,
            q_bias=qb, k_bias=kb, splits=1, block_m=cfg[0], block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3],
            pv_fp8=pv_fp8)
        try:
            t = bench_graph([f], warmup=5, rep=20)
        except Exception as e:
            print("alibi config failed", cfg, type(e).__name__, str(e)[:100], flush=True)
            continue
        if best is None or t < best[0]:
            best = (t, cfg, f)
    _, bias_cfg, f_bias = best
    f_nob = lambda: kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, scale, True,  # noqa
                                         k_zero=qk.zeros, v_zero=qv.zeros, splits=1, block_m=bm, block_n=bn,
                                         num_warps=w, num_stages=st, pv_fp8=pv_fp8)
    err = check(f_bias(), q8, qs, qk, qv, S, S, True, qb, kb)
    # the two timed in alternation, medians of ALIBI_PAIRS each: the ratio is a goal at a few percent, the
    # size of the drift between two timings taken apart
    pairs = [(bench_graph([f_bias]), bench_graph([f_nob])) for _ in range(ALIBI_PAIRS)]
    t_bias = statistics.median(p[0] for p in pairs)
    t_nob = statistics.median(p[1] for p in pairs)
    dense = (alibi_dense(slopes, S, S).to(dev, torch.bfloat16)
             + torch.triu(torch.full((S, S), float("-inf"), device=dev), 1).to(torch.bfloat16))[None]
    t_dense = bench_graph([lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)])
    rows.append(dict(kind="alibi", sym=sym, pv=pv, S=S, cfg=list(bias_cfg), nobias_cfg=list(best_prefill_cfg), ours_ms=t_bias, nobias_ms=t_nob, sdpa_dense_ms=t_dense,
                     vs_sdpa=t_dense / t_bias, overhead=t_bias / t_nob,
                     overhead_pairs=sorted(b / n for b, n in pairs), err=err))
    print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
