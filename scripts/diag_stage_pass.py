"""The staged prefill's staging pass alone (GPU): stage_kv_triton over tile heights and warps, its bytes
moved and bandwidth, next to a device copy of the same bytes and the attention call it belongs to.

    python scripts/diag_stage_pass.py --json benchmarks/results/attn-stage-pass-diag-h200.json

B = 1, 32 KV heads, d = 128, symmetric INT4 cache with FP8 scales (V staged times its scales, the key
scales' fp32 copy written too, as the default staged prefill on sm_90+ does). CUDA-graph do_bench medians.
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
    from fireq_kernels.attention_kv4 import kv4_attention_triton, stage_kv_triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    env = env_info()
    rows = []
    for S in (4096, 8192, 16384):
        k = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16)
        qk, qv = quantize_kv(k, KVSpec()), quantize_kv(torch.randn_like(k), KVSpec())
        q8, qs = quantize_fp8_rows(torch.randn_like(k))
        qs = qs.squeeze(-1).contiguous()
        # reads: K and V codes (64 B a token a head) and two scales; writes: K FP8 (128 B), V fp16 (256 B),
        # the key scales in fp32 (4 B)
        nbytes = 32 * S * (2 * 64 + 2 + 128 + 256 + 4)
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t_copy = bench_graph([lambda: dst.copy_(src)])  # reads and writes nbytes / 2 each
        t_attn = bench_graph([lambda: kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales,
                                                           1 / math.sqrt(128), True)])
        for bt in (32, 64, 128):
            for w in (2, 4, 8):
                f = lambda bt=bt, w=w: stage_kv_triton(qk.packed, qv.packed, qv.scales, k_scale=qk.scales,  # noqa
                                                       block_t=bt, num_warps=w)
                t = bench_graph([f])
                rows.append(dict(S=S, block_t=bt, warps=w, ms=t, tbps=nbytes / t / 1e9, copy_ms=t_copy,
                                 copy_tbps=nbytes / t_copy / 1e9, attn_ms=t_attn, share_of_attn=t / t_attn))
                print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    print(table(rows, ["S", "block_t", "warps", "ms", "tbps", "copy_tbps", "attn_ms", "share_of_attn"]))
    write_json(args.json, dict(env=env, rows=rows))


if __name__ == "__main__":
    main()
