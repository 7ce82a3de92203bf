"""A model on a GPU other than the current one, and a model split over two GPUs (needs two FP8 GPUs).

Triton launches on the current device whatever the tensors' device, so every kernel launcher makes its
tensors' device current (fireq_kernels.device); GraphDecoder captures on the model's GPU; the static INT4
cache keeps one set of device-side lengths a GPU. Each case must give what the same model gives on cuda:0
with cuda:0 current (the same GPU model: the same kernels and the same bits), and leave cuda:0 current."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2
    or any(torch.cuda.get_device_capability(i) < (8, 9) for i in range(2)),
    reason="needs two GPUs with FP8 tensor cores")

PROMPTS = (37, 300)  # the unstaged and the staged (>= 4 blocks of query rows) prefill attention
NEW = 12


def _prompt(n: int) -> torch.Tensor:
    return torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n))


@torch.no_grad()
def _run(m, x: torch.Tensor, graphs: bool = True) -> dict:
    """Logits of the prompt x, transformers' generate() (greedy, growing INT4 cache), four eager steps over
    the static INT4 cache and (graphs) GraphDecoder's continuation and generate() as it runs by default
    (graphed: fireq.nn.generate), all on the CPU."""
    from fireq.nn.attention import make_cache
    from fireq.nn.generate import set_graphed_generate
    from fireq.nn.graphs import GraphDecoder

    n = x.shape[1]
    set_graphed_generate(m, False)
    out = {"logits": m(x).logits.float().cpu(),
           "generate": m.generate(x, max_new_tokens=NEW, do_sample=False).cpu()}
    set_graphed_generate(m, True)
    cache, ids, toks = make_cache(m, max_len=512), x, []
    for step in range(4):
        pos = torch.arange(n + step - ids.shape[1], n + step, device=x.device)[None]
        logits = m(ids, position_ids=pos, past_key_values=cache, use_cache=True).logits[:, -1]
        ids = logits.argmax(-1, keepdim=True).to(x.device)
        toks.append(ids.cpu())
    out["static"] = torch.cat(toks, 1)
    out["lengths_sets"] = len({id(layer._lens_state) for layer in cache.layers})
    if graphs:
        out["graphs"] = GraphDecoder(m, 1, 512).generate(x, NEW).cpu()
        out["generate_graphed"] = m.generate(x, max_new_tokens=NEW, do_sample=False).cpu()
    return out


@pytest.fixture(scope="module")
def reference(gpu_checkpoint):
    import fireq

    torch.cuda.set_device(0)
    m = fireq.load(gpu_checkpoint, device="cuda:0")
    return {n: _run(m, _prompt(n).cuda(0)) for n in PROMPTS}


def _same(got: dict, ref: dict, n: int) -> None:
    for key in ("logits", "generate", "static", "graphs", "generate_graphed"):
        if key in got:
            assert torch.equal(got[key], ref[key]), (n, key)


def test_model_on_second_gpu(gpu_checkpoint, reference):
    import fireq

    torch.cuda.set_device(0)
    m = fireq.load(gpu_checkpoint, device="cuda:1")
    for n in PROMPTS:
        got = _run(m, _prompt(n).cuda(1))
        _same(got, reference[n], n)
        assert got["lengths_sets"] == 1
        assert torch.cuda.current_device() == 0
    # GraphDecoder takes a prompt from another device
    from fireq.nn.graphs import GraphDecoder

    assert torch.equal(GraphDecoder(m, 1, 512).generate(_prompt(37), NEW).cpu(), reference[37]["graphs"])


def test_model_split_over_two_gpus(gpu_checkpoint, reference):
    """transformers' loading with a device_map (the embedding and layer 0 on cuda:0, layer 1 and the head on
    cuda:1): prompt logits, generate() over the growing INT4 cache and eager steps over the static one (one
    set of device-side lengths a GPU); GraphDecoder refuses the split model with one clear line."""
    import fireq  # noqa: F401  (registers the quantization method with transformers)
    from fireq.errors import FireqError
    from fireq.nn.graphs import GraphDecoder
    from transformers import AutoModelForCausalLM

    torch.cuda.set_device(0)
    dm = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
          "model.norm": 1, "lm_head": 1}
    m = AutoModelForCausalLM.from_pretrained(gpu_checkpoint, device_map=dm, dtype=torch.bfloat16).eval()
    assert m.model.layers[0].self_attn.o_proj.qweight.device == torch.device("cuda", 0)
    assert m.model.layers[1].self_attn.o_proj.qweight.device == torch.device("cuda", 1)
    from fireq.nn.generate import plan

    for n in PROMPTS:
        x = _prompt(n).cuda(0)
        got = _run(m, x, graphs=False)
        _same(got, reference[n], n)
        assert got["lengths_sets"] == 2
        assert plan(m, (x,), dict(max_new_tokens=NEW)) is None  # generate() stays transformers' on a split model
        assert torch.equal(m.generate(x, max_new_tokens=NEW).cpu(), reference[n]["generate"])
    with pytest.raises(FireqError, match="one CUDA device"):
        GraphDecoder(m, 1, 64)
    assert torch.cuda.current_device() == 0
