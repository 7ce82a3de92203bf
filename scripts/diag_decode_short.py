"""Decode attention over short caches (the lengths of a chat turn, 512-8192 keys): the wrapper's own choice of
key tile, warps and splits against a sweep of them, with SDPA in the same run.

Why: a decode step of the Llama-3-8B-shaped model at a 1K-token cache spends 14 us a layer in the attention
kernel (scripts/profile_decode.py, decode-profile-b1-h200.json) for 1 MB of cache: below 8K keys x 1 sequence
the wrapper takes 256-key 4-warp programs and at least two tiles a split, i.e. 16 programs at 1K x 1.

    python scripts/diag_decode_short.py --check        # CPU (interpreter) or GPU: every config against float64
    python scripts/diag_decode_short.py --json FILE    # GPU: timings

32 query / 8 KV heads, d = 128, one query token, symmetric and asymmetric per-token caches with FP8 scales;
CUDA-graph timing, caches rotated past L2 (up to 160 sets: a 1K-token cache is 1 MB).
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LS = (512, 1024, 2048, 4096, 8192)
BS = (1, 8)
TILES = ((64, 1), (128, 2), (128, 4), (256, 4))  # (block_n, num_warps)


def _operands(dev, b, lk, sym, seed=0):
    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import KVSpec, quantize_kv

    g = torch.Generator().manual_seed(seed)
    spec = KVSpec(symmetric=sym)
    q = torch.randn(b, 32, 1, 128, generator=g).to(dev)
    k = torch.randn(b, 8, lk, 128, generator=g).to(dev)
    v = torch.randn(b, 8, lk, 128, generator=g).to(dev)
    q8, qs = quantize_fp8_rows(q)
    return q, k, v, q8, qs.squeeze(-1).contiguous(), quantize_kv(k, spec), quantize_kv(v, spec), spec


def configs(b, lk):
    """(block_n, num_warps, splits) with at least one key tile a split and at most 2048 programs."""
    out = []
    for bn, w in TILES:
        sp = 1
        while sp <= 64 and sp * bn <= max(lk, bn) and b * 8 * sp <= 2048:
            out.append((bn, w, sp))
            sp *= 2
    return out


def _call(q8, qs, qk, qv, cfg, out_dtype):
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    kw = {} if cfg is None else dict(block_n=cfg[0], num_warps=cfg[1], splits=cfg[2])
    return kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, 1 / math.sqrt(128), True,
                                k_zero=qk.zeros, v_zero=qv.zeros, out_dtype=out_dtype, **kw)


def _reference(q8, qs, qk, qv, spec):
    from fireq.formats.kv import dequantize_kv

    qd = q8.double() * qs[..., None].double()
    kd = dequantize_kv(qk, 128, spec, torch.float64).repeat_interleave(4, dim=1)
    vd = dequantize_kv(qv, 128, spec, torch.float64).repeat_interleave(4, dim=1)
    return torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(128), -1) @ vd


def check(dev):
    small = dev == "cpu"
    for b, lk, sym in ((1, 200, True), (2, 320, False)) if small else ((1, 1024, False), (8, 2048, True)):
        q, k, v, q8, qs, qk, qv, spec = _operands(dev, b, lk, sym)
        ref = _reference(q8, qs, qk, qv, spec)
        cfgs = [None] + [c for c in configs(b, lk) if not small or c[2] in (1, 2, 4)]
        for cfg in cfgs:
            got = _call(q8, qs, qk, qv, cfg, torch.float32).double()
            err = ((got - ref).norm() / ref.norm()).item()
            assert err < 5e-3, (cfg, err)
        print(f"B={b} L={lk} {'sym' if sym else 'asym'}: {len(cfgs)} configs within 5e-3 of float64")


def bench(path, ls=LS, bs=BS, syms=(False, True)):
    import torch.nn.functional as F

    from _bench_util import bench_graph, copies_for, env_info, finish, geomean

    env = env_info()
    rows = []
    for sym in syms:
        for lk in ls:
            for b in bs:
                # past L2 even for the shortest caches: in a model's decode step every layer's weights flush L2
                # between two attention calls
                sets = copies_for(b * 8 * lk * 66 * 2, env.get("l2_bytes"), min_sets=2, max_sets=160)
                ops = [_operands("cuda", b, lk, sym, seed) for seed in range(sets)]
                timed = {}
                for cfg in [None] + configs(b, lk):
                    fns = [lambda o=o, cfg=cfg: _call(o[3], o[4], o[5], o[6], cfg, torch.bfloat16) for o in ops]
                    try:
                        timed[cfg] = bench_graph(fns, warmup=5, rep=30) * 1e3
                    except Exception as e:  # noqa: BLE001 (a config the kernel refuses: reported, skipped)
                        print("config failed", cfg, type(e).__name__, str(e)[:100], flush=True)
                q, k, v = (t.to(torch.bfloat16) for t in ops[0][:3])
                t_sdpa = bench_graph([lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)]) * 1e3
                best = min((c for c in timed if c is not None), key=lambda c: timed[c])
                rows.append(dict(sym=sym, L=lk, B=b, sdpa_us=t_sdpa, default_us=timed[None], best_us=timed[best],
                                 best_cfg=list(best), gain=timed[None] / timed[best],
                                 default_vs_sdpa=t_sdpa / timed[None], best_vs_sdpa=t_sdpa / timed[best],
                                 sweep=[dict(cfg=list(c), us=t) for c, t in timed.items() if c is not None]))
                print({kk: v for kk, v in rows[-1].items() if kk != "sweep"}, flush=True)
                del ops
                torch.cuda.empty_cache()
    summary = {"gain": geomean([r["gain"] for r in rows]),
               "default_vs_sdpa": geomean([r["default_vs_sdpa"] for r in rows]),
               "best_vs_sdpa": geomean([r["best_vs_sdpa"] for r in rows])}
    finish(path, env, rows, summary, ["sym", "L", "B", "sdpa_us", "default_us", "best_us", "best_cfg", "gain",
                                      "best_vs_sdpa"])


def main():
    from _bench_util import check_then_bench, diag_parser

    ap = diag_parser()
    ap.add_argument("--ls", default=",".join(map(str, LS)))
    ap.add_argument("--bs", default=",".join(map(str, BS)))
    ap.add_argument("--asym-only", action="store_true")
    args = ap.parse_args()
    ints = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731
    check_then_bench(args, check, lambda path: bench(path, ints(args.ls), ints(args.bs),
                                                     (False,) if args.asym_only else (False, True)))


if __name__ == "__main__":
    main()
