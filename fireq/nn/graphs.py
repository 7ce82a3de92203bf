"""Greedy decoding with every step one CUDA-graph replay, over the static INT4 KV cache.

A decode step of a quantized model is dozens of small kernels a layer; launched from Python it is
launch-bound. With the static cache (fireq.nn.attention.make_cache(model, max_len): buffers allocated
once, write position and lengths on the device) a step has fixed shapes and no host state, so it is
captured once in a CUDA graph and replayed for every token:

    dec = GraphDecoder(model, batch_size=1, max_len=2048)
    tokens = dec.generate(input_ids, max_new_tokens=128)   # (B, prompt + 128)

The prompt runs eagerly (prefill), the first decode step eagerly too (it settles every lazy choice:
weight layouts, first-use checks, log2 multipliers), then the step is captured and replayed. Sequences
are unpadded and of one length (no attention mask); sampling is greedy (argmax inside the graph: the
two-launch row argmax of fireq_kernels.argmax, torch.argmax's result in a tenth of its time at a 128K vocabulary).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import FireqError


class GraphDecoder:
    """model: a fireq model on a CUDA device (fireq.load(..., device="cuda")). cache: any transformers cache
    with device-side positions (default: the static INT4 cache of max_len tokens)."""

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, cache=None):
        from .attention import make_cache

        dev = next(model.parameters()).device
        if dev.type != "cuda":
            raise FireqError("GraphDecoder needs the model on a CUDA device")
        self.model = model
        self.max_len = max_len
        self.cache = cache if cache is not None else make_cache(model, max_len)
        self.ids = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((batch_size, 1), dtype=torch.long, device=dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        import inspect

        # only the last position's logits (a prompt's full logits can take gigabytes)
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, position_ids=pos, past_key_values=self.cache, use_cache=True, **self._keep)
        return out.logits[:, -1]

    def _next(self, logits: torch.Tensor) -> None:
        """The greedy tokens of logits (B, V) into self.ids."""
        from fireq_kernels.argmax import argmax_rows_triton

        argmax_rows_triton(logits if logits.stride(-1) == 1 else logits.contiguous(), out=self.ids)

    def _step(self) -> None:
        self._next(self._forward(self.ids, self.pos))
        self.pos.add_(1)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, n) into a reset cache; returns the first new token (B, 1)."""
        b, n = input_ids.shape
        if b != self.ids.shape[0]:
            raise FireqError(f"GraphDecoder was built for batch {self.ids.shape[0]}, got {b}")
        if n >= self.max_len:
            raise FireqError(f"prompt of {n} tokens does not fit max_len={self.max_len}")
        self.cache.reset()
        pos = torch.arange(n, device=input_ids.device).expand(b, n)
        self._next(self._forward(input_ids, pos))
        self.pos.fill_(n)
        return self.ids.clone()

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step (eager the first time, then captured and replayed); returns the new token."""
        if self.graph is None:
            self._step()  # eager: settles every lazy choice before capture
            out = self.ids.clone()
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
                self._step()  # recorded, not run
            torch.cuda.current_stream().wait_stream(s)
            self.graph = g
            return out
        self.graph.replay()
        return self.ids.clone()

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation: (B, n) -> (B, n + max_new_tokens)."""
        if input_ids.shape[1] + max_new_tokens > self.max_len:
            raise FireqError(f"{input_ids.shape[1]} + {max_new_tokens} tokens exceed max_len={self.max_len}")
        out = [input_ids, self.prefill(input_ids)]
        for _ in range(max_new_tokens - 1):
            out.append(self.step())
        return torch.cat(out, dim=1)
