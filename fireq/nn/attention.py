"""W4A8KV4 attention for transformers models: FP8 queries, INT4 K/V, optional post-RoPE key scales.

Hooked in through transformers' attention-function registry under the name "fireq": the model's own
attention module computes q/k/v (quantized linears), applies RoPE and hands the states to
`fireq_attention_forward`, which

1. scales K by the post-RoPE per-channel scales S (if the layer has them) and quantizes K and V to
   INT4 per token per head, unless they come from a FireqKVCache that already did so;
2. scales Q by S^-1 (so Q K^T is unchanged) and quantizes it to FP8 per token per head;
3. runs attention over the dequantized operands (the reference path; the Triton kernel reads the
   packed cache directly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..formats.fp8 import fake_quantize_fp8_rows
from ..formats.kv import KVSpec, QuantizedKV, dequantize_kv, quantize_kv

ATTN_IMPL = "fireq"
_PACKED = "_fireq_packed"  # attribute of the INT4 cache's placeholder keys: (packed K, packed V)
_LENS = "_fireq_lens"  # static cache: (valid length, host int; the kernel's (B,) int32 key lengths and (B,) int32
# query lengths, on the device) of the buffers


@dataclass(frozen=True)
class AttentionQuant:
    kv: KVSpec = KVSpec()
    query_fp8: bool = True


def attach(attn: nn.Module, aq: AttentionQuant, post_scale: torch.Tensor | None = None) -> None:
    """Give an attention module its quantization settings and (optionally) its post-RoPE key scales
    k_post_scale: (H_kv, head_dim) float32, stored in the checkpoint."""
    attn.fireq_attn = aq
    if post_scale is not None:
        attn.register_buffer("k_post_scale", post_scale.float().contiguous())


def _post_scale(attn: nn.Module, s: torch.Tensor, dtype: torch.dtype, rep: int) -> torch.Tensor:
    """k_post_scale (H_kv, D) as a (1, H_kv * rep, 1, D) multiplier in dtype (rep 1: the keys'; the GQA group:
    the queries'), made once and kept: a decode step would otherwise cast (and repeat) it in every layer, two or
    three small kernels. Made again when the buffer is replaced (moved) or written in place (load_state_dict),
    and never kept while torch.compile traces."""
    if torch.compiler.is_compiling():
        return s.repeat_interleave(rep, dim=0).to(dtype)[None, :, None, :]
    memo = attn.__dict__.setdefault("_fireq_post_scale", {})
    got = memo.get((rep, dtype))
    if got is None or got[0] is not s or got[1] != s._version:  # (the buffer itself, and its in-place writes)
        got = memo[(rep, dtype)] = (s, s._version, s.repeat_interleave(rep, dim=0).to(dtype)[None, :, None, :])
    return got[2]


def _scale_keys(attn: nn.Module, key: torch.Tensor) -> torch.Tensor:
    s = getattr(attn, "k_post_scale", None)
    return key if s is None else key * _post_scale(attn, s, key.dtype, 1)


def _unscale_queries(attn: nn.Module, query: torch.Tensor) -> torch.Tensor:
    s = getattr(attn, "k_post_scale", None)
    return query if s is None else query / _post_scale(attn, s, query.dtype, query.shape[1] // s.shape[0])


def fireq_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, **kwargs):
    """query: (B, Hq, Lq, D); key, value: (B, Hkv, Lk, D), post-RoPE. Returns ((B, Lq, Hq, D), None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    aq: AttentionQuant | None = getattr(module, "fireq_attn", None)
    if aq is not None and _kernel_ok(module, query, key, attention_mask, aq, kwargs):
        return _kernel_forward(module, query, key, value, scaling, aq, kwargs)
    if aq is not None:
        packed = getattr(key, _PACKED, None)
        if packed is not None:  # the INT4 cache handed over its codes: dequantize them here, on this path only
            qk, qv = packed
            lens = getattr(key, _LENS, None)
            if lens is not None:  # static buffers: the valid tokens (eager use: the host length is current)
                qk, qv = (QuantizedKV(t.packed[:, :, :lens[0]], t.scales[:, :, :lens[0]],
                                      None if t.zeros is None else t.zeros[:, :, :lens[0]]) for t in (qk, qv))
            key = dequantize_kv(qk, key.shape[-1], aq.kv, key.dtype)
            value = dequantize_kv(qv, value.shape[-1], aq.kv, value.dtype)
        else:
            key = _scale_keys(module, key)
            if aq.kv.bits < 16:
                key = dequantize_kv(quantize_kv(key, aq.kv), key.shape[-1], aq.kv, key.dtype)
                value = dequantize_kv(quantize_kv(value, aq.kv), value.shape[-1], aq.kv, value.dtype)
        query = _unscale_queries(module, query)
        if aq.query_fp8:
            query = fake_quantize_fp8_rows(query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _kernel_ok(module, query, key, attention_mask, aq: AttentionQuant, kwargs) -> bool:
    """The Triton kernel serves CUDA FP8 GPUs when the mask is plain causal (no padding: transformers
    passes None then) and K/V are INT4 with >= 32-channel groups; anything else takes the reference path.
    The static cache's sequences are unpadded by contract (fireq.nn.graphs): whatever causal or sliding
    mask transformers builds for it, the kernel applies from the device-side lengths."""
    static = getattr(key, _LENS, None) is not None
    if not query.is_cuda or (attention_mask is not None and not static) or aq.kv.bits != 4 or not aq.query_fp8:
        return False
    if kwargs.get("softcap") is not None or query.shape[-1] % 32 or aq.kv.group(query.shape[-1]) < 32:
        return False
    from fireq_kernels.ops import triton_fp8_capable

    return triton_fp8_capable(query.device)


_KV_WRITE_OK: dict = {}


def _triton_kv_write_ok(x: torch.Tensor, spec: KVSpec) -> bool:
    """Whether the Triton cache write serves x. The kernel is meant to be bit-identical to quantize_kv;
    its first use per (device, spec) checks that on the data at hand and, if it is not, fireq falls back
    to PyTorch with a warning."""
    from fireq_kernels.ops import triton_fp8_capable

    d, g = x.shape[-1], spec.group(x.shape[-1])
    if not (triton_fp8_capable(x.device) and not d & (d - 1) and not g & (g - 1)):
        return False
    key = (x.device, spec, d)
    if key not in _KV_WRITE_OK:
        from fireq_kernels.kv_write import quantize_kv_triton

        got, ref = quantize_kv_triton(x, spec), quantize_kv(x, spec)
        same = torch.equal(got.packed, ref.packed) and torch.equal(got.scales.float(), ref.scales.float()) and (
            got.zeros is None or torch.equal(got.zeros, ref.zeros))
        _KV_WRITE_OK[key] = same
        if not same:
            import warnings

            warnings.warn("fireq: the Triton KV cache write differs from the format's quantizer on this GPU; "
                          "using the PyTorch one")
    return _KV_WRITE_OK[key]


def _quantize_kv(x: torch.Tensor, spec: KVSpec) -> QuantizedKV:
    """The cache write: one Triton kernel on an FP8 GPU (_triton_kv_write_ok), else PyTorch."""
    if _triton_kv_write_ok(x, spec):
        from fireq_kernels.kv_write import quantize_kv_triton

        return quantize_kv_triton(x, spec)
    return quantize_kv(x, spec)


def _kernel_forward(module, query, key, value, scaling, aq: AttentionQuant, kwargs):
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    from ..formats.fp8 import quantize_fp8_rows

    packed = getattr(key, _PACKED, None)
    if packed is None:  # no INT4 cache: quantize this call's K and V
        qk = _quantize_kv(_scale_keys(module, key), aq.kv)
        qv = _quantize_kv(value, aq.kv)
    else:
        qk, qv = packed
    q = _unscale_queries(module, query)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or 0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = getattr(module, "is_causal", True)
    if torch.compiler.is_compiling():  # traced: PyTorch quantizer and the torch.library op
        from fireq_kernels.ops import kv4_attention_op

        q8, qs = quantize_fp8_rows(q)
        out = kv4_attention_op(q8, qs.squeeze(-1), qk.packed, qk.scales, qv.packed, qv.scales, scale, causal,
                               int(window), qk.zeros, qv.zeros, None, None, query.dtype)
        return out.transpose(1, 2).contiguous(), None
    from fireq_kernels.gemm_w4a8 import quantize_fp8_rows_triton, taken_fp8

    bsz, hq, lq, d = query.shape
    pre = taken_fp8(q, (bsz * hq * lq, d)) if q.is_contiguous() else None  # by the rotary embedding (fireq.nn.rope)
    if pre is not None:
        q8, qs = pre
    else:  # one Triton launch (the PyTorch quantizer is several), the same values
        q8, qs = quantize_fp8_rows_triton(q.reshape(-1, q.shape[-1]))
    lens_q = lens_k = None
    lens = getattr(key, _LENS, None)
    if lens is not None:  # static cache: whole buffers, valid lengths on the device (kept by the cache)
        lens_k, lens_q = lens[1], lens[2]
    # written straight into the (B, Lq, Hq, D) layout the model wants next: no transpose copy
    out = torch.empty((bsz, lq, hq, d), dtype=query.dtype, device=query.device)
    kv4_attention_triton(q8.view(q.shape), qs.view(bsz, hq, lq), qk.packed, qk.scales, qv.packed, qv.scales, scale,
                         causal=causal, window=int(window), k_zero=qk.zeros, v_zero=qv.zeros, out_dtype=query.dtype,
                         seqlens_q=lens_q, seqlens_k=lens_k, out=out.transpose(1, 2))
    return out, None


def register() -> None:
    """Register "fireq" with transformers' attention and mask registries (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPL, fireq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)


def _write(dst: QuantizedKV, start: int, src: QuantizedKV) -> None:
    """Copy src's tokens into dst's buffers at token positions start.. (dim 2), in place."""
    stop = start + src.packed.shape[2]
    dst.packed[:, :, start:stop] = src.packed
    dst.scales[:, :, start:stop] = src.scales
    if src.zeros is not None:
        dst.zeros[:, :, start:stop] = src.zeros


class _StaticLengths:
    """A static cache's device-side lengths: the write position len_dev (() int64), the attention kernel's (B,)
    int32 key lengths lens32 and its decode query lengths lq32 by (batch, tokens)."""

    def __init__(self):
        self.len_dev: torch.Tensor | None = None
        self.lens32: torch.Tensor | None = None
        self.lq32: dict = {}


def _make_layer_class():
    from transformers.cache_utils import DynamicLayer

    class FireqKVLayer(DynamicLayer):
        """One layer's INT4 KV cache: packed codes (B, H, L, D/2) uint8, scales (B, H, L, D/group) and
        zero points, in buffers preallocated with room to grow (doubling), written in place: a decode
        step writes its own token, nothing else. `update` hands attention placeholders of the right
        shape that carry the packed views; the Triton kernel reads the codes, the reference path
        dequantizes them (fireq_attention_forward), so no float copy of the cache is made per step."""

        is_croppable = False
        GROW = 16  # capacity granularity (tokens)

        def __init__(self, attn: nn.Module, max_len: int | None = None):
            super().__init__()
            self.attn = attn
            self.cumulative_length = 0
            self._buf: tuple[QuantizedKV, QuantizedKV] | None = None
            # static mode (max_len): buffers of max_len tokens allocated once, the write position kept on
            # the device, attention over the whole buffers with device-side lengths: a step has fixed
            # shapes and no host state, so it can be captured in a CUDA graph
            self.max_len = max_len
            # the device-side lengths, shared by the layers of one cache (make_cache): every layer writes at
            # len_dev, the first layer of a step moves the attention kernel's (B,) int32 key lengths (lens32)
            # on, the last moves len_dev on: two in-place adds a step, not two a layer. A layer made on its own
            # is its own first and last.
            self._lens_state = _StaticLengths()
            self._first = self._last = True

        @property
        def _len_dev(self) -> torch.Tensor | None:
            """The write position (the valid length once every layer of the step has written)."""
            return self._lens_state.len_dev

        def lazy_initialization(self, key_states, value_states):
            self.device = key_states.device
            self.dtype = key_states.dtype
            self.head_dim = key_states.shape[-1]
            self.is_initialized = True

        @staticmethod
        def _view(buf: QuantizedKV, n: int) -> QuantizedKV:
            z = None if buf.zeros is None else buf.zeros[:, :, :n]
            return QuantizedKV(buf.packed[:, :, :n], buf.scales[:, :, :n], z)

        @property
        def qk(self) -> QuantizedKV | None:
            return None if self._buf is None else self._view(self._buf[0], self.cumulative_length)

        @property
        def qv(self) -> QuantizedKV | None:
            return None if self._buf is None else self._view(self._buf[1], self.cumulative_length)

        def _reserve(self, new: QuantizedKV, need: int, exact: bool = False) -> None:
            """Make room for `need` tokens (copying what is there into doubled buffers when full)."""
            cap = 0 if self._buf is None else self._buf[0].packed.shape[2]
            if need <= cap:
                return
            cap = need if exact else -(-max(need, 2 * cap) // self.GROW) * self.GROW

            def alloc(t):
                return None if t is None else t.new_empty((*t.shape[:2], cap, t.shape[3]))

            bufs = []
            for i in range(2):
                b = QuantizedKV(alloc(new.packed), alloc(new.scales), alloc(new.zeros))
                if self._buf is not None:
                    _write(b, 0, self._view(self._buf[i], self.cumulative_length))
                bufs.append(b)
            self._buf = (bufs[0], bufs[1])

        def _update_static(self, key_states, value_states):
            spec = self.attn.fireq_attn.kv
            keys = _scale_keys(self.attn, key_states)
            n = key_states.shape[-2]
            if self.cumulative_length + n > self.max_len:
                raise ValueError(f"fireq: the static INT4 cache holds {self.max_len} tokens; "
                                 f"{self.cumulative_length + n} needed")
            st = self._lens_state
            if self._buf is None:  # buffers shaped and typed like one quantized token
                self._reserve(quantize_kv(keys[:, :, :1], spec), self.max_len, exact=True)
            if st.len_dev is None:
                st.len_dev = torch.zeros((), dtype=torch.int64, device=key_states.device)
            if _triton_kv_write_ok(keys, spec):  # one launch each for K and V, straight into the buffers
                from fireq_kernels.kv_write import write_kv_triton

                for buf, x in zip(self._buf, (keys, value_states)):
                    write_kv_triton(x, spec, buf, st.len_dev)
            else:
                new_k, new_v = quantize_kv(keys, spec), quantize_kv(value_states, spec)
                pos = torch.arange(n, device=key_states.device) + st.len_dev
                for buf, new in zip(self._buf, (new_k, new_v)):
                    for dst, src in ((buf.packed, new.packed), (buf.scales, new.scales), (buf.zeros, new.zeros)):
                        if src is not None:  # (FP8 scales as bytes: index_copy_ has no FP8 kernels)
                            bytes_ = src.dtype.itemsize == 1
                            (dst.view(torch.uint8) if bytes_ else dst).index_copy_(
                                2, pos, src.view(torch.uint8) if bytes_ else src)
            self.cumulative_length += n  # host mirror (eager use; a replayed graph does not update it)
            b, h, _, d = key_states.shape
            if self._first:  # the key lengths after this step's tokens, for every layer's attention
                if st.lens32 is None or st.lens32.shape[0] != b:
                    st.lens32 = (st.len_dev + n).to(torch.int32).expand(b).contiguous()
                else:
                    st.lens32.add_(n)
            if self._last:
                st.len_dev.add_(n)
            lq32 = st.lq32.get((b, n))
            if lq32 is None:  # kept for decode (n = 1: a captured step reads it); a prompt's made afresh
                lq32 = torch.full((b,), n, dtype=torch.int32, device=key_states.device)
                if n == 1:
                    st.lq32[(b, n)] = lq32
            k = key_states.new_empty((1, 1, 1, 1)).expand(b, h, self.max_len, d)
            v = value_states.new_empty((1, 1, 1, 1)).expand(b, h, self.max_len, d)
            setattr(k, _PACKED, (self._buf[0], self._buf[1]))
            setattr(k, _LENS, (self.cumulative_length, st.lens32, lq32))
            return k, v

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self.max_len is not None:
                return self._update_static(key_states, value_states)
            spec = self.attn.fireq_attn.kv
            new_k = _quantize_kv(_scale_keys(self.attn, key_states), spec)
            new_v = _quantize_kv(value_states, spec)
            n0, n = self.cumulative_length, key_states.shape[-2]
            self._reserve(new_k, n0 + n)
            for buf, new in zip(self._buf, (new_k, new_v)):
                _write(buf, n0, new)
            self.cumulative_length = n0 + n
            b, h, _, d = key_states.shape
            # placeholders: right shape, no storage behind them; attention reads the packed views
            k = key_states.new_empty((1, 1, 1, 1)).expand(b, h, self.cumulative_length, d)
            v = value_states.new_empty((1, 1, 1, 1)).expand(b, h, self.cumulative_length, d)
            setattr(k, _PACKED, (self.qk, self.qv))
            return k, v

        def get_seq_length(self) -> int:
            return self.cumulative_length

        def reset(self) -> None:
            st = self._lens_state
            if self.max_len is not None and st.len_dev is not None:  # static: keep the buffers' addresses
                st.len_dev.zero_()
                if st.lens32 is not None:
                    st.lens32.zero_()
                self.cumulative_length = 0
                return
            self._buf = None
            self.cumulative_length = 0
            self.is_initialized = False

        def reorder_cache(self, beam_idx):
            if self._buf is None:
                return
            for qkv in self._buf:
                idx = beam_idx.to(qkv.packed.device)
                qkv.packed, qkv.scales = qkv.packed[idx], qkv.scales[idx]
                if qkv.zeros is not None:
                    qkv.zeros = qkv.zeros[idx]

        def nbytes(self) -> int:
            """Bytes of the cached tokens (the buffers may hold up to twice as many slots)."""
            return sum(t.numel() * t.element_size() for q in (self.qk, self.qv) if q is not None
                       for t in (q.packed, q.scales, q.zeros) if t is not None)

    return FireqKVLayer


def static_layers(cache) -> list | None:
    """The layers of a static INT4 cache made by make_cache(model, max_len), else None."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(getattr(x, "_lens_state", None) is not None and x.max_len for x in layers):
        return None
    return list(layers)


def set_static_length(cache, n: int) -> None:
    """Declare the first n tokens of a static INT4 cache valid (on the host and the device), whatever was
    written after them: a prompt padded to a captured length leaves its pad tokens there, and decoding then
    goes on at position n, overwriting them (GraphDecoder's graphed prefill)."""
    layers = static_layers(cache)
    if layers is None:
        raise TypeError("set_static_length needs a static cache from make_cache(model, max_len)")
    if not 0 <= n <= layers[0].max_len:
        raise ValueError(f"length {n} outside the cache's 0..{layers[0].max_len}")
    for x in layers:
        x.cumulative_length = n
    for st in {id(x._lens_state): x._lens_state for x in layers}.values():  # one a device
        if st.len_dev is not None:
            st.len_dev.fill_(n)
        if st.lens32 is not None:
            st.lens32.fill_(n)


def make_cache(model: nn.Module, max_len: int | None = None):
    """A transformers Cache whose layers store K and V as packed INT4 (fireq's format).

    max_len: a static cache of max_len tokens a sequence (buffers allocated at the first update, write
    position on the device, fixed shapes: decode steps can be captured in CUDA graphs, see
    fireq.nn.graphs). Without it the buffers grow as needed."""
    from transformers.cache_utils import Cache

    from ..models.registry import decoder_layers

    layer_cls = _make_layer_class()
    attns = [layer.self_attn for layer in decoder_layers(model)]
    layers = [layer_cls(attn, max_len) for attn in attns]
    # one set of device-side lengths (static mode) a device, moved on once a step: a model split over GPUs
    # (a device_map) keeps one on each, the first and last of its layers there moving it
    by_device: dict = {}
    for attn, layer in zip(attns, layers):
        by_device.setdefault(_module_device(attn), []).append(layer)
    for group in by_device.values():
        for i, layer in enumerate(group):
            layer._lens_state = group[0]._lens_state
            layer._first, layer._last = i == 0, i == len(group) - 1
    return Cache(layers=layers)


def _module_device(m: nn.Module) -> torch.device | None:
    """The device of a module's first parameter (or buffer), None without either."""
    for t in m.parameters():
        return t.device
    for t in m.buffers():
        return t.device
    return None
