"""Does a padded prompt change what the model computes for the prompt? GraphDecoder's graphed prefill runs
the prompt padded to a power of two; this compares, per prompt length n, the eager prefill of the n tokens
with the eager prefill of the padded prompt (logits of position n - 1, the first n tokens' cache codes) and
with GraphDecoder's graphed prefill (first token and the greedy continuation).

    python scripts/diag_graph_prefill.py [--layers 2] [--tiny] [--lengths 37,100,200]

--tiny: a small Llama (hidden 256, head_dim 64) instead of the Llama-3-8B shape. Random weights.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import llama3_8b, to_fireq  # noqa: E402


def tiny_llama(layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, num_hidden_layers=layers, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.08) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return m


def logits(model, ids, n, cache, pos_len=None):
    """Logits of position n - 1 (float32) of ids run into cache (reset first)."""
    cache.reset()
    p = ids.shape[1]
    keep = 1 if p == n else torch.tensor([n - 1], device=ids.device)
    return model(ids, position_ids=torch.arange(p, device=ids.device)[None], past_key_values=cache, use_cache=True,
                 logits_to_keep=keep).logits[0, -1].float()


def main() -> None:
    import fireq_kernels.attention_kv4 as ak
    from fireq.nn.attention import make_cache
    from fireq.nn.graphs import GraphDecoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--lengths", default="37,100,200")
    args = ap.parse_args()
    model = tiny_llama(args.layers) if args.tiny else llama3_8b(args.layers)
    to_fireq(model)
    vocab = model.config.vocab_size
    max_len = 1024
    g = torch.Generator().manual_seed(1)
    eager = GraphDecoder(model, 1, max_len, prefill_graphs=0)
    graphed = GraphDecoder(model, 1, max_len)
    orig = ak.kv4_attention_triton

    def rel(a, b):
        return f"{((a - b).norm() / b.norm()).item():.2e}"

    results = {}
    with torch.no_grad():
        for n in [int(v) for v in args.lengths.split(",")]:
            p = graphed.prefill_length(n)
            x = torch.randint(0, vocab, (1, n), generator=g).cuda()
            xp = torch.cat([x, torch.zeros((1, p - n), dtype=torch.long, device="cuda")], dim=1)
            c1 = make_cache(model, max_len)
            r = {"a_fresh": logits(model, x, n, c1), "a_fresh2": logits(model, x, n, make_cache(model, max_len)),
                 "a_reused": logits(model, x, n, c1), "b_padded": logits(model, xp, n, make_cache(model, max_len))}
            for staged in (False, True):
                ak.kv4_attention_triton = lambda *a, _s=staged, **k: orig(*a, **{**k, "staged": _s})
                try:
                    r[f"a_staged{int(staged)}"] = logits(model, x, n, make_cache(model, max_len))
                    r[f"b_staged{int(staged)}"] = logits(model, xp, n, make_cache(model, max_len))
                finally:
                    ak.kv4_attention_triton = orig
            results[n] = (x, r)
            ta, tb = eager.generate(x, 8)[0, n:], graphed.generate(x, 8)[0, n:]
            print(f"n {n} P {p}: " + ", ".join(f"{k} {rel(v, r['a_fresh'])}" for k, v in r.items())
                  + f"; argmax {[v.argmax().item() for v in r.values()]}; first tokens eager {ta[0].item()} "
                  f"graphed {tb[0].item()}; continuations equal {torch.equal(ta, tb)}", flush=True)
    model.to("cpu")  # the PyTorch reference path of the same quantized model
    with torch.no_grad():
        for n, (x, r) in results.items():
            ref = logits(model, x.cpu(), n, make_cache(model, max_len)).float()
            print(f"n {n} vs CPU reference: " + ", ".join(f"{k} {rel(v.cpu(), ref)}" for k, v in r.items())
                  + f"; argmax ref {ref.argmax().item()}", flush=True)


if __name__ == "__main__":
    main()
