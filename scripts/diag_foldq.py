"""The attention kernel's query scale folded into the exp2 FMA (fold_q=True: max(c s) = c max(s), p = exp2(s c - m))
against scaling the score tile first (fold_q=False), same run (H100): prefill and decode at the benchmark's
shapes, both cache formats.

    python scripts/diag_foldq.py --json benchmarks/results/attn-foldq-diag-h100.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, env_info, geomean, table, write_json  # noqa: E402


def main():
    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import KVSpec, quantize_kv
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = []
    for sym in (True, False):
        spec = KVSpec(symmetric=sym)
        for kind, b, hkv, lq, lk in (("prefill", 1, 32, 4096, 4096), ("prefill", 1, 32, 8192, 8192),
                                     ("prefill", 1, 32, 16384, 16384), ("decode", 1, 8, 1, 32768),
                                     ("decode", 8, 8, 1, 131072)):
            q8, qs = quantize_fp8_rows(torch.randn(b, 32, lq, 128, device="cuda"))
            qs = qs.squeeze(-1)
            qk = quantize_kv(torch.randn(b, hkv, lk, 128, device="cuda"), spec)
            qv = quantize_kv(torch.randn(b, hkv, lk, 128, device="cuda"), spec)
            row = dict(kind=kind, sym=sym, B=b, L=lk)
            outs = {}
            for fold in (False, True):
                def f(fold=fold, q8=q8, qs=qs, qk=qk, qv=qv, kind=kind, sym=sym):
                    return kv4_attention_triton(
                        q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, 1 / math.sqrt(128), True, k_zero=qk.zeros,
                        v_zero=qv.zeros, splits=1 if kind == "prefill" else None, fold_q=fold,
                        num_stages=2 if (kind == "prefill" and not sym) else 3)

                outs[fold] = f().float()
                row["fold_ms" if fold else "plain_ms"] = bench_graph([f], warmup=10, rep=40)
            row["gain"] = row["plain_ms"] / row["fold_ms"]
            row["rel_diff"] = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
            rows.append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
    summary = {k: geomean([r["gain"] for r in rows if r["kind"] == k]) for k in ("prefill", "decode")}
    print(table(rows, ["kind", "sym", "B", "L", "plain_ms", "fold_ms", "gain", "rel_diff"]))
    print(summary)
    write_json(args.json, dict(env=env_info(), rows=rows, summary=summary))


if __name__ == "__main__":
    main()
