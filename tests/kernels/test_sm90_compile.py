"""The attention kernels and the GEMM's tiled schedule compile for sm_90 (TMA descriptors, wgmma, inline PTX)
and for sm_89, checked on any machine:
scripts/diag_sass.py drives Triton's JIT with a stand-in driver for that target in a subprocess without the
interpreter. The CPU tests run the kernels in the interpreter, which never sees GPU-only code paths (the
descriptor loads of the staged prefill); this catches a change that would only fail on the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _has_nvidia_tools() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _has_nvidia_tools(), reason="Triton's NVIDIA backend (ptxas) not installed")
@pytest.mark.parametrize("argv", [["staged"], ["staged", "--bias"], ["staged", "--cfg", "64,64,4,2"], ["decode"],
                                  ["swap", "--prefetch", "1"], ["rope"]])
def test_kernels_compile_for_sm90(argv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "diag_sass.py"), *argv], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if "sm_90:" in ln)
    assert "'regs':" in line and "'stack':" in line
    if argv[0] == "rope":  # PyTorch's rounding after every product: nothing contracted into an fma
        assert "ptx fma: 0" in r.stdout


@pytest.mark.skipif(not _has_nvidia_tools(), reason="Triton's NVIDIA backend (ptxas) not installed")
@pytest.mark.parametrize("argv", [["staged"], ["staged", "--bias"], ["decode"], ["gemv"], ["swap"], ["rope"]])
def test_kernels_compile_for_sm89(argv):
    """Ada (sm_89) has FP8 tensor cores but neither tensor-memory descriptors nor wgmma: the kernels take their
    pointer-load paths there (the wrappers ask for sm_90 before building descriptors) and Triton's mma.sync FP8
    MMAs. No such GPU is lent here, so this is the check that the code builds for it. (The rotary kernel's PTX
    has fma.rn.bf16x2 there, LLVM's form of a bf16 multiply (+ -0.0) and add (x 1.0) before sm_90: each still
    one rounding, so the fma-free check above is sm_90's alone.)"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "diag_sass.py"), *argv, "--arch", "89"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if "sm_89:" in ln)
    assert "'regs':" in line and "'stack':" in line
    if argv[0] == "staged":  # Q.K^T as Ada's FP8 MMA
        assert "QMMA" in r.stdout and "E4M3" in r.stdout
