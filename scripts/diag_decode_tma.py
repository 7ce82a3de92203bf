"""Decode over the INT4 cache: code tiles by TMA descriptors vs pointer loads, vs SDPA (H100).

    python scripts/diag_decode_tma.py --json benchmarks/results/attn-decode-tma-diag-h100.json

bench_attention.py's decode points (32 query / 8 KV heads, d = 128, L in {8192, 32768, 131072}, B in
{1, 8}), both cache formats, each point's best (splits, block_n) for each loader; inputs rotated past L2.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import (DECODE_POINTS, bench_graph, decode_attention_operands, env_info, geomean, table,  # noqa: E402
                         write_json)

CFGS = ((None, 256), (16, 256), (32, 256), (None, 128), (32, 128), (64, 128), (16, 512))


def main():
    import torch.nn.functional as F

    import fireq_kernels.attention_kv4 as ak
    from fireq.formats.kv import KVSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    env = env_info()
    rows = []
    for sym, L, B in DECODE_POINTS:
        spec = KVSpec(symmetric=sym)
        q, k, v, q8, qs, caches = decode_attention_operands(L, B, spec, env.get("l2_bytes"), seed=L + B)
        scale = 1 / math.sqrt(128)
        ref = None
        res = {}
        for tma in (False, True):
            best = None
            for sp, bn in CFGS:
                def mk(a, c, sp=sp, bn=bn, tma=tma):
                    def f():
                        ak.UNSTAGED_TMA = tma
                        return ak.kv4_attention_triton(q8, qs, a.packed, a.scales, c.packed, c.scales, scale,
                                                       True, k_zero=a.zeros, v_zero=c.zeros, splits=sp,
                                                       block_n=bn)
                    return f
                fns = [mk(a, c) for a, c in caches]
                try:
                    o = fns[0]().float()
                    t = bench_graph(fns, warmup=5, rep=20)
                except Exception as ex:
                    print("failed", tma, sp, bn, type(ex).__name__, str(ex)[:120], flush=True)
                    continue
                if ref is None:
                    ref = o
                diff = ((o - ref).norm() / ref.norm()).item()
                if best is None or t < best[0]:
                    best = (t, (sp, bn), fns, diff)
            t = bench_graph(best[2])
            res[tma] = (t, best[1], best[3])
        ks = [k] + [torch.randn_like(k) for _ in range(min(len(caches), 2) - 1)]
        t_sdpa = bench_graph([lambda kk=kk: F.scaled_dot_product_attention(q, kk, v, enable_gqa=True)
                              for kk in ks])
        kv_bytes = 2 * B * 8 * L * (64 + 1 + (0 if sym else 1))
        for tma, (t, cfg, diff) in res.items():
            rows.append(dict(sym=sym, L=L, B=B, loader="tma" if tma else "pointers", ms=t, sdpa_ms=t_sdpa,
                             vs_sdpa=t_sdpa / t, hbm_tbps=kv_bytes / t / 1e9, cfg=list(cfg),
                             diff_vs_pointers=diff))
            print(rows[-1], flush=True)
        del q, k, v, caches, ks
        torch.cuda.empty_cache()
    summary = {f"{ld}{'' if sym else '_asym'}": geomean([r["vs_sdpa"] for r in rows if r["sym"] == sym and
                                                          r["loader"] == ld])
               for sym in (True, False) for ld in ("pointers", "tma")}
    print(table(rows, ["sym", "L", "B", "loader", "ms", "sdpa_ms", "vs_sdpa", "hbm_tbps", "cfg", "diff_vs_pointers"]))
    print(summary)
    write_json(args.json, dict(env=env, rows=rows, summary=summary, note=__doc__.strip().splitlines()[0]))


if __name__ == "__main__":
    main()
