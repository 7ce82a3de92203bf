"""Ablation: FP, RTN, then each method in turn, on one model; writes a markdown and a JSON table.

    python scripts/ablate.py MODEL --calib-data FILE [--data FILE] [--limit 40] [--seqlen 512] --out DIR

Each row quantizes the float model in memory with the fake-quant twin (identical arithmetic to the
packed checkpoint; tests/e2e checks the two agree) and measures perplexity on the first `limit` windows,
plus the quantization time and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = [
    ("fp", None),
    ("rtn (W4A8KV4)", {}),
    ("weights only (W4, g128)", dict(act_quant=False, query_fp8=False, kv_bits=16)),
    ("FP8 activations only", dict(w_bits=16, query_fp8=False, kv_bits=16)),
    ("KV path: FP8 act + FP8 q + KV4, float weights", dict(w_bits=16)),
    ("KV path + pre-RoPE scaling", dict(w_bits=16, pre_rope_scaling=True)),
    ("KV path + pre/post-RoPE scaling", dict(w_bits=16, pre_rope_scaling=True, post_rope_scaling=True)),
    ("KV path + asymmetric KV4", dict(w_bits=16, kv_symmetric=False)),
    ("rtn + pre-RoPE", dict(pre_rope_scaling=True)),
    ("rtn + pre/post-RoPE", dict(pre_rope_scaling=True, post_rope_scaling=True)),
    ("rtn + pre-RoPE + asymmetric KV4", dict(pre_rope_scaling=True, kv_symmetric=False)),
    ("gptq + pre-RoPE", dict(method="gptq", pre_rope_scaling=True)),
    ("KV path + pre/post-RoPE + asymmetric KV4", dict(w_bits=16, pre_rope_scaling=True, post_rope_scaling=True,
                                                       kv_symmetric=False)),
    ("rtn + pre/post-RoPE + asymmetric KV4", dict(pre_rope_scaling=True, post_rope_scaling=True,
                                                  kv_symmetric=False)),
    ("gptq + pre/post-RoPE + asymmetric KV4", dict(method="gptq", pre_rope_scaling=True, post_rope_scaling=True,
                                                   kv_symmetric=False)),
    ("weights only, GPTQ (true-sequential, FP8-input Hessians)", dict(method="gptq", act_quant=False,
                                                                      query_fp8=False, kv_bits=16)),
    ("rtn + clip search + pre/post-RoPE", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True)),
    ("rtn + SmoothQuant a=0.5 + pre/post-RoPE", dict(smooth_alpha=0.5, pre_rope_scaling=True,
                                                    post_rope_scaling=True)),
    ("rtn + FireQ channel scaling + pre/post-RoPE", dict(channel_scaling=True, pre_rope_scaling=True,
                                                        post_rope_scaling=True)),
    ("gptq + pre/post-RoPE", dict(method="gptq", pre_rope_scaling=True, post_rope_scaling=True)),
    ("weights only, RTN", dict(act_quant=False, query_fp8=False, kv_bits=16)),
    ("rtn + clip + pre/post-RoPE + asymmetric KV4", dict(w_clip_search=True, pre_rope_scaling=True,
                                                         post_rope_scaling=True, kv_symmetric=False)),
    ("rtn + clip + SmoothQuant 0.5 + pre/post-RoPE + asym KV4", dict(w_clip_search=True, smooth_alpha=0.5,
                                                                     pre_rope_scaling=True, post_rope_scaling=True,
                                                                     kv_symmetric=False)),
    ("rtn + clip + SmoothQuant 0.3 + pre/post-RoPE + asym KV4", dict(w_clip_search=True, smooth_alpha=0.3,
                                                                     pre_rope_scaling=True, post_rope_scaling=True,
                                                                     kv_symmetric=False)),
    ("weights only, RTN + residual rotation", dict(act_quant=False, query_fp8=False, kv_bits=16,
                                                   rotate_residual=True)),
    ("default + residual rotation", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True,
                                         kv_symmetric=False, rotate_residual=True)),
    ("default + residual + V/O rotation", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True,
                                               kv_symmetric=False, rotate_residual=True, rotate_vo=True)),
    ("KV path + pre/post-RoPE + asym KV4 + V/O rotation", dict(w_bits=16, pre_rope_scaling=True,
                                                               post_rope_scaling=True, kv_symmetric=False,
                                                               rotate_vo=True)),
    ("weights only, GPTQ + residual rotation", dict(method="gptq", act_quant=False, query_fp8=False, kv_bits=16,
                                                    rotate_residual=True)),
    ("weights only, GPTQ, token cap 10", dict(method="gptq", act_quant=False, query_fp8=False, kv_bits=16,
                                              calib_token_cap=10.0)),
    ("default + token cap 10", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True,
                                    kv_symmetric=False, calib_token_cap=10.0)),
    ("gptq + clip-free, pre/post-RoPE + asym KV4 + V/O rotation, token cap 10",
     dict(method="gptq", pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, rotate_vo=True,
          calib_token_cap=10.0)),
    ("default + V/O rotation", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True,
                                    kv_symmetric=False, rotate_vo=True)),
    ("default + token cap 10 + V/O rotation", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=10.0, rotate_vo=True)),
    ("default + token cap 5", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=5.0)),
    ("default + token cap 10 + KV groups of 32", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=10.0, kv_group_size=32)),
    ("default + token cap 10 + BF16 weight scales", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=10.0, w_scale_dtype="bf16")),
    ("default + token cap 3", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=3.0)),
    ("default + token cap 5 + KV groups of 32", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=5.0, kv_group_size=32)),
    ("default + token cap 5 + KV groups of 64", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=5.0, kv_group_size=64)),
    ("default + token cap 2", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=2.0)),
    ("default + token cap 5 + BF16 weight scales", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=5.0, w_scale_dtype="bf16")),
    ("default + token cap 5 + BF16 weight scales + KV groups of 64", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=5.0,
                                                                         w_scale_dtype="bf16", kv_group_size=64)),
    ("weights only, RTN + clip search (token cap 3)", dict(act_quant=False, query_fp8=False, kv_bits=16,
                                                           w_clip_search=True, calib_token_cap=3.0)),
    ("default (token cap 3) + BF16 weight scales", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=3.0, w_scale_dtype="bf16")),
    ("default + smoothing exponent searched per block", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=3.0, smooth_search=True)),
    ("default + SmoothQuant a=0.5 (statistics follow the smoothing)", dict(w_clip_search=True, pre_rope_scaling=True, post_rope_scaling=True, kv_symmetric=False, calib_token_cap=3.0, smooth_alpha=0.5)),
]


def main() -> None:
    import torch

    from fireq import recipe as recipes
    from fireq.data import calibration_samples, load_text, tokenize
    from fireq.evaluate.perplexity import perplexity
    from fireq.evaluate.run import default_data
    from fireq.models.source import load_float_model, load_tokenizer, resolve
    from fireq.pipeline import quantize_model

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--calib-data", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--only", default=None, help="comma-separated row indices")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    src = resolve(args.model)
    tok = load_tokenizer(src)
    ids = tokenize(tok, load_text(args.data or default_data()))
    calib = calibration_samples(tokenize(tok, load_text(args.calib_data, "train")), args.nsamples, 512, 0)
    base = recipes.load("rtn").replace(calib_data=args.calib_data, nsamples=args.nsamples)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    only = None if args.only is None else {int(i) for i in args.only.split(",")}
    for i, (name, changes) in enumerate(VARIANTS):
        if only is not None and i not in only:
            continue
        model = load_float_model(src)
        t0 = time.time()
        if changes is not None:
            r = base.replace(name=f"ablate-{i}", **changes)
            quantize_model(model, r, calib if r.needs_calibration() else None, fake=True)
        tq = time.time() - t0
        res = perplexity(model, ids, args.seqlen, args.limit)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        row = dict(variant=name, changes=changes, perplexity=res["perplexity"], quantize_s=tq,
                   peak_rss_gib=peak, windows=res["windows"], seqlen=args.seqlen)
        rows.append(row)
        print(f"{name:50s} PPL {res['perplexity']:8.3f}  quantize {tq:6.1f}s", flush=True)
        with open(os.path.join(args.out, "ablation.json"), "w") as f:
            json.dump(dict(model=src.display, calib_data=args.calib_data, rows=rows), f, indent=2)
    md = ["| variant | PPL | quantize s | peak RSS GiB |", "|---|---|---|---|"]
    md += [f"| {r['variant']} | {r['perplexity']:.2f} | {r['quantize_s']:.1f} | {r['peak_rss_gib']:.1f} |" for r in rows]
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(f"Model: `{os.path.basename(src.display)}`; {args.limit} x {args.seqlen} windows of the WikiText-2 "
                f"test file; calibration: {args.nsamples} x 512 tokens of `{os.path.basename(args.calib_data)}`.\n\n")
        f.write("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
