"""`model.generate()` as CUDA-graph replays, where the call is plain greedy decoding or plain sampling.

An eager decode step of a transformers model is host-bound, and fireq's more so (its modules and Triton
launches): on the H200, transformers' generate() of 64 tokens after a 1024-token prompt took 4.64 s on a
32-layer Llama-3-8B-shaped fireq model, 1.37 s in BF16, and 0.21 s as graph replays
(benchmarks/results/generate-h200.json, scripts/bench_generate.py). So a fireq model's generate() runs a call
that is plain greedy decoding, or plain multinomial sampling (temperature, top-k, top-p, min-p: transformers'
defaults and rules, fireq.nn.graphs.sample_tokens), through GraphDecoder (static INT4 cache, prompt and decode
steps replayed from CUDA graphs) and returns what transformers' generate() returns: the prompt and the new
tokens, each sequence's tokens after its end-of-sequence token replaced by the pad token, cut after the step
where the last sequence ended. The tokens are the graphed model's: its static cache and attention kernels
round differently from the growing cache's in fp16, so a near tie between two tokens can resolve differently
than in the eager call; sampled tokens come from the same distribution as transformers' draws, not the same
random numbers (torch.manual_seed makes a graphed call repeatable once its shape's graphs are captured: the
first call of a shape also draws in its eager runs).

Anything else goes to transformers' own generate(), unchanged: beams, several sequences a prompt, logits
processors of any kind (repetition penalty, minimum lengths, bad words, typical-p, ...), stopping criteria,
streamers, assistants, a cache or an attention mask with padding given, scores or dicts asked for, a model on
the CPU or split over GPUs.
`set_graphed_generate(model, False)` turns it off for a model. Decoders are kept on the model, one for each
(batch size, cache length bucket, sampling filters), at most MAX_DECODERS (the oldest is dropped).
"""

from __future__ import annotations

import torch
from torch import nn

MAX_DECODERS = 2
EOS_CHECK_EVERY = 16  # decode steps between checks (a host sync) whether every sequence has ended
_ATTR = "_fireq_graphed_generate"  # on the model: {"on": bool, "decoders": {(batch, max_len): GraphDecoder}}

# sampling's fields: free when not sampling; when sampling, temperature, top_k, top_p and min_p are honoured and
# the others must be unset or neutral
_SAMPLING = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h"})
_SAMPLING_NEUTRAL = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
# generation-config fields that these paths ignore (assistants', compilation's) or honour themselves (lengths,
# special tokens, use_cache)
_FREE = frozenset({
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold",
    "assistant_lookbehind", "target_lookbehind", "max_matching_ngram_size", "assistant_early_exit",
    "compile_config", "disable_compile", "max_new_tokens", "max_length", "bos_token_id", "eos_token_id",
    "pad_token_id", "decoder_start_token_id", "use_cache", "transformers_version", "_from_model_config",
    "_commit_hash", "_original_object_hash",
})
# fields whose value here changes nothing in greedy decoding (None: unset, always fine)
_NEUTRAL = {
    "num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "length_penalty": 1.0, "early_stopping": False, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
    "guidance_scale": 1.0, "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
    "output_attentions": False, "output_hidden_states": False, "renormalize_logits": False,
    "remove_invalid_values": False, "low_memory": False, "token_healing": False, "is_assistant": False,
    "use_mtp": False,
}
_MODEL_KWARGS = frozenset({"attention_mask", "input_ids", "inputs"})


def set_graphed_generate(model: nn.Module, on: bool) -> None:
    """Run this model's plain greedy generate() calls as CUDA-graph replays (on, the default on a GPU) or
    always through transformers' generate() (off; drops the kept decoders)."""
    _state(model).update(on=bool(on), decoders={})


def _state(model: nn.Module) -> dict:
    st = model.__dict__.get(_ATTR)
    if st is None:
        st = {"on": True, "decoders": {}}
        model.__dict__[_ATTR] = st
    return st


def _settings(model: nn.Module, gc, kwargs: dict) -> tuple[dict, dict] | None:
    """The effective generation settings of a call (the model's defaults, then the given config's set fields,
    then the keyword arguments) and the call's other keyword arguments; None when a field is neither free
    nor neutral."""
    from transformers import GenerationConfig

    eff = dict(model.generation_config.to_dict())
    if gc is not None:
        eff.update({k: v for k, v in gc.to_dict().items() if v is not None})
    known = set(GenerationConfig().to_dict()) | set(eff) | set(_NEUTRAL) | _FREE | _SAMPLING | {"do_sample"}
    rest = {}
    for k, v in kwargs.items():
        if k in known:
            eff[k] = v
        else:
            rest[k] = v
    sample = bool(eff.get("do_sample"))
    for k, v in eff.items():
        if k in _FREE or v is None or k.startswith("_") or k == "do_sample":
            continue
        if k in _SAMPLING:
            if sample and k in _SAMPLING_NEUTRAL and v != _SAMPLING_NEUTRAL[k] or sample and k == "top_h":
                return None
            continue
        if k not in _NEUTRAL or v != _NEUTRAL[k]:
            return None
    if eff.get("use_cache") is False:
        return None
    return eff, rest


def _sampling(eff: dict) -> dict | None:
    """A sampling call's filters and values with transformers' defaults (temperature 1, top_k 50, top_p 1, no
    min_p), or None when a value is outside what transformers takes (its generate() then says so)."""
    t = 1.0 if eff.get("temperature") is None else eff["temperature"]
    k = 50 if eff.get("top_k") is None else eff["top_k"]
    p = 1.0 if eff.get("top_p") is None else eff["top_p"]
    m = eff.get("min_p")
    try:
        t, k, p, m = float(t), int(k), float(p), None if m is None else float(m)
    except (TypeError, ValueError):
        return None
    if not t > 0 or k < 0 or not 0 <= p <= 1 or (m is not None and not 0 <= m <= 1):
        return None
    from .graphs import Sampling

    return dict(spec=Sampling(top_k=k, top_p=p < 1.0, min_p=m is not None), temperature=t, top_p=p,
                min_p=0.0 if m is None else m)


def plan(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """What a generate(*args, **kwargs) call needs to run graphed (input ids, new tokens, end-of-sequence ids,
    pad id), or None when transformers' generate() should run it."""
    if not _state(model)["on"] or not torch.cuda.is_available():
        return None
    from .graphs import model_devices

    devs = model_devices(model)
    if len(devs) != 1 or next(iter(devs)).type != "cuda":
        return None
    from fireq_kernels.ops import triton_fp8_capable

    if not triton_fp8_capable(next(iter(devs))):
        return None
    return greedy_call(model, args, kwargs)


def greedy_call(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """The call's input ids, new-token count, end-of-sequence ids and pad id when it is plain greedy decoding
    of unpadded prompts (whatever the device), else None."""
    kwargs = dict(kwargs)
    gc = kwargs.pop("generation_config", None)
    if len(args) > 1 or (args and ("inputs" in kwargs or "input_ids" in kwargs)):
        return None
    ids = args[0] if args else kwargs.pop("inputs", None)
    if ids is None:
        ids = kwargs.pop("input_ids", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or 0 in ids.shape:
        return None
    settings = _settings(model, gc, kwargs)
    if settings is None:
        return None
    eff, rest = settings
    if set(rest) - _MODEL_KWARGS:  # a cache, processors, criteria, a streamer, an assistant, ...
        return None
    mask = rest.get("attention_mask")
    if mask is not None and (mask.shape != ids.shape or not bool(mask.bool().all())):
        return None
    n = ids.shape[1]
    if eff.get("max_new_tokens") is not None:
        new = int(eff["max_new_tokens"])
    else:
        new = int(eff["max_length"] if eff.get("max_length") is not None else 20) - n
    if new < 1:
        return None
    sample = None
    if eff.get("do_sample"):
        sample = _sampling(eff)
        if sample is None:
            return None
    try:  # ints, lists of ints or tensors of them
        eos = eff.get("eos_token_id")
        eos = [] if eos is None else [int(e) for e in torch.as_tensor(eos).flatten().tolist()]
        pad = eff.get("pad_token_id")
        pad = eos[0] if pad is None and eos else (None if pad is None else int(pad))
    except (TypeError, ValueError, RuntimeError):
        return None
    return dict(ids=ids, new=new, eos=eos, pad=pad, sample=sample)


def _decoder(model: nn.Module, batch: int, need: int, sampling=None):
    from .graphs import GraphDecoder

    max_len = 256
    while max_len < need:
        max_len *= 2
    decoders = _state(model)["decoders"]
    key = (batch, max_len, sampling)
    dec = decoders.pop(key, None)
    if dec is None:
        while len(decoders) >= MAX_DECODERS:
            decoders.pop(next(iter(decoders)))
        dec = GraphDecoder(model, batch, max_len, sampling=sampling)
    decoders[key] = dec  # most recently used last
    return dec


def finish(tokens: torch.Tensor, eos: list[int], pad: int | None) -> torch.Tensor:
    """New tokens (B, T) as greedy search returns them: after a sequence's first end-of-sequence token the
    pad token, and nothing after the step where the last sequence ended."""
    if not eos:
        return tokens
    is_eos = torch.isin(tokens, torch.tensor(eos, device=tokens.device))
    ended_before = (is_eos.cumsum(1) - is_eos.long()) > 0  # an end-of-sequence token came earlier
    if pad is not None:
        tokens = tokens.masked_fill(ended_before, pad)
    ended = is_eos.any(1)
    if bool(ended.all()):
        last = int(is_eos.float().argmax(1).max())  # the step of the last sequence's first end token
        tokens = tokens[:, :last + 1]
    return tokens


@torch.no_grad()
def run(model: nn.Module, p: dict) -> torch.Tensor:
    """A planned call: prompt + greedy continuation (B, n + up to new), on the prompt's device."""
    ids, new, eos, sample = p["ids"], p["new"], p["eos"], p["sample"]
    b, n = ids.shape
    dec = _decoder(model, b, n + new, None if sample is None else sample["spec"])
    if sample is not None:
        dec.set_sampling(sample["temperature"], sample["top_p"], sample["min_p"])
    with torch.cuda.device(dec.device):
        x = ids.to(dec.device)
        out = [dec.prefill(x)]
        eos_t = torch.tensor(eos, device=dec.device) if eos else None
        ended = torch.isin(out[0], eos_t).any(1) if eos else None
        for i in range(1, new):
            if eos and i % EOS_CHECK_EVERY == 0 and bool(ended.all()):
                break
            out.append(dec.step())
            if eos:
                ended |= torch.isin(out[-1], eos_t).any(1)
        tokens = finish(torch.cat(out, 1), eos, p["pad"])
    return torch.cat([ids, tokens.to(ids.device)], 1)
