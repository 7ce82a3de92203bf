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
    from transformers import GenerationConfig

    p = greedy_call(tiny, (x,), dict(generation_config=GenerationConfig(max_new_tokens=3, eos_token_id=2)))
    assert p["new"] == 3 and p["eos"] == [2]


@pytest.mark.parametrize("kw", [
    dict(do_sample=True), dict(num_beams=2), dict(repetition_penalty=1.2), dict(min_new_tokens=2),
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
    """A model whose generation config samples (many instruct models) goes to transformers unless the call
    says do_sample=False."""
    x = torch.randint(0, 1000, (1, 4))
    tiny.generation_config.do_sample = True
    try:
        assert greedy_call(tiny, (x,), {}) is None
        assert greedy_call(tiny, (x,), dict(do_sample=False)) is not None
    finally:
        tiny.generation_config.do_sample = None


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
