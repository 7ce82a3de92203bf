"""Weight-only accuracy of power-of-two group scales, the format that would let a prefill GEMM run FP8 MMAs
with one chained accumulator (CPU; no GPU needed).

With group scales s_g = c_n 2^e_g (c_n one float a row, e_g in [-11, 0]), every weight q 2^e_g (q in -8..7,
at most three significant bits) is exact in FP8 E4M3 after a fixed shift (q 2^(e_g + 5) lies in the E4M3
grid from subnormals up to 224), so W = c_n * FP8 codes: a plain FP8 GEMM with per-token and per-channel
scales, no per-K-tile rescale of the accumulator (what holds the current g128 GEMM near cuBLAS BF16 speed
at prefill). This script measures what that costs in perplexity against today's FP8 E4M3 group scales, on
the decoder linears of a model, with float activations (the weight format alone):

    python scripts/diag_pow2_scales.py [MODEL] [--data FILE] [--limit 40] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
E_MIN = -11  # q 2^(e + 5) stays exact in E4M3 for e in [-11, 0]


def quant_pow2(w: torch.Tensor, group: int, choose: bool) -> torch.Tensor:
    """w (N, K) -> dequantized (N, K) with scales c_n 2^e_g. choose=False: e_g = ceil (no clipping, the RTN
    analogue); True: per group the lower-MSE of ceil and floor (floor clips the group's largest weights)."""
    from fireq.formats.int4 import _grouped

    n, k = w.shape
    wg = _grouped(w.double(), group)  # (N, G, g)
    s = wg.abs().amax(-1) / 7.0
    c = s.amax(-1, keepdim=True).clamp_min(1e-30)
    r = torch.log2((s / c).clamp_min(2.0**E_MIN))

    def deq(e):
        sc = (c * 2.0**e).unsqueeze(-1)
        q = torch.round(wg / sc).clamp(-8, 7)
        fp8 = q * 2.0 ** (e + 5).unsqueeze(-1)  # the FP8 operand of the GEMM
        assert torch.equal(fp8.to(torch.float8_e4m3fn).double(), fp8), "not exact in E4M3"
        return q * sc

    hi = deq(torch.ceil(r).clamp(E_MIN, 0))
    if choose:
        lo = deq(torch.floor(r).clamp(E_MIN, 0))
        better = ((lo - wg) ** 2).sum(-1, keepdim=True) < ((hi - wg) ** 2).sum(-1, keepdim=True)
        hi = torch.where(better, lo, hi)
    return hi.reshape(n, -1)[:, :k].float()


def quant_fp8_scales(w: torch.Tensor, group: int, search: bool) -> torch.Tensor:
    """Today's format: FP8 E4M3 group scales with a per-tensor power-of-two multiplier; search: per-group
    clipping ratio by plain MSE (search_clip with uniform input weights)."""
    from fireq.formats.int4 import quantize_int4

    cw = torch.ones(w.shape[1]) if search else None
    return quantize_int4(w.float(), group, "fp8", channel_weight=cw).dequantize(torch.float32)


def quant_fp8_rerounded(w: torch.Tensor, group: int) -> torch.Tensor:
    """Today's RTN weights (FP8 group scales) re-rounded to FP8 E4M3 with one scale a row: what a prefill GEMM
    on FP8 weights with a chained accumulator would use if it converted today's format inexactly."""
    wq = quant_fp8_scales(w, group, False).double()
    c = (wq.abs().amax(-1, keepdim=True) / 448.0).clamp_min(1e-30)
    return ((wq / c).to(torch.float8_e4m3fn).double() * c).float()


VARIANTS = {
    "fp": None,
    "fp8 group scales, RTN (today's rtn weights)": lambda w, g: quant_fp8_scales(w, g, False),
    "fp8 group scales, MSE clip search": lambda w, g: quant_fp8_scales(w, g, True),
    "pow2 group scales, ceil (no clipping)": lambda w, g: quant_pow2(w, g, False),
    "pow2 group scales, MSE choice of ceil / floor": lambda w, g: quant_pow2(w, g, True),
    "fp8 group scales, RTN, re-rounded to FP8 E4M3 per row": quant_fp8_rerounded,
}


def main() -> None:
    from fireq.data import load_text, tokenize
    from fireq.evaluate.perplexity import perplexity
    from fireq.evaluate.run import default_data
    from fireq.models.source import load_float_model, load_tokenizer, resolve

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", default=None, help="comma-separated variant indices")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    src = resolve(args.model)
    ids = tokenize(load_tokenizer(src), load_text(args.data or default_data()))
    rows = []
    for i, (name, fn) in enumerate(VARIANTS.items()):
        if args.only is not None and str(i) not in args.only.split(","):
            continue
        model = load_float_model(src)
        t0 = time.time()
        err = []
        if fn is not None:
            for layer in model.model.layers:
                for mod in list(layer.self_attn.children()) + list(layer.mlp.children()):
                    if isinstance(mod, torch.nn.Linear):
                        w = mod.weight.data
                        wq = fn(w.float(), args.group)
                        err.append(((wq - w.float()).norm() / w.float().norm()).item() ** 2)
                        mod.weight.data = wq.to(w.dtype)
        res = perplexity(model, ids, args.seqlen, args.limit)
        row = dict(variant=name, perplexity=res["perplexity"], windows=res["windows"], seqlen=args.seqlen,
                   mean_rel_weight_mse=sum(err) / len(err) if err else 0.0, quantize_s=time.time() - t0)
        rows.append(row)
        print(f"{name:48s} PPL {row['perplexity']:8.3f}  rel. weight MSE {row['mean_rel_weight_mse']:.3e}", flush=True)
        del model
    if args.json:
        if args.only is not None and os.path.exists(args.json):  # add to (or replace in) an earlier run's rows
            with open(args.json) as f:
                old = [r for r in json.load(f)["rows"] if r["variant"] not in {r2["variant"] for r2 in rows}]
            rows = old + rows
        with open(args.json, "w") as f:
            json.dump(dict(model=os.path.basename(src.display), group=args.group,
                           limit=args.limit, torch=torch.__version__, rows=rows), f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
