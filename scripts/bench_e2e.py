"""End-to-end greedy decoding speed of a Llama-3-8B-shaped model (random weights), W4A8KV4 vs BF16 (H100).

    python scripts/bench_e2e.py --json benchmarks/results/e2e-h100.json [--layers 32]

Both sides decode with every step one CUDA-graph replay (fireq.nn.graphs.GraphDecoder):
- bf16: the transformers model in BF16 with SDPA attention over transformers' StaticCache;
- fireq: the same model with every decoder linear swapped for a QuantLinear (INT4 g128 RTN weights, FP8
  activations; gate/up fused with SiLU-and-mul by QuantGatedMLP), the one-kernel RMSNorm (FastRMSNorm, which
  also quantizes its output for the linears it feeds), the
  one-launch rotary embedding (fireq.nn.rope.patch_rotary: the BF16 side runs first, unpatched) and
  the INT4 KV cache (the default recipe's format: asymmetric, per token per head), q/k/v as one GEMM
  (fireq.nn.qkv): what fireq.load builds. --no-qkv-fusion leaves q/k/v as three GEMMs.
Per batch size: a random prompt is prefilled, then decode steps are timed with CUDA events (median of
per-token times over the steps). Eager decode (no graph) is timed too. The first generated tokens of the
graph and the eager path are compared (same kernels: identical). Weights are random: speed does not
depend on the values; accuracy is measured on real models elsewhere (benchmarks/results/*ppl*).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import env_info, table, write_json  # noqa: E402


def time_steps(step, n: int) -> float:
    """Median ms of one call of `step` over n calls (CUDA events around each)."""
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def llama3_8b(layers: int, max_positions: int = 8192):
    """A Llama-3-8B-shaped model (random weights) in BF16 on the GPU, SDPA attention."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=max_positions,
                      rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()


def static_cache(config, max_len: int, batch: int):
    """transformers' StaticCache for the BF16 baseline (max_batch_size where this transformers takes it)."""
    from transformers import StaticCache

    kw = dict(config=config, max_cache_len=max_len)
    if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:
        kw["max_batch_size"] = batch
    return StaticCache(**kw)


def to_fireq(model, group: int = 128, no_qkv: bool = False) -> None:
    """Swap the decoder linears for QuantLinears (RTN INT4 weights) and turn on the INT4-KV attention."""
    from fireq.formats.int4 import quantize_int4
    from fireq.formats.kv import KVSpec
    from fireq.models.registry import decoder_layers, layer_linears
    from fireq.nn import attention
    from fireq.nn.linear import QuantLinear
    from fireq.nn.mlp import fuse_gated_mlps
    from fireq.nn.qkv import fuse_qkv
    from fireq.nn.norm import mark_fp8_norms, swap_rms_norms
    from fireq.nn.rope import patch_rotary
    from fireq.pipeline import set_attention_impl

    for layer in decoder_layers(model):
        for name, lin in layer_linears(layer).items():
            qw = quantize_int4(lin.weight.detach().float(), group)
            q = QuantLinear.from_quantized(qw, lin.bias, dtype=torch.bfloat16)
            parent = layer.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], q)
            del lin
        attention.attach(layer.self_attn, attention.AttentionQuant(KVSpec(symmetric=False), True))
    fuse_gated_mlps(model)
    if not no_qkv:
        fuse_qkv(model)
    swap_rms_norms(model)
    mark_fp8_norms(model)
    patch_rotary(model)
    set_attention_impl(model)
    torch.cuda.empty_cache()


def run_each_batch(args) -> None:
    """One process a batch size (each builds the model afresh: nothing of one measurement's memory stays
    for the next), rows merged into one JSON."""
    import json
    import subprocess
    import tempfile

    rows, meta = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for b in args.batches.split(","):
            part = os.path.join(tmp, f"b{b}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--json", part, "--layers", str(args.layers),
                   "--batches", b, "--prompt", str(args.prompt), "--steps", str(args.steps), "--one"]
            cmd += ["--no-qkv-fusion"] if args.no_qkv_fusion else []
            r = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
            if r.returncode:  # e.g. out of memory: recorded, the other batch sizes still run
                err = (r.stderr.strip().splitlines() or ["?"])[-1][:300]
                print(f"B={b} failed: {err}", flush=True)
                rows.append(dict(B=int(b), error=err))
                continue
            meta = json.loads(open(part).read())
            rows += meta["rows"]
    if meta is None:
        raise SystemExit("every batch size failed")
    meta["rows"] = rows
    print(table(rows, ["B", "bf16_ms", "fireq_ms", "speedup", "bf16_tok_s", "fireq_tok_s", "bf16_eager_ms",
                       "fireq_eager_ms", "fireq_graph_equals_eager"]))
    write_json(args.json, meta)


def main() -> None:
    from fireq.nn.graphs import GraphDecoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--one", action="store_true", help="(internal) this process measures one batch size")
    ap.add_argument("--no-qkv-fusion", action="store_true")
    args = ap.parse_args()
    if not args.one and "," in args.batches:
        return run_each_batch(args)
    env = env_info()
    import transformers

    env["transformers"] = transformers.__version__
    dev = "cuda"
    torch.manual_seed(0)
    model = llama3_8b(args.layers)
    cfg = model.config
    print(f"bf16 model: {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    max_len = args.prompt + args.steps + 8
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt), device=dev) for b in batches}
    res: dict = {}

    def run(tag, make_cache):
        for b in batches:
            dec = GraphDecoder(model, b, max_len, cache=make_cache(b))
            t0 = time.time()
            dec.prefill(prompts[b])
            torch.cuda.synchronize()
            prefill_ms = (time.time() - t0) * 1e3
            first = [dec.step() for _ in range(4)]  # eager, capture, replays
            graph_ms = time_steps(dec.step, args.steps)
            # eager steps on a fresh prefill: the same tokens as the graph's
            dec.prefill(prompts[b])
            eager_tokens = []
            for _ in range(4):
                dec._step()
                eager_tokens.append(dec.ids.clone())
            same = all(torch.equal(a, e) for a, e in zip(first, eager_tokens))
            eager_ms = time_steps(dec._step, 8)
            res[(tag, b)] = dict(graph_ms=graph_ms, eager_ms=eager_ms, prefill_ms=prefill_ms, graph_equals_eager=same)
            print(tag, b, res[(tag, b)], f"memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
            dec.graph = dec.cache = None
            del dec
            gc.collect()
            torch.cuda.empty_cache()

    # ---- BF16 baseline: transformers' StaticCache
    run("bf16", lambda b: static_cache(cfg, max_len, b))
    # ---- fireq: the same model quantized in place
    gc.collect()
    torch.cuda.empty_cache()
    to_fireq(model, no_qkv=args.no_qkv_fusion)
    print(f"quantized: {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    from fireq.nn.attention import make_cache

    run("fireq", lambda b: make_cache(model, max_len))
    rows = []
    for b in batches:
        bf, fq = res[("bf16", b)], res[("fireq", b)]
        rows.append(dict(B=b, bf16_ms=bf["graph_ms"], fireq_ms=fq["graph_ms"], speedup=bf["graph_ms"] / fq["graph_ms"],
                         bf16_tok_s=b * 1e3 / bf["graph_ms"], fireq_tok_s=b * 1e3 / fq["graph_ms"],
                         bf16_eager_ms=bf["eager_ms"], fireq_eager_ms=fq["eager_ms"],
                         fireq_graph_equals_eager=fq["graph_equals_eager"],
                         bf16_graph_equals_eager=bf["graph_equals_eager"]))
    print(table(rows, ["B", "bf16_ms", "fireq_ms", "speedup", "bf16_tok_s", "fireq_tok_s", "bf16_eager_ms",
                       "fireq_eager_ms", "fireq_graph_equals_eager"]))
    write_json(args.json, dict(env=env, model="Llama-3-8B shape, random weights", layers=args.layers,
                               prompt=args.prompt, steps=args.steps, qkv_fusion=not args.no_qkv_fusion, rows=rows))


if __name__ == "__main__":
    main()
