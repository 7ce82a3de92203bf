"""The rotary embedding of a model's queries and keys as one Triton launch on the GPU (fireq_kernels.rope),
with the attention modules' code untouched.

transformers' attention layers call their modeling module's `apply_rotary_pos_emb(q, k, cos, sin)`: ten small
PyTorch kernels a layer at decode. `patch_rotary(model)` replaces that function in the modeling module of
each of the model's attention classes whose function computes what `reference.rope_ref` computes (checked on
a probe on the CPU, in BF16 and FP16, before anything is replaced). The replacement runs the Triton kernel for
16-bit CUDA tensors on FP8-capable GPUs and calls the original in every other case (other devices and dtypes,
extra arguments, torch.compile tracing). Its first call on a device and dtype also runs the original and
compares: if the two ever differ by a bit, it warns once and calls the original from then on. The kernel
rounds as PyTorch does, so models give the same outputs either way. It also writes the rotated queries' FP8
rows and scales (what the INT4-KV attention would quantize them to) and hangs them on q_embed (attribute
FP8_ATTR, with its _version then): the attention takes them when no post-RoPE scale divides the queries first
and the tensor was not written since, and quantizes as before otherwise.

The replaced function is the modeling module's own (every model of that architecture in the process uses it;
the results are the same bit for bit): `unpatch_rotary()` restores the originals.
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch
from torch import nn

from fireq_kernels.gemm_w4a8 import FP8_ATTR
from fireq_kernels.reference import rope_ref

_NAME = "apply_rotary_pos_emb"
_ORIGINALS: dict = {}  # modeling module -> its original function
_CHECKED: dict = {}  # (device, dtype) -> True (the kernel equals the original) / False


def _same_function(fn) -> bool:
    """Whether fn(q, k, cos, sin) equals rope_ref on random probes (BF16 and FP16, GQA, B = 2)."""
    g = torch.Generator().manual_seed(0)
    for dt in (torch.bfloat16, torch.float16):
        q = torch.randn(2, 4, 5, 16, generator=g).to(dt)
        k = torch.randn(2, 2, 5, 16, generator=g).to(dt)
        ang = torch.randn(2, 5, 16, generator=g)
        cos, sin = ang.cos().to(dt), ang.sin().to(dt)
        try:
            got = fn(q, k, cos, sin)
        except Exception:  # noqa: BLE001 (another signature: not this formula)
            return False
        want = rope_ref(q, k, cos, sin)
        if not (isinstance(got, tuple) and len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))):
            return False
    return True


def _fast_ok(q, k, cos, sin, args, kwargs) -> bool:
    from fireq_kernels.ops import triton_fp8_capable

    return (not args and all(n == "unsqueeze_dim" and v == 1 for n, v in kwargs.items())
            and q.is_cuda and not torch.compiler.is_compiling() and triton_fp8_capable(q.device)
            and q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and q.dtype in (torch.bfloat16, torch.float16)
            and k.dtype == cos.dtype == sin.dtype == q.dtype and q.shape[-1] & (q.shape[-1] - 1) == 0
            and cos.shape[1:] == q.shape[2:] and cos.shape[0] in (1, q.shape[0]) and sin.shape == cos.shape
            and k.shape[0] == q.shape[0] and k.shape[2:] == q.shape[2:]
            and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1)


def _wrap(orig):
    @functools.wraps(orig)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not _fast_ok(q, k, cos, sin, args, kwargs):
            return orig(q, k, cos, sin, *args, **kwargs)
        from fireq_kernels.rope import rope_triton

        key = (q.device, q.dtype)
        ok = _CHECKED.get(key)
        if ok is None:
            if torch.cuda.is_current_stream_capturing():  # no comparison inside a graph capture
                return orig(q, k, cos, sin, *args, **kwargs)
            from fireq_kernels.gemm_w4a8 import quantize_fp8_rows_triton

            qo, ko, q8, qs = rope_triton(q, k, cos, sin, fp8=True)
            want = orig(q, k, cos, sin)
            w8, ws = quantize_fp8_rows_triton(want[0].reshape(-1, want[0].shape[-1]))
            ok = _CHECKED[key] = (torch.equal(qo, want[0]) and torch.equal(ko, want[1])
                                  and torch.equal(q8.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(qs, ws))
            if not ok:
                warnings.warn(f"fireq: the Triton rotary embedding differs from {orig.__module__}.{_NAME} on "
                              f"{q.device} in {q.dtype}; using the original")
            return want
        if not ok:
            return orig(q, k, cos, sin, *args, **kwargs)
        qo, ko, q8, qs = rope_triton(q, k, cos, sin, fp8=True)
        setattr(qo, FP8_ATTR, (q8, qs, qo._version))  # the attention's FP8 queries (fireq.nn.attention)
        return qo, ko

    apply_rotary_pos_emb.__fireq_original__ = orig
    return apply_rotary_pos_emb


def patch_rotary(model: nn.Module) -> int:
    """Replace apply_rotary_pos_emb in the modeling module of each attention class of model whose function is
    the Llama-family formula (see the module docstring). Returns how many of model's modeling modules run the
    replacement (patched now or before)."""
    from ..models.registry import decoder_layers

    mods = set()
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        mod = sys.modules.get(type(attn).__module__) if attn is not None else None
        fn = getattr(mod, _NAME, None)
        if fn is None:
            continue
        if mod not in _ORIGINALS:
            if not _same_function(fn):
                continue
            _ORIGINALS[mod] = fn
            setattr(mod, _NAME, _wrap(fn))
        mods.add(mod)
    return len(mods)


def unpatch_rotary() -> None:
    """Put every patched modeling module's original apply_rotary_pos_emb back."""
    for mod, fn in list(_ORIGINALS.items()):
        setattr(mod, _NAME, fn)
        del _ORIGINALS[mod]
    _CHECKED.clear()
