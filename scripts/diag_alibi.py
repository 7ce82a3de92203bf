"""ALiBi overhead of the staged prefill: bias factors (R = 2) against no bias, with the key scales loaded one
tile ahead (STAGED_KS_PREFETCH, the bias path's pointer loads) or in their own iteration.

    python scripts/diag_alibi.py --json FILE        # GPU

S = 8192, B = 1, 32 heads, d = 128, causal, both cache formats (bench_attention's ALiBi point). Each variant
is timed with bias and without in alternation (PAIRS pairs, medians), every output compared with the
shipped switch's (the same arithmetic: bit-identical).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PAIRS = 5
NOBIAS_CFG = (64, 128, 4, 2)
BIAS_CFGS = ((64, 128, 4, 2), (64, 128, 4, 3))


def main():
    import fireq_kernels.attention_kv4 as ak
    from _bench_util import bench_graph, env_info, table, write_json
    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import KVSpec, quantize_kv
    from fireq_kernels.bias import alibi_factors, alibi_slopes

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    env = env_info()
    S, H, d = 8192, 32, 128
    rows = []
    for sym in (True, False):
        torch.manual_seed(S)
        q = torch.randn(1, H, S, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, H, S, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, H, S, d, device="cuda", dtype=torch.bfloat16)
        q8, qs = quantize_fp8_rows(q)
        qs = qs.squeeze(-1).contiguous()
        spec = KVSpec(symmetric=sym)
        qk, qv = quantize_kv(k, spec), quantize_kv(v, spec)
        qb, kb = alibi_factors(alibi_slopes(H), S, S)
        qb = qb[None].to("cuda", torch.float32)
        kb = kb[None].to("cuda", torch.float32)
        sm = 1 / math.sqrt(d)

        def run(cfg, bias, prefetch):
            ak.STAGED_KS_PREFETCH = prefetch
            try:
                return ak.kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, sm, True,
                                               k_zero=qk.zeros, v_zero=qv.zeros, q_bias=qb if bias else None,
                                               k_bias=kb if bias else None, splits=1, block_m=cfg[0],
                                               block_n=cfg[1], num_warps=cfg[2], num_stages=cfg[3])
            finally:
                ak.STAGED_KS_PREFETCH = True

        f_nob = lambda: run(NOBIAS_CFG, False, True)  # noqa: E731
        for cfg in BIAS_CFGS:
            ref = run(cfg, True, True)
            for prefetch in (True, False):
                f_bias = lambda cfg=cfg, p=prefetch: run(cfg, True, p)  # noqa: E731
                diff = (f_bias().float() - ref.float()).abs().max().item()
                pairs = [(bench_graph([f_bias]), bench_graph([f_nob])) for _ in range(PAIRS)]
                tb = statistics.median(p[0] for p in pairs)
                tn = statistics.median(p[1] for p in pairs)
                rows.append(dict(sym=sym, cfg=list(cfg), prefetch=prefetch, bias_ms=tb, nobias_ms=tn,
                                 overhead=tb / tn, overhead_pairs=sorted(b / n for b, n in pairs), maxdiff=diff))
                print(rows[-1], flush=True)
        del q, k, v, q8, qk, qv
        torch.cuda.empty_cache()
    print(table(rows, ["sym", "cfg", "prefetch", "bias_ms", "nobias_ms", "overhead", "maxdiff"]))
    summary = {}
    for prefetch in (True, False):
        for sym in (True, False):
            best = min(r["overhead"] for r in rows if r["prefetch"] == prefetch and r["sym"] == sym)
            summary[f"overhead_best_cfg{'' if prefetch else '_noprefetch'}{'' if sym else '_asym'}"] = best
    print(summary)
    write_json(args.json, dict(env=env, rows=rows, summary=summary))


if __name__ == "__main__":
    main()
