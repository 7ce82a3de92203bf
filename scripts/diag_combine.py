"""Decode attention: the split combine in the main kernel (last split of a block sums the partials) against
the separate combine kernel, same run (H100), at the benchmark's decode points.

    python scripts/diag_combine.py --json benchmarks/results/attn-combine-diag-h100.json
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
        for L in (8192, 32768, 131072):
            for B in (1, 8):
                q8, qs = quantize_fp8_rows(torch.randn(B, 32, 1, 128, device="cuda"))
                qs = qs.squeeze(-1)
                sets = [(quantize_kv(torch.randn(B, 8, L, 128, device="cuda"), spec),
                         quantize_kv(torch.randn(B, 8, L, 128, device="cuda"), spec)) for _ in range(2)]
                row = dict(sym=sym, L=L, B=B)
                outs = {}
                for bn in (128, 256):
                    for fused in (False, True):
                        fns = [lambda a=a, c=c, fused=fused, bn=bn: kv4_attention_triton(
                            q8, qs, a.packed, a.scales, c.packed, c.scales, 1 / math.sqrt(128), True, k_zero=a.zeros,
                            v_zero=c.zeros, block_n=bn, fused_combine=fused) for a, c in sets]
                        outs[(bn, fused)] = fns[0]().float()
                        row[f"{'fused' if fused else 'separate'}_{bn}_us"] = bench_graph(fns, warmup=10, rep=50) * 1e3
                    row[f"gain_{bn}"] = row[f"separate_{bn}_us"] / row[f"fused_{bn}_us"]
                    row[f"maxdiff_{bn}"] = (outs[(bn, True)] - outs[(bn, False)]).abs().max().item()
                rows.append(row)
                print(row, flush=True)
    summary = {f"gain_{bn}_geomean": geomean([r[f"gain_{bn}"] for r in rows]) for bn in (128, 256)}
    print(table(rows, ["sym", "L", "B", "separate_128_us", "fused_128_us", "separate_256_us", "fused_256_us",
                       "gain_128", "gain_256", "maxdiff_256"]))
    print(summary)
    write_json(args.json, dict(env=env_info(), rows=rows, summary=summary))


if __name__ == "__main__":
    main()
