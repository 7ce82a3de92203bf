"""Kernels run on the GPU that holds their tensors.

Triton launches a kernel on the *current* CUDA device, whatever device its tensors are on: a model on
cuda:1 (or a model split over GPUs by a device_map) would otherwise launch on cuda:0 with cuda:1's
pointers. Every public launcher of this package is wrapped by `on_tensor_device`, which makes its first
tensor's device current for the call when it is not already (one integer compare otherwise)."""

from __future__ import annotations

import functools

import torch


def on_tensor_device(fn):
    """fn(x, ...) run with x's CUDA device current (x a tensor; CPU tensors: as is)."""

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        i = x.get_device()
        if i >= 0 and i != torch.cuda.current_device():
            with torch.cuda.device(i):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper
