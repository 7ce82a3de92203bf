"""Which GPUs take the Triton kernels: FP8 tensor cores (sm_89+) do; older GPUs (an A100, sm_80) take the
PyTorch reference path, with one warning for the process."""

from __future__ import annotations

import warnings

import torch

from fireq_kernels import ops


def _ask(monkeypatch, capability, index):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        answers = [ops.triton_fp8_capable(torch.device("cuda", index)) for _ in range(3)]
    return answers, [str(w.message) for w in caught]


def test_fp8_capability_and_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_capable", {})
    monkeypatch.setattr(ops, "_warned", False)
    assert _ask(monkeypatch, (9, 0), 0) == ([True] * 3, [])
    assert _ask(monkeypatch, (8, 9), 1) == ([True] * 3, [])
    answers, said = _ask(monkeypatch, (8, 0), 2)
    assert answers == [False] * 3
    assert len(said) == 1 and "sm_89" in said[0] and "reference path" in said[0]
    assert _ask(monkeypatch, (7, 5), 3) == ([False] * 3, [])  # said once a process
    assert ops.triton_fp8_capable(torch.device("cpu")) is False
