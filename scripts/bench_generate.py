"""`model.generate()` as a user calls it: wall-clock seconds of greedy generation, fireq vs BF16 (H200).

    python scripts/bench_generate.py --json benchmarks/results/generate-h200.json [--layers 32]

A Llama-3-8B-shaped model (random weights) on the GPU, a random prompt, `generate(x, max_new_tokens=N,
do_sample=False)`:
- bf16: transformers' generate() on the BF16 model (its default growing cache, eager steps);
- fireq eager: the same model quantized as bench_e2e.py does, through transformers' generate() over the INT4
  cache (fireq.nn.generate switched off);
- fireq: the same call as fireq runs it by default, CUDA-graph replays (fireq.nn.generate): the first call of
  a shape captures its graphs (timed apart, `fireq_first_s`), later calls replay them.
Medians of --reps calls (time.perf_counter around the call, the GPU synchronized), all in one run; the tokens
of fireq's two paths are compared (greedy: the first new token must agree, the rest may differ at near ties;
--sample: sampling calls, whose tokens are draws and are not compared).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import env_info, table, write_json  # noqa: E402
from bench_e2e import llama3_8b, to_fireq  # noqa: E402


def wall(fn, reps: int) -> tuple[float, torch.Tensor]:
    """Median seconds of fn() over reps calls, and its last result."""
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sample", action="store_true",
                    help="sampling calls (do_sample=True, temperature 0.6, top_p 0.9: Llama-3-Instruct's defaults)")
    args = ap.parse_args()
    import transformers

    from fireq.checkpoint.load import _use_int4_cache_in_generate
    from fireq.nn import generate as graphed

    env = env_info()
    env["transformers"] = transformers.__version__
    torch.manual_seed(0)
    model = llama3_8b(args.layers, max_positions=args.prompt + args.new + 64)
    batches = [int(b) for b in args.batches.split(",")]
    prompts = {b: torch.randint(0, model.config.vocab_size, (b, args.prompt), device="cuda") for b in batches}
    kw = dict(max_new_tokens=args.new, do_sample=False, pad_token_id=0)
    if args.sample:
        kw.update(do_sample=True, temperature=0.6, top_p=0.9)
    res: dict = {}
    for b in batches:
        model.generate(prompts[b], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        res[b] = dict(bf16_s=wall(lambda: model.generate(prompts[b], **kw), args.reps)[0])
        print("bf16", b, res[b], flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    to_fireq(model)
    _use_int4_cache_in_generate(model)  # what fireq.load and transformers' loading of a checkpoint do
    rows = []
    for b in batches:
        graphed.set_graphed_generate(model, False)
        model.generate(prompts[b], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up (compiles)
        eager_s, eager = wall(lambda: model.generate(prompts[b], **kw), args.reps)
        graphed.set_graphed_generate(model, True)
        first_s, _ = wall(lambda: model.generate(prompts[b], **kw), 1)
        fireq_s, out = wall(lambda: model.generate(prompts[b], **kw), args.reps)
        assert graphed._state(model)["decoders"], "the call did not run graphed"
        n = args.prompt
        r = dict(B=b, prompt=n, new=args.new, bf16_s=res[b]["bf16_s"], fireq_eager_s=eager_s, fireq_first_s=first_s,
                 fireq_s=fireq_s, vs_bf16=res[b]["bf16_s"] / fireq_s, vs_fireq_eager=eager_s / fireq_s,
                 fireq_tok_s=b * args.new / fireq_s, bf16_tok_s=b * args.new / res[b]["bf16_s"],
                 first_token_agrees=None if args.sample else bool(torch.equal(out[:, n], eager[:, n])),
                 tokens_agree=None if args.sample else float((out[:, n:] == eager[:, n:]).float().mean()))
        rows.append(r)
        print(r, flush=True)
        graphed.set_graphed_generate(model, False)  # drop this batch's decoders
        gc.collect()
        torch.cuda.empty_cache()
    print(table(rows, ["B", "bf16_s", "fireq_eager_s", "fireq_first_s", "fireq_s", "vs_bf16", "vs_fireq_eager",
                       "fireq_tok_s", "first_token_agrees", "tokens_agree"]))
    write_json(args.json, dict(env=env, model="Llama-3-8B shape, random weights", layers=args.layers,
                               call={k: v for k, v in kw.items() if k != "pad_token_id"}, rows=rows))


if __name__ == "__main__":
    main()
