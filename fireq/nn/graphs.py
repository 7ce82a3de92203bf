"""Greedy (or sampled) decoding with every step one CUDA-graph replay, over the static INT4 KV cache.

A decode step of a quantized model is dozens of small kernels a layer; launched from Python it is
launch-bound. With the static cache (fireq.nn.attention.make_cache(model, max_len): buffers allocated
once, write position and lengths on the device) a step has fixed shapes and no host state, so it is
captured once in a CUDA graph and replayed for every token:

    dec = GraphDecoder(model, batch_size=1, max_len=2048)
    tokens = dec.generate(input_ids, max_new_tokens=128)   # (B, prompt + 128)

The first decode step runs eagerly (it settles every lazy choice: weight layouts, first-use checks, log2
multipliers), then the step is captured and replayed.

Prompts are graphed too, where the host is the limit: an eager prefill of a short prompt is Python and
launches (an 8-layer Llama-3-8B-shaped model at 1024 tokens: 14 ms on the host for 6.4 ms of kernels on an
H200, benchmarks/results/prefill-profile-h200.json). A prompt of n <= prefill_graphs tokens (default 2048)
on the static INT4 cache is padded to the next power of two P >= 128, and the prefill of P tokens is
captured once per P (after one eager run of it) and replayed. The pad tokens come after the prompt, so
causal attention keeps them out of its positions; their K and V are written past the prompt and the cache
is then declared n tokens long (set_static_length), so decoding overwrites them; the logits are those of
position n - 1 (logits_to_keep as a device index). Each captured length keeps its own memory pool (the
activations of P tokens). Choices made by token count (the FP8 prefill path's min_tokens) see P. Longer
prompts, other caches and models without logits_to_keep run eagerly. The sequences of a batch share one
length (no attention mask). Tokens are greedy (argmax inside the graph: the two-launch row argmax of
fireq_kernels.argmax, torch.argmax's result in a tenth of its time at a 128K vocabulary) or, with
`sampling=Sampling(...)`, drawn inside the graph as transformers' multinomial sampling draws them: the logits
in float32 divided by the temperature, then top-k, top-p and min-p filtering (transformers' rules, in its
order), then one draw from the softmax (an exponential race: argmax of p / E with E ~ Exp(1), the CUDA
generator's philox stream, which graph replays advance). Which filters run is fixed at construction (they are
in the graph); their values (temperature, top_p, min_p) live on the device and are set by set_sampling().
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FireqError


@dataclass(frozen=True)
class Sampling:
    """Multinomial sampling's filters in a captured step: top_k (0: none), whether top-p and min-p filter."""

    top_k: int = 0
    top_p: bool = False
    min_p: bool = False


def sample_tokens(logits: torch.Tensor, spec: Sampling, temperature: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """One token a row (B, 1) drawn from logits (B, V) as transformers' sampling draws it (temperature, top-k,
    top-p, min-p, multinomial), with no host synchronization (capturable). temperature, top_p, min_p: (1, 1)
    float32 tensors on the logits' device."""
    probs = sampling_scores(logits, spec, temperature, top_p, min_p).softmax(-1)
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1, keepdim=True)


def sampling_scores(logits: torch.Tensor, spec: Sampling, temperature: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor) -> torch.Tensor:
    """The float32 scores sampling draws from (filtered tokens at -inf): transformers' temperature, top-k,
    top-p and min-p warpers, in that order."""
    x = logits.float() / temperature
    ninf = float("-inf")
    if spec.top_k:
        kth = torch.topk(x, min(spec.top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, ninf)
    if spec.top_p:  # drop the least likely tokens whose probabilities sum to at most 1 - top_p; keep the top one
        srt, idx = torch.sort(x, dim=-1)
        drop = srt.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(1, idx, drop), ninf)
    if spec.min_p:  # drop tokens below min_p times the top probability; keep the top one
        p = x.softmax(-1)
        drop = p < min_p * p.amax(-1, keepdim=True)
        drop.scatter_(1, p.argmax(-1, keepdim=True), False)
        x = x.masked_fill(drop, ninf)
    return x


def model_devices(model: nn.Module) -> set:
    """The devices of a model's parameters and buffers."""
    return {t.device for t in (*model.parameters(), *model.buffers())}


class GraphDecoder:
    """model: a fireq model on a CUDA device (fireq.load(..., device="cuda")). cache: any transformers cache
    with device-side positions (default: the static INT4 cache of max_len tokens). prefill_graphs: the
    longest prompt whose prefill is a graph replay (0: every prefill eager). sampling: draw tokens with these
    filters (values by set_sampling) instead of greedy argmax."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, cache=None, prefill_graphs: int = 2048,
                 sampling: Sampling | None = None):
        from .attention import make_cache

        devs = model_devices(model)
        if len(devs) != 1 or next(iter(devs)).type != "cuda":
            raise FireqError("GraphDecoder needs the whole model on one CUDA device (a CUDA graph is captured on "
                             f"one GPU; the model's parameters are on {', '.join(sorted(map(str, devs)))})")
        dev = self.device = next(iter(devs))
        self.model = model
        self.max_len = max_len
        self.cache = cache if cache is not None else make_cache(model, max_len)
        self.ids = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.sampling = sampling
        # the sampling values the captured steps read: temperature, top_p, min_p
        self._samp = torch.tensor([1.0, 1.0, 0.0], device=dev).view(3, 1, 1)
        import inspect

        # only the last position's logits (a prompt's full logits can take gigabytes)
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
        self.prefill_graphs = prefill_graphs
        # captured prefills by padded length P: (graph, ids (B, P), positions, index of the last prompt token)
        self._prefills: dict[int, tuple] = {}

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The logits of the last position (keep: of that position, a (1,) device index) for ids at pos."""
        kw = self._keep if keep is None else {"logits_to_keep": keep}
        out = self.model(ids, position_ids=pos, past_key_values=self.cache, use_cache=True, **kw)
        return out.logits[:, -1]

    def set_sampling(self, temperature: float = 1.0, top_p: float = 1.0, min_p: float = 0.0) -> None:
        """The values the sampling filters use from the next prefill or step on."""
        if self.sampling is None:
            raise FireqError("this GraphDecoder decodes greedily (no sampling=)")
        if not temperature > 0 or not 0 < top_p <= 1 or not 0 <= min_p <= 1:
            raise FireqError(f"sampling values out of range: temperature {temperature}, top_p {top_p}, min_p {min_p}")
        self._samp.copy_(torch.tensor([temperature, top_p, min_p], dtype=torch.float32).view(3, 1, 1))

    def _next(self, logits: torch.Tensor) -> None:
        """The next tokens from logits (B, V) into self.ids: greedy, or drawn (sampling)."""
        if self.sampling is not None:
            self.ids.copy_(sample_tokens(logits, self.sampling, self._samp[0], self._samp[1], self._samp[2]))
            return
        from fireq_kernels.argmax import argmax_rows_triton

        argmax_rows_triton(logits if logits.stride(-1) == 1 else logits.contiguous(), out=self.ids)

    def _step(self) -> None:
        self._next(self._forward(self.ids, self.pos))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, n) into a reset cache; returns the first new token (B, 1)."""
        with torch.cuda.device(self.device):  # graphs, streams and kernels on the model's GPU
            return self._prefill(input_ids.to(self.device))

    def _prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, n = input_ids.shape
        if b != self.ids.shape[0]:
            raise FireqError(f"GraphDecoder was built for batch {self.ids.shape[0]}, got {b}")
        if n >= self.max_len:
            raise FireqError(f"prompt of {n} tokens does not fit max_len={self.max_len}")
        p = self.prefill_length(n)
        if p is not None:
            self._prefill_graphed(input_ids, p)
        else:
            self.cache.reset()
            pos = torch.arange(n, device=input_ids.device).expand(b, n)
            self._next(self._forward(input_ids, pos))
        self.pos.fill_(n)
        return self.ids.clone()

    def prefill_length(self, n: int) -> int | None:
        """The padded length a prompt of n tokens is graphed at, or None where its prefill runs eagerly."""
        from .attention import static_layers

        if not self._keep or n > self.prefill_graphs or static_layers(self.cache) is None:
            return None
        p = 128
        while p < n:
            p *= 2
        return p if p <= self.max_len else None

    @staticmethod
    def _capture(fn) -> torch.cuda.CUDAGraph:
        """fn recorded (not run) as a CUDA graph on a side stream; run it eagerly once before (lazy choices)."""
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        return g

    def _prefill_graphed(self, input_ids: torch.Tensor, p: int) -> None:
        """The prompt padded to p tokens, through the captured prefill of p tokens (captured on first use)."""
        from .attention import set_static_length

        b, n = input_ids.shape
        if p not in self._prefills:
            dev = input_ids.device
            ids = torch.zeros((b, p), dtype=torch.long, device=dev)
            last = torch.zeros((1,), dtype=torch.long, device=dev)
            self._prefills[p] = (None, ids, torch.arange(p, device=dev).expand(b, p), last)
        graph, ids, pos, last = self._prefills[p]
        ids[:, :n].copy_(input_ids)
        ids[:, n:].zero_()  # pad token 0: any token does, the prompt's positions never see it
        last.fill_(n - 1)

        def body():
            self._next(self._forward(ids, pos, keep=last))

        if graph is None:  # one eager run of this length settles lazy choices (compiles, first-call checks)
            self.cache.reset()
            body()
            self.cache.reset()
            graph = self._capture(body)
            self._prefills[p] = (graph, ids, pos, last)
        self.cache.reset()
        graph.replay()
        set_static_length(self.cache, n)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step (eager the first time, then captured and replayed); returns the new token."""
        with torch.cuda.device(self.device):
            return self._decode_step()

    def _decode_step(self) -> torch.Tensor:
        if self.graph is None:
            self._step()  # eager: settles every lazy choice before capture
            out = self.ids.clone()
            self.graph = self._capture(self._step)
            return out
        self.graph.replay()
        return self.ids.clone()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: (B, n) -> (B, n + max_new_tokens)."""
        if input_ids.shape[1] + max_new_tokens > self.max_len:
            raise FireqError(f"{input_ids.shape[1]} + {max_new_tokens} tokens exceed max_len={self.max_len}")
        input_ids = input_ids.to(self.device)
        with torch.cuda.device(self.device):
            out = [input_ids, self._prefill(input_ids)]
            for _ in range(max_new_tokens - 1):
                out.append(self._decode_step())
        return torch.cat(out, dim=1)
