"""generate() as CUDA-graph replays (fireq.nn.generate): which calls qualify, and the end-of-sequence
handling, against transformers' own greedy search on the CPU (the graphed run itself is tested on the GPU,
tests/test_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from fireq.nn.generate import finish, greedy_call
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def tiny():
    m = make_tiny("llama", 1000)
    m.generation_config.pad_token_id = None
    m.generation_config.eos_token_id = None
    return m


def test_plain_greedy_calls_qualify(tiny):
    x = torch.randint(0, 1000, (2, 7))
    p = greedy_call(tiny, (x,), dict(max_new_tokens=5))
    assert p["ids"] is x and p["new"] == 5 and p["eos"] == [] and p["pad"] is None
    p = greedy_call(tiny, (), dict(input_ids=x, max_length=12, do_sample=False, num_beams=1, temperature=0.7,
                                   eos_token_id=[3, 4], attention_mask=torch.ones_like(x), use_cache=True))
    assert p["new"] == 5 and p["eos"] == [3, 4] and p["pad"] == 3  # no pad token: the first end token, as HF
    assert greedy_call(tiny, (x,), dict(eos_token_id=9, pad_token_id=0))["new"] == 13  # max_length 20 by default
    p = greedy_call(tiny, (x,), dict(eos_token_id=torch.tensor([5, 6]), pad_token_id=torch.tensor(1)))
    assert p["eos"] == [5, 6] and p["pad"] == 1  # tensors, as transformers takes them too
    assert greedy_call(tiny, (x,), dict(eos_token_id="two")) is None  # transformers' generate() says what is wrong
    from transformers import GenerationConfig

    p = greedy_call(tiny, (x,), dict(generation_config=GenerationConfig(max_new_tokens=3, eos_token_id=2)))
    assert p["new"] == 3 and p["eos"] == [2]


def test_sampling_calls_qualify(tiny):
    from fireq.nn.graphs import Sampling

    x = torch.randint(0, 1000, (1, 5))
    p = greedy_call(tiny, (x,), dict(do_sample=True, max_new_tokens=3))
    assert p["sample"] == dict(spec=Sampling(top_k=50), temperature=1.0, top_p=1.0, min_p=0.0)  # HF's defaults
    p = greedy_call(tiny, (x,), dict(do_sample=True, temperature=0.6, top_p=0.9, top_k=0, min_p=0.05))
    assert p["sample"] == dict(spec=Sampling(top_k=0, top_p=True, min_p=True), temperature=0.6, top_p=0.9,
                               min_p=0.05)
    assert greedy_call(tiny, (x,), dict(temperature=0.6, top_p=0.9))["sample"] is None  # not sampling: greedy


@pytest.mark.parametrize("kw", [
    dict(do_sample=True, typical_p=0.9), dict(do_sample=True, temperature=0.0), dict(do_sample=True, top_h=0.5),
    dict(do_sample=True, epsilon_cutoff=3e-4), dict(do_sample=True, repetition_penalty=1.1), dict(num_beams=2), dict(repetition_penalty=1.2), dict(min_new_tokens=2),
    dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[5]]), dict(output_scores=True, return_dict_in_generate=True),
    dict(num_return_sequences=2, do_sample=True), dict(use_cache=False), dict(streamer=object()),
    dict(stopping_criteria=[]), dict(logits_processor=[]), dict(past_key_values=object()), dict(max_length=7),
    dict(attention_mask="padded"), dict(prompt_lookup_num_tokens=3), dict(suppress_tokens=[1]),
])
def test_other_calls_go_to_transformers(tiny, kw):
    x = torch.randint(0, 1000, (2, 7))
    if kw.get("attention_mask") == "padded":
        kw = dict(attention_mask=torch.ones_like(x).index_fill_(1, torch.tensor([0]), 0))
    assert greedy_call(tiny, (x,), dict(kw)) is None


def test_model_defaults_count(tiny):
    """A model whose generation config samples (many instruct models) samples with its values unless the call
    says otherwise; a repetition penalty in it sends the call to transformers."""
    x = torch.randint(0, 1000, (1, 4))
    gc = tiny.generation_config
    gc.do_sample, gc.temperature, gc.top_p = True, 0.7, 0.8
    try:
        p = greedy_call(tiny, (x,), {})
        assert p["sample"]["temperature"] == 0.7 and p["sample"]["top_p"] == 0.8
        assert greedy_call(tiny, (x,), dict(do_sample=False))["sample"] is None
        gc.repetition_penalty = 1.05
        assert greedy_call(tiny, (x,), {}) is None
    finally:
        gc.do_sample = gc.temperature = gc.top_p = gc.repetition_penalty = None


@pytest.mark.parametrize("t,k,p,m", [(1.0, 50, 1.0, None), (0.6, 0, 0.9, None), (1.3, 20, 0.8, 0.05),
                                      (0.7, 5, 0.3, None), (1.0, 0, 1.0, 0.2), (0.5, 3000, 0.95, 0.0)])
def test_sampling_scores_are_transformers_warpers(t, k, p, m):
    """The filtered scores equal transformers' own warpers applied in generate()'s order, on random logits
    with ties and a peaked row."""
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    from fireq.nn.graphs import Sampling, sampling_scores

    g = torch.Generator().manual_seed(k + int(100 * p))
    logits = torch.randn(4, 2000, generator=g) * 3
    logits[1, :40] = 2.5  # ties at the top-k and top-p boundaries
    logits[2, 7] = 30.0  # one token takes (almost) all the mass
    want = logits.clone()
    for w in ([TemperatureLogitsWarper(t)] if t != 1.0 else []) + ([TopKLogitsWarper(k)] if k else []) + \
            ([TopPLogitsWarper(p)] if p < 1.0 else []) + ([MinPLogitsWarper(m)] if m is not None else []):
        want = w(None, want)
    spec = Sampling(top_k=k, top_p=p < 1.0, min_p=m is not None)
    one = torch.ones(1, 1)
    got = sampling_scores(logits, spec, t * one, p * one, (m or 0.0) * one)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)], rtol=0, atol=0)


def test_draws_follow_the_distribution():
    """sample_tokens' exponential race draws each token with its softmax probability (20,000 draws of a
    12-token distribution: every frequency within 4.5 standard errors), filtered tokens never."""
    from fireq.nn.graphs import Sampling, sample_tokens

    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -9.0]])
    spec = Sampling(top_k=10, top_p=False, min_p=False)
    one = torch.ones(1, 1)
    rows = logits.expand(20000, -1)
    draws = sample_tokens(rows, spec, 0.8 * one, one, 0 * one).flatten()
    probs = (logits[0, :10] / 0.8).softmax(-1)
    freq = torch.bincount(draws, minlength=12).double() / draws.numel()
    assert freq[10:].sum() == 0
    se = (probs.double() * (1 - probs.double()) / draws.numel()).sqrt()
    assert ((freq[:10] - probs.double()).abs() <= 4.5 * se + 1e-12).all(), (freq[:10], probs)


@pytest.mark.parametrize("pad", [None, 0])
def test_end_of_sequence_as_transformers_greedy_search(tiny, pad):
    """finish() over the unconstrained continuation equals transformers' greedy search with end tokens taken
    from that continuation: each row padded after its own end, cut after the last row's end."""
    torch.manual_seed(1)
    x = torch.randint(0, 1000, (3, 6))
    with torch.no_grad():
        free = tiny.generate(x, max_new_tokens=10, do_sample=False)[:, 6:]
    for eos in ([int(free[0, 2])], [int(free[1, 4]), int(free[2, 1])], [int(free[0, 9])]):
        kw = dict(max_new_tokens=10, do_sample=False, eos_token_id=eos)
        if pad is not None:
            kw["pad_token_id"] = pad
        with torch.no_grad():
            want = tiny.generate(x, **kw)[:, 6:]
        assert torch.equal(finish(free, eos, eos[0] if pad is None else pad), want), eos
    assert torch.equal(finish(free, [], None), free)
