"""Decode attention over the INT4 cache: a sweep of program shapes (warps, key tile, stages, splits) around
the default, and Q.K^T as an fp16 MMA (DECODE_QK_F16) instead of FP8, with SDPA in the same run.

    python scripts/diag_decode_attn.py --json OUT.json [--asym] [--quick]

Points: bench_attention.py's decode grid (32 query / 8 KV heads, d = 128, L in {8K, 32K, 128K}, B in {1, 8}).
CUDA-graph timing, caches rotated past L2. Each point first checks the default against the others' output.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, decode_attention_operands, env_info, geomean, table, write_json  # noqa: E402

# (block_m, block_n, num_warps, num_stages); the first is the wrapper's default for decode
CFGS = ((16, 256, 4, 3), (16, 128, 4, 3), (16, 256, 8, 3), (16, 128, 2, 3), (16, 128, 2, 2), (16, 64, 2, 3),
        (16, 64, 2, 4), (16, 64, 1, 3), (16, 64, 1, 4), (16, 32, 1, 4), (16, 128, 1, 2))
SPLITS = (None, 32, 64, 128)


def main():
    import torch.nn.functional as F

    import fireq_kernels.attention_kv4 as ak
    from fireq.formats.kv import KVSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--asym", action="store_true", help="also the asymmetric cache (zero points)")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    env = env_info()
    torch.manual_seed(0)
    rows = []
    points = [(8192, 1)] if a.quick else [(L, B) for L in (8192, 32768, 131072) for B in (1, 8)]
    for sym in ((True, False) if a.asym else (True,)):
        spec = KVSpec(symmetric=sym)
        for L, B in points:
            q, k, v, q8, qs, caches = decode_attention_operands(L, B, spec, env.get("l2_bytes"))
            t_sdpa = bench_graph([lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)], warmup=5, rep=20)
            kv_bytes = 2 * B * 8 * L * (64 + 1 + (0 if sym else 1))

            def call(c, sp, cfg, kc=caches[0]):
                bm, bn, w, st = cfg
                return ak.kv4_attention_triton(q8, qs, kc[0].packed, kc[0].scales, kc[1].packed, kc[1].scales,
                                               1 / math.sqrt(128), True, k_zero=kc[0].zeros, v_zero=kc[1].zeros,
                                               splits=sp, block_m=bm, block_n=bn, num_warps=w, num_stages=st)

            ref = call(None, None, CFGS[0]).float()
            point = []
            for f16 in (False, True):
                ak.DECODE_QK_F16 = f16
                for cfg in CFGS:
                    for sp in SPLITS:
                        if sp is not None and L < 2 * sp * cfg[1]:
                            continue
                        try:
                            err = (call(None, sp, cfg).float() - ref).abs().max().item()
                            fns = [lambda kc=kc, sp=sp, cfg=cfg: call(None, sp, cfg, kc) for kc in caches]
                            t = bench_graph(fns, warmup=5, rep=20)
                        except Exception as ex:  # a config that does not fit (shared memory, registers)
                            print("failed", L, B, cfg, sp, f16, type(ex).__name__, str(ex)[:120], flush=True)
                            continue
                        point.append(dict(sym=sym, L=L, B=B, qk_f16=f16, cfg=list(cfg), splits=sp, us=t * 1e3,
                                          sdpa_us=t_sdpa * 1e3, vs_sdpa=t_sdpa / t, tbps=kv_bytes / t / 1e9,
                                          maxdiff_vs_default=err))
                        print(point[-1], flush=True)
            ak.DECODE_QK_F16 = False
            base = next(r for r in point if r["cfg"] == list(CFGS[0]) and r["splits"] is None and not r["qk_f16"])
            best = max(point, key=lambda r: r["vs_sdpa"])
            for r in point:
                r["gain_vs_default"] = base["us"] / r["us"]
            rows += point
            print("default", base["us"], "best", best["us"], best["cfg"], best["splits"], best["qk_f16"], flush=True)
            del q, k, v, caches
            torch.cuda.empty_cache()
    summary = {}
    for sym in {r["sym"] for r in rows}:
        sel = [r for r in rows if r["sym"] == sym]
        pts = sorted({(r["L"], r["B"]) for r in sel})
        tag = "" if sym else "_asym"
        summary["default_vs_sdpa" + tag] = geomean(
            [next(r["vs_sdpa"] for r in sel if (r["L"], r["B"]) == p and r["cfg"] == list(CFGS[0])
                  and r["splits"] is None and not r["qk_f16"]) for p in pts])
        summary["best_per_point_vs_sdpa" + tag] = geomean(
            [max(r["vs_sdpa"] for r in sel if (r["L"], r["B"]) == p) for p in pts])
        for f16 in (False, True):
            keys = {(tuple(r["cfg"]), r["splits"]) for r in sel if r["qk_f16"] == f16}
            per = {}
            for key in keys:
                vals = [r["vs_sdpa"] for r in sel if (tuple(r["cfg"]), r["splits"]) == key and r["qk_f16"] == f16]
                if len(vals) == len(pts):
                    per[str(key)] = geomean(vals)
            if per:
                kbest = max(per, key=per.get)
                summary[f"best_single_cfg{'_qkf16' if f16 else ''}{tag}"] = [kbest, per[kbest]]
    print(table(rows, ["sym", "L", "B", "qk_f16", "cfg", "splits", "us", "sdpa_us", "vs_sdpa", "tbps",
                       "gain_vs_default", "maxdiff_vs_default"]))
    print(summary)
    write_json(a.json, dict(env=env, rows=rows, summary=summary))


if __name__ == "__main__":
    main()
