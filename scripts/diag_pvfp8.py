"""The FP8 P.V option of the attention kernel against the FP16 default, same run (H100): prefill and decode
timings at the benchmark's shapes for a few tile configs.

    python scripts/diag_pvfp8.py --json benchmarks/results/attn-pvfp8-diag-h100.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, env_info, table, write_json  # noqa: E402


def main():
    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import KVSpec, quantize_kv
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    rows = []
    spec = KVSpec()
    for kind, b, hq, hkv, lq, lk, cfgs in (
            ("prefill", 1, 32, 32, 8192, 8192, ((64, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3))),
            ("decode", 8, 32, 8, 1, 32768, ((16, 256, 4, 3), (16, 128, 4, 3)))):
        q8, qs = quantize_fp8_rows(torch.randn(b, hq, lq, 128, device="cuda"))
        qk = quantize_kv(torch.randn(b, hkv, lk, 128, device="cuda"), spec)
        qv = quantize_kv(torch.randn(b, hkv, lk, 128, device="cuda"), spec)
        qs = qs.squeeze(-1)
        for bm, bn, w, st in cfgs:
            row = dict(kind=kind, cfg=[bm, bn, w, st])
            outs = {}
            for pv in (False, True):
                f = lambda pv=pv: kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales,  # noqa
                                                       1 / math.sqrt(128), True, block_m=bm, block_n=bn,
                                                       num_warps=w, num_stages=st, pv_fp8=pv,
                                                       splits=1 if kind == "prefill" else None)
                try:
                    outs[pv] = f().float()
                    row["fp8_ms" if pv else "fp16_ms"] = bench_graph([f], warmup=5, rep=30)
                except Exception as e:  # a config that does not compile: recorded, not fatal
                    row["fp8_ms" if pv else "fp16_ms"] = None
                    row["error" + ("_fp8" if pv else "")] = f"{type(e).__name__}: {str(e)[-200:]}"
            if row.get("fp8_ms") and row.get("fp16_ms"):
                row["fp8_speedup"] = row["fp16_ms"] / row["fp8_ms"]
                row["rel_diff"] = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
            rows.append(row)
            print(row, flush=True)
    print(table(rows, ["kind", "cfg", "fp16_ms", "fp8_ms", "fp8_speedup", "rel_diff"]))
    write_json(args.json, dict(env=env_info(), rows=rows))


if __name__ == "__main__":
    main()
