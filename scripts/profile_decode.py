"""Where a decode step's GPU time goes: the kernels of one CUDA-graph decode step of the Llama-3-8B-shaped
model (random weights), fireq W4A8KV4 and the BF16 baseline, from the PyTorch profiler.

    python scripts/profile_decode.py --json FILE [--layers 4] [--batch 1] [--prompt 1024]

For each side: the graph step's wall time (CUDA events), the summed kernel time of a step, and a table of
kernels (calls a step, microseconds a step), largest first, so the per-layer cost of the pieces around the
GEMMs and the attention (norms, rotary embedding, cache writes, quantization, residual adds) is visible.
bench_e2e.py gives the speeds; this gives their breakdown.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import cuda_kernel_tally, env_info, table, write_json  # noqa: E402
from bench_e2e import llama3_8b, static_cache, time_steps, to_fireq  # noqa: E402


def kernel_table(step, reps: int) -> tuple[list[dict], float]:
    """Kernels of `reps` calls of step under the profiler -> rows (name, calls and us a step), total us a step."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = [dict(kernel=k, calls=c / reps, us=t / reps) for k, (c, t) in cuda_kernel_tally(prof).items()]
    rows.sort(key=lambda r: -r["us"])
    return rows, sum(r["us"] for r in rows)


def main() -> None:
    from fireq.nn.attention import make_cache
    from fireq.nn.graphs import GraphDecoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = llama3_8b(args.layers)
    cfg = model.config
    max_len = args.prompt + 64
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), device="cuda")
    out = {}
    for tag in ("bf16", "fireq"):
        if tag == "fireq":
            to_fireq(model)
        cache = static_cache(cfg, max_len, args.batch) if tag == "bf16" else make_cache(model, max_len)
        dec = GraphDecoder(model, args.batch, max_len, cache=cache)
        dec.prefill(prompt)
        for _ in range(4):
            dec.step()
        step_ms = time_steps(dec.step, 32)
        rows, total = kernel_table(dec.step, args.reps)
        out[tag] = dict(step_ms=step_ms, kernel_us=total, kernels=rows)
        print(f"{tag}: step {step_ms * 1e3:.1f} us (graph), kernels {total:.1f} us, {sum(r['calls'] for r in rows):.0f} "
              f"kernels a step ({args.layers} layers)")
        print(table(rows[:40], ["kernel", "calls", "us"]), flush=True)
        dec.graph = dec.cache = None
        del dec, cache
        gc.collect()
        torch.cuda.empty_cache()
    write_json(args.json, dict(env=env_info(), model="Llama-3-8B shape, random weights", layers=args.layers,
                               batch=args.batch, prompt=args.prompt, **out))


if __name__ == "__main__":
    main()
