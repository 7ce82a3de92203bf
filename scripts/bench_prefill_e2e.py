"""Prefill (time to first token) of a Llama-3-8B-shaped model (random weights): BF16 vs fireq with the INT4
GEMM vs fireq with the opt-in FP8 prefill path (fireq.nn.linear.set_prefill_fp8), in one run.

    python scripts/bench_prefill_e2e.py --json OUT.json [--layers 32] [--prompts 1024,4096,8192]

- bf16: the transformers model in BF16, SDPA attention, transformers' StaticCache;
- fireq_int4: the same model quantized in place as scripts/bench_e2e.py does (what fireq.load builds: INT4
  g128 weights, FP8 activations, fused gate/up, INT4 KV cache), every linear on the INT4 GEMM; prompts of up
  to 2048 tokens as GraphDecoder runs them by default (padded to a power of two, one CUDA-graph replay);
- fireq_int4_eager: the same, every prefill eager (GraphDecoder(prefill_graphs=0)), as before graphed
  prefills existed: the host's Python and launches are in it;
- fireq_fp8path: the same quantized model after set_prefill_fp8(model) (linears of >= 1024 tokens on the
  FP8 path; the weights are converted to FP8 on every call, nothing extra is kept).
Each point: GraphDecoder.prefill of a random prompt (B = 1) into a reset cache, timed with CUDA events,
median of --reps after two warm-up calls (the first captures a graphed length). The BF16 side is
transformers' own eager prefill (its StaticCache is not graphed by GraphDecoder). Random weights: speed does
not depend on the values.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import env_info, table, write_json  # noqa: E402
from bench_e2e import llama3_8b, static_cache, to_fireq  # noqa: E402


def time_prefill(dec, ids, reps: int) -> float:
    for _ in range(2):
        dec.prefill(ids)
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.prefill(ids)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main() -> None:
    from fireq.nn.attention import make_cache
    from fireq.nn.graphs import GraphDecoder
    from fireq.nn.linear import set_prefill_fp8

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompts", default="512,1024,2048,4096,8192")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    env = env_info()
    import transformers

    env["transformers"] = transformers.__version__
    torch.manual_seed(0)
    model = llama3_8b(args.layers, max_positions=16384)
    cfg = model.config
    prompts = [int(p) for p in args.prompts.split(",")]
    max_len = max(prompts) + 8
    ids = {p: torch.randint(0, cfg.vocab_size, (1, p), device="cuda") for p in prompts}
    res = {}

    graphed = {}

    def run(tag, make_cache, **kw):
        dec = GraphDecoder(model, 1, max_len, cache=make_cache(), **kw)
        graphed[tag] = {p: dec.prefill_length(p) is not None for p in prompts}
        for p in prompts:
            res[(tag, p)] = time_prefill(dec, ids[p], args.reps)
            print(tag, p, f"{res[(tag, p)]:.2f} ms", flush=True)
        dec.cache = None
        del dec
        gc.collect()
        torch.cuda.empty_cache()

    with torch.no_grad():
        run("bf16", lambda: static_cache(cfg, max_len, 1))
        to_fireq(model)
        run("fireq_int4_eager", lambda: make_cache(model, max_len), prefill_graphs=0)
        run("fireq_int4", lambda: make_cache(model, max_len))
        n = set_prefill_fp8(model)
        print(f"FP8 prefill path on for {n} linears", flush=True)
        run("fireq_fp8path", lambda: make_cache(model, max_len))
    rows = []
    for p in prompts:
        bf, i4, f8 = res[("bf16", p)], res[("fireq_int4", p)], res[("fireq_fp8path", p)]
        e4 = res[("fireq_int4_eager", p)]
        rows.append(dict(prompt=p, graphed=graphed["fireq_int4"][p], bf16_ms=bf, fireq_int4_eager_ms=e4,
                         fireq_int4_ms=i4, fireq_fp8path_ms=f8, int4_vs_bf16=bf / i4, int4_eager_vs_bf16=bf / e4,
                         graphed_vs_eager=e4 / i4, fp8path_vs_bf16=bf / f8, fp8path_vs_int4=i4 / f8))
    print(table(rows, list(rows[0])))
    write_json(args.json, dict(env=env, model="Llama-3-8B shape, random weights", layers=args.layers, batch=1,
                               timing="CUDA events, median; fireq prompts <= 2048 graphed (column graphed), BF16 eager",
                               rows=rows))


if __name__ == "__main__":
    main()
