"""Sweep of the INT4 -> FP8 conversion kernel's tile shapes (kernels/w4_fp8.py) on Llama-3-8B weight
shapes, with a device copy of the same bytes as the bandwidth roof, in one run.

    python scripts/diag_convert.py --json OUT.json

The copy moves the same bytes (3 N K / 4 read, as many written). Every variant is checked bit for bit against the twin before it is timed; inputs rotated past 2x L2;
CUDA-graph timing (do_bench medians). Bytes moved: N K / 2 codes in, N K FP8 out, the (N, G) ratios.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, env_info, int4_weight_copies, table, write_json  # noqa: E402

SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    from fireq_kernels.gemm_w4a8 import repack_half
    from fireq_kernels.reference import int4_to_fp8_ref
    from fireq_kernels.w4_fp8 import convert_config, int4_to_fp8_triton

    env = env_info()
    l2 = env.get("l2_bytes")
    torch.manual_seed(0)
    variants = [dict(BN=bn, C=c, num_warps=w) for bn, c, w in itertools.product((8, 16, 32, 64), (128, 256, 512),
                                                                                (2, 4, 8))
                if bn * c // 2 <= 16384]
    rows = []
    for n, k in SHAPES:
        qws = int4_weight_copies(n, k, l2)
        half = [repack_half(q, k, 128) for q, _, _ in qws]
        q0, s0, e0 = qws[0]
        w8r, rsr = int4_to_fp8_ref(q0, s0, e0, k, 128)
        nbytes = n * k // 2 + n * k + s0.numel() * 4
        src = [torch.empty(n * k * 3 // 4, dtype=torch.uint8, device="cuda") for _ in range(len(qws))]
        dst = [torch.empty_like(t) for t in src]
        t_copy = bench_graph([lambda i=i: dst[i].copy_(src[i]) for i in range(len(src))])
        rows.append(dict(N=n, K=k, variant="device_copy_same_bytes", us=t_copy * 1e3, tbps=2 * src[0].numel() / t_copy / 1e9))
        del src, dst
        print(rows[-1], flush=True)
        default = convert_config(k, 128, 128)
        for v in variants:
            try:
                w8, rs = int4_to_fp8_triton(half[0], s0, e0, k, 128, 128, config=v)
            except Exception as ex:  # a shape the kernel cannot take
                print("skip", v, repr(ex)[:120])
                continue
            ok = torch.equal(w8.view(torch.uint8), w8r.view(torch.uint8)) and torch.equal(rs, rsr)
            t = bench_graph([lambda i=i: int4_to_fp8_triton(half[i], qws[i][1], qws[i][2], k, 128, 128, config=v)
                             for i in range(len(qws))])
            rows.append(dict(N=n, K=k, variant=f"BN{v['BN']}_C{v['C']}_w{v['num_warps']}", exact=ok, us=t * 1e3,
                             tbps=nbytes / t / 1e9, default=v == default))
            print(rows[-1], flush=True)
        del qws, half
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if r.get("exact"):
            key = (r["N"], r["K"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    print(table(rows, ["N", "K", "variant", "exact", "us", "tbps", "default"]))
    print("best:", {f"{a}x{b}": (r["variant"], round(r["tbps"], 2)) for (a, b), r in best.items()})
    write_json(args.json, dict(env=env, timing="cuda_graph", group_size=128, layout_block=128, rows=rows,
                               best={f"{a}x{b}": r["variant"] for (a, b), r in best.items()}))


if __name__ == "__main__":
    main()
