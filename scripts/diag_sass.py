"""Compile fireq's attention kernels and the one-token GEMV for sm_90 (or sm_89) on a machine without a GPU and
report what the compiler made of them: registers a thread, spill stack, shared memory, and the SASS
instruction mix (of the whole kernel and of its longest straight-line block, which is the key loop's body).
For checking a kernel change (spills, layout conversions, byte loads) before spending GPU time on it.

    python scripts/diag_sass.py staged --cfg 64,128,4,2
    python scripts/diag_sass.py staged --cfg 64,128,4,2 --bias
    python scripts/diag_sass.py decode --dump /tmp/decode      # also writes .ttgir, .ptx, .sass there
    DIAG_K_SYM=0 python scripts/diag_sass.py decode            # DIAG_K_<NAME>: a decode constexpr overridden
    python scripts/diag_sass.py gemv --cfg 8,2048,4,1
    python scripts/diag_sass.py rope                             # the one-launch rotary embedding (no fma)
    python scripts/diag_sass.py swap --prefetch 1                # the GEMM's tiled (SWAP) schedule at M = 16
    DIAG_UNROLL=2 python scripts/diag_sass.py swap               # ... with its K loop unrolled by 2
    python scripts/diag_sass.py staged --arch 89                 # Ada: pointer loads, mma.sync FP8 MMAs

Needs Triton's NVIDIA backend (its ptxas, cuobjdump and nvdisasm come with the wheel); nothing is launched.
The triton version decides the code: the GPU machine runs 3.6 (pip install triton==3.6.0 into a venv to
see exactly its code). The JIT is driven by a stand-in driver that reports an sm_90 (--arch: other) target.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ARCH = 90  # the compute capability compiled for (--arch)


def _fake_driver():
    """Make Triton's JIT compile for sm_ARCH without a CUDA device."""
    import triton.backends.nvidia.driver as nv
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    class Sm90(nv.CudaDriver):
        def __init__(self):  # no CUDA runtime calls
            self.utils = None
            self.launcher_cls = nv.CudaLauncher
            self.get_current_device = lambda: 0
            self.set_current_device = lambda i: None
            self.get_current_stream = lambda i=None: 0

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

        @staticmethod
        def is_active():
            return True

    driver.set_active(Sm90())


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cubin_file(kernel) -> str:
    f = tempfile.NamedTemporaryFile(suffix=".cubin", delete=False)
    f.write(kernel.asm["cubin"])
    f.close()
    return f.name


def usage(kernel) -> dict:
    """Registers, spill stack and shared memory of a compiled kernel."""
    out = subprocess.run([_tool("cuobjdump"), "-res-usage", _cubin_file(kernel)], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    return dict(regs=int(m.group(1)), stack=int(m.group(2)), shared=kernel.metadata.shared)


def sass(kernel) -> str:
    return subprocess.run([_tool("nvdisasm"), "-c", _cubin_file(kernel)], capture_output=True, text=True).stdout


def opcode_mix(lines: list[str]) -> collections.Counter:
    ops = collections.Counter()
    for ln in lines:
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z0-9_.]+)", ln)
        if m:
            ops[m.group(1)] += 1
    return ops


def longest_block(text: str) -> list[str]:
    """The SASS lines of the longest stretch between two labels (the hot loop body, in these kernels)."""
    blocks, cur = [], []
    for ln in text.splitlines():
        if re.match(r"\.L_x_\d+:", ln.strip()):
            blocks.append(cur)
            cur = []
        else:
            cur.append(ln)
    blocks.append(cur)
    return max(blocks, key=lambda b: sum(opcode_mix(b).values()))


def staged(bm, bn, warps, stages, bias=False, ks_tma=True, S=8192):
    """_attn_fwd_staged as kv4_attention_triton launches it for B = 1, 32 heads, d = 128, causal, FP8 scales."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fireq_kernels import attention_kv4 as A

    h, d = 32, 128
    q8 = torch.empty(1, h, S, d, dtype=torch.float8_e4m3fn)
    qs = torch.empty(1, h, S)
    k8 = torch.empty(1, h, S, d, dtype=torch.float8_e4m3fn)
    ks = torch.empty(1, h, S, 1, dtype=torch.float8_e4m3fn)
    vo = torch.empty(1, h, S, d, dtype=torch.float16)
    out = torch.empty(1, h, S, d, dtype=torch.bfloat16)
    tma = ARCH >= 90  # the wrapper's choice: tensor-memory descriptors on sm_90+, pointer loads below
    ks_tma = ks_tma and not bias and tma
    k8d = TensorDescriptor(k8, [h, S, d], [S * d, d, 1], [1, bn, d]) if tma else k8
    vod = TensorDescriptor(vo, [h, S, d], [S * d, d, 1], [1, bn, d]) if tma else vo
    ksa = TensorDescriptor(torch.empty(1, h, S, dtype=torch.float16), [h, S], [S, 1], [1, bn]) if ks_tma else ks
    qb = torch.empty(1, h, S, 2)
    kbm = torch.empty(1, 1, S, 16, dtype=torch.bfloat16)
    args = (q8, qs, k8d, ksa, vod, ks, qs, qb, kbm, out, qs, qs, S, S, 0.1, 0,
            *q8.stride()[:3], qs.stride(0), qs.stride(1), *ks.stride()[:3], *vo.stride(),
            *qb.stride()[:3], kbm.stride(0), 0, kbm.stride(2), *out.stride()[:3])
    kw = dict(HQ=h, HKV=h, D=d, R=16, HAS_BIAS=bias, CAUSAL=True, RT=2 if bias else 0, BM=bm, BN=bn,
              HAS_LENS=False, PV_FP8=False, EXACT_ROUND=False, TMA=tma, BIAS_MMA=bias, BIAS_BF16=bias,
              V_SCALED=True, KS_TMA=ks_tma, KS_PREFETCH=A.STAGED_KS_PREFETCH, num_warps=warps, num_stages=stages)
    return A._attn_fwd_staged.warmup(*args, grid=(1,), **kw)


def _constexpr_overrides() -> dict:
    """DIAG_K_<NAME>=<int> in the environment: the decode kernel's constexpr NAME set to that value (e.g.
    DIAG_K_SYM=0 compiles the asymmetric kernel), for comparing variants without editing the script."""
    return {name[len("DIAG_K_"):]: int(value) for name, value in os.environ.items() if name.startswith("DIAG_K_")}


def decode(bm, bn, warps, stages, splits=8, L=131072, B=8, tma=None):
    """_attn_fwd as kv4_attention_triton's decode default launches it: 32 query / 8 KV heads, d = 128, one
    query, symmetric INT4 cache with FP8 scales, split along the keys; the code tiles by descriptors as the
    wrapper's switches say (tma=None) or as given."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from fireq_kernels import attention_kv4 as A
    from fireq_kernels.int4cvt import use_asm

    hq, hkv, d = 32, 8, 128
    q8 = torch.empty(B, hq, 1, d, dtype=torch.float8_e4m3fn)
    qs = torch.empty(B, hq, 1)
    k = torch.empty(B, hkv, L, d // 2, dtype=torch.uint8)
    ks = torch.empty(B, hkv, L, 1, dtype=torch.float8_e4m3fn)
    part = torch.empty(B, hq, 1, splits, d)
    lse = torch.empty(B, hq, 1, splits)
    if tma is None:
        tma = A.UNSTAGED_TMA and A.UNSTAGED_TMA_SYM and ARCH >= 90
    kd = TensorDescriptor(k, [B * hkv, L, d // 2], [L * d // 2, d // 2, 1], [1, bn, d // 2]) if tma else k
    kz = torch.empty(B, hkv, L, 1, dtype=torch.uint8)  # zero points (asymmetric: DIAG_K_SYM=0)
    args = (q8, qs, kd, ks, kz, kd, ks, kz, qs, qs, part, lse, qs, qs, 1, L, 0.1, 0,
            *q8.stride()[:3], qs.stride(0), qs.stride(1), *k.stride()[:3], *ks.stride()[:3],
            0, 0, 0, 0, 0, 0, *part.stride()[:4])
    kw = dict(HQ=hq, HKV=hkv, D=d, G=d, R=16, SYM=True, HAS_BIAS=False, CAUSAL=True, SPLITS=splits, RT=0, BM=bm,
              BN=bn, HAS_LENS=False, ASM=use_asm(), PV_FP8=False, EXACT_ROUND=False, TMA=tma,
              QK_F16=A.DECODE_QK_F16, PREFETCH=A.UNSTAGED_PREFETCH, num_warps=warps, num_stages=stages)
    kw.update(_constexpr_overrides())
    return A._attn_fwd.warmup(*args, grid=(1,), **kw)


def gemv(bn, bk, warps, stages, n=4096, k=4096, group=128, layout_block=128):
    """_w4a8_gemv_kernel (the decode GEMM for one token) as _launch_gemv launches it: INT4 (N, K) weights in
    the kernel layout of layout_block-channel blocks, g128 FP8 scales, one split."""
    from fireq_kernels import gemm_w4a8 as G
    from fireq_kernels.int4cvt import use_asm

    xq = torch.empty(1, k, dtype=torch.float8_e4m3fn)
    xs = torch.empty(1)
    w = torch.empty(n, k // 2, dtype=torch.uint8)
    ws = torch.empty(n, k // group, dtype=torch.float8_e4m3fn)
    out = torch.empty(1, n, dtype=torch.bfloat16)
    cnt = torch.empty(n // bn, dtype=torch.int32)
    args = (xq, xs, w, ws, xs, out, out, cnt, xs, n, k, 1.0, 1.0, w.stride(0), ws.stride(0))
    kw = dict(GROUP=group, PER_CHANNEL=False, HAS_BIAS=False, BN=bn, BK=bk, SPLIT_K=1, HALF_LB=layout_block,
              ASM=use_asm(), EPI=0, HAS_RES=False, num_warps=warps, num_stages=stages)
    return G._w4a8_gemv_kernel.warmup(*args, grid=(1,), **kw)


def swap(bm, bn, bk, warps, stages, split=4, m=16, n=4096, k=4096, group=128, prefetch=None):
    """_w4a8_gemm_kernel's SWAP schedule (the decode GEMM for 2-64 tokens) as w4a8_gemm_triton launches it:
    INT4 (N, K) weights in the kernel layout of BK-channel blocks, g128 FP8 scales, split-K summed in the
    kernel; the group scales one tile ahead as GEMM_SCALE_PREFETCH says (prefetch=None) or as given."""
    from fireq_kernels import gemm_w4a8 as G
    from fireq_kernels.int4cvt import use_asm

    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    xs = torch.empty(m)
    w = torch.empty(n, k // 2, dtype=torch.uint8)
    ws = torch.empty(n, k // group, dtype=torch.float8_e4m3fn)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    part = torch.empty(split, m, n)
    cnt = torch.empty(n // bn, dtype=torch.int32)
    args = (xq, xs, w, ws, xs, out, part, cnt, xs, m, n, k, 1.0, 1.0, xq.stride(0), w.stride(0), ws.stride(0),
            out.stride(0), 0)
    kw = dict(GROUP=group, PER_CHANNEL=False, HAS_BIAS=False, BM=bm, BN=bn, BK=bk, SPLIT_K=split, GROUP_M=8,
              SWAP=True, UNPACK_DUP=False, PRECISE_ACC=None, DEQ16=False, FUSED_SPLITK=split > 1, HALF=True,
              ASM=use_asm(), EPI=0, HAS_RES=False, PERSIST=0, TMA=False,
              SCALE_PREFETCH=G.GEMM_SCALE_PREFETCH if prefetch is None else prefetch,
              UNROLL=int(os.environ.get("DIAG_UNROLL", "1")), num_warps=warps,
              num_stages=stages)
    return G._w4a8_gemm_kernel.warmup(*args, grid=(1,), **kw)


def rope(bh, d, warps, _unused=0, hq=32, hk=8):
    """_rope_kernel (the one-launch rotary embedding of q and k) as rope_triton launches it at decode: B = 1,
    one token, BF16, FMA contraction off, with the queries' FP8 quantization (as fireq.nn.rope runs it)."""
    from fireq_kernels import rope as R

    q = torch.empty(1, hq, 1, d, dtype=torch.bfloat16)
    k = torch.empty(1, hk, 1, d, dtype=torch.bfloat16)
    cos = torch.empty(1, 1, d, dtype=torch.bfloat16)
    q8 = torch.empty(hq, d, dtype=torch.float8_e4m3fn)
    qs = torch.empty(hq, 1)
    return R._rope_kernel.warmup(q, k, q, k, cos, cos, q8, qs, hq, hk, 1, *q.stride()[:3], *k.stride()[:3], 0, d, 0,
                                 d, D=d, BH=bh, BF16_RNE=False, Q8=True, EXACT_ROUND=False, num_warps=warps,
                                 enable_fp_fusion=False, grid=(1,))


def report(name: str, kernel, top: int = 16) -> str:
    """Print a compiled kernel's resources and the instruction mix of the whole kernel and of its longest
    block; returns its SASS."""
    import triton

    text = sass(kernel)
    print(f"{name} triton {triton.__version__} sm_{ARCH}: {usage(kernel)}")
    whole, body = opcode_mix(text.splitlines()), opcode_mix(longest_block(text))
    for title, ops in (("whole kernel", whole), ("longest block", body)):
        print(f"  {title}: {sum(ops.values())} instructions;", ", ".join(f"{op} {n}" for op, n in ops.most_common(top)))
    return text


def setup():
    """Compile for sm_90 from here on, with this checkout's packages first on the path. Call before fireq's
    kernels are imported: Triton reads TRITON_INTERPRET when a kernel is defined."""
    os.environ.pop("TRITON_INTERPRET", None)
    # this checkout's kernels as the installed package names them (fireq_kernels), never as a top-level
    # `kernels` (Hugging Face's package of that name): links in a fresh folder, first on the path
    pkgs = tempfile.mkdtemp(prefix="fireq_sass_")
    for name, src in (("fireq", "fireq"), ("fireq_kernels", "kernels"), ("fireq_configs", "configs")):
        os.symlink(os.path.join(ROOT, src), os.path.join(pkgs, name))
    sys.path.insert(0, pkgs)
    _fake_driver()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kernel", choices=["staged", "decode", "gemv", "swap", "rope"])
    ap.add_argument("--cfg", default=None, help="BM,BN,warps,stages (staged default 64,128,4,2; decode 16,64,1,3); "
                                                  "gemv: BN,BK,warps,stages (default 8,2048,4,1); "
                                                  "swap: BM,BN,BK,warps,stages (default 16,64,128,4,4); "
                                                  "rope: heads a program,D,warps (default 8,128,4)")
    ap.add_argument("--bias", action="store_true", help="staged: with R = 2 bias factors (the bias MMA)")
    ap.add_argument("--no-ks-tma", action="store_true", help="staged: key scales by pointer loads")
    ap.add_argument("--prefetch", type=int, default=None, help="swap: group scales one tile ahead (1) or not (0)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (89: Ada, whose FP8 "
                    "MMAs the kernels use without Hopper's descriptors and wgmma)")
    ap.add_argument("--dump", default=None, help="a folder for the .ttgir, .ptx and .sass")
    ap.add_argument("--top", type=int, default=16)
    args = ap.parse_args()
    global ARCH
    ARCH = args.arch
    setup()
    default = {"staged": "64,128,4,2", "decode": "16,64,1,3", "gemv": "8,2048,4,1",
               "swap": "16,64,128,4,4", "rope": "8,128,4"}[args.kernel]
    cfg = tuple(int(x) for x in (args.cfg or default).split(","))
    if args.kernel == "staged":
        k = staged(*cfg, bias=args.bias, ks_tma=not args.no_ks_tma)
    elif args.kernel == "decode":
        k = decode(*cfg)
    elif args.kernel == "swap":
        k = swap(*cfg, prefetch=None if args.prefetch is None else bool(args.prefetch))
    elif args.kernel == "rope":
        k = rope(*cfg)
    else:
        k = gemv(*cfg)
    text = report(f"{args.kernel} cfg={cfg}", k, args.top)
    if args.kernel == "rope":  # every product and sum rounded on its own: no fused multiply-add in the PTX
        fmas = re.findall(r"\bfma\.", k.asm["ptx"])
        print(f"ptx fma: {len(fmas)}")
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            with open(os.path.join(args.dump, f"{args.kernel}.{ext}"), "w") as f:
                f.write(k.asm[ext])
        with open(os.path.join(args.dump, f"{args.kernel}.sass"), "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
