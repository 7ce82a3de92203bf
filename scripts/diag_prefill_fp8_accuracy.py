"""Accuracy of the FP8 prefill path on a fireq checkpoint (CPU, the path's PyTorch twin): perplexity with every
linear call on the INT4 GEMM, on the FP8 path with the row scale max / 56, and with the searched row scale
(reference.fp8_row_factors), plus the mean KL divergence of each FP8 variant's next-token distribution from
the INT4 one (how far the path moves the model, less noisy than perplexity).

    python scripts/diag_prefill_fp8_accuracy.py CHECKPOINT --data FILE [--windows 40] [--seqlen 512] --json OUT

The perplexity protocol of fireq eval: non-overlapping windows, no BOS, PPL = exp(mean token NLL).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--data", required=True)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    import fireq
    import fireq_kernels.reference as ref
    from fireq.data import load_text, tokenize
    from fireq.models.source import load_tokenizer, resolve
    from fireq.nn.linear import set_prefill_fp8

    ids = tokenize(load_tokenizer(resolve(args.checkpoint)), load_text(args.data, split="test"))
    n, L = args.windows, args.seqlen
    model = fireq.load(args.checkpoint)
    search = ref.fp8_row_factors

    def run(variant):
        ref.fp8_row_factors = search if variant != "fp8_max56" else (lambda s, e, e2=None, hist=None: search(s, e, e2))
        set_prefill_fp8(model, 0 if variant == "int4" else 1)
        outs = []
        with torch.no_grad():
            for w in range(n):
                outs.append(torch.log_softmax(model(ids[w * L:(w + 1) * L][None]).logits.float(), -1)[0, :-1])
        ref.fp8_row_factors = search
        return outs

    def ppl(outs):
        nll = sum(-o.gather(1, ids[w * L + 1:(w + 1) * L][:, None]).sum().item() for w, o in enumerate(outs))
        return math.exp(nll / (n * (L - 1)))

    base = run("int4")
    res = dict(checkpoint=args.checkpoint, windows=n, seqlen=L, int4_ppl=ppl(base))
    print(res, flush=True)
    for v in ("fp8_max56", "fp8_searched"):
        o = run(v)
        kl = sum((b.exp() * (b - f)).sum(-1).mean().item() for b, f in zip(base, o)) / n
        res[f"{v}_ppl"], res[f"{v}_kl_from_int4"] = ppl(o), kl
        print(v, round(res[f"{v}_ppl"], 4), round(kl, 5), flush=True)
    with open(args.json, "w") as f:
        json.dump(dict(env=dict(torch=torch.__version__, device="cpu"), **res), f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
