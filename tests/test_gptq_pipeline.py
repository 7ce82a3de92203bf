"""GPTQ inside the layer-by-layer loop (true-sequential) on a tiny model: runs, packs, and lowers the
logit error of RTN against the float model on held-out tokens."""

import torch

from fireq import recipe as recipes
from fireq.data import calibration_samples, load_text, tokenize
from fireq.models.source import load_float_model, resolve
from fireq.pipeline import quantize_model


def test_gptq_sequential_beats_rtn(tiny_dirs, calib_file, tokenizer):
    src = resolve(str(tiny_dirs["llama"]))
    ids = tokenize(tokenizer, load_text(str(calib_file)))
    samples = calibration_samples(ids, 8, 64, 0)
    held = calibration_samples(ids, 2, 64, 1)
    fp = load_float_model(src)
    with torch.no_grad():
        ref = fp(held).logits
    errs = {}
    for method in ("rtn", "gptq"):
        m = load_float_model(src)
        r = recipes.load("rtn").replace(method=method, w_bits=4, act_quant=False, query_fp8=False, kv_bits=16,
                                        calib_data=str(calib_file))
        quantize_model(m, r, samples if r.needs_calibration() else None)
        with torch.no_grad():
            errs[method] = ((m(held).logits - ref).norm() / ref.norm()).item()
    assert errs["gptq"] < errs["rtn"], errs
