"""The attention kernels and the GEMM's tiled schedule compile for sm_90 (TMA descriptors, wgmma, inline PTX), checked on any machine:
scripts/diag_sass.py drives Triton's JIT with a stand-in sm_90 driver in a subprocess without the
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
