"""Shared helpers for the benchmark scripts: timing with rotation, environment, JSON, tables."""

from __future__ import annotations

import itertools
import json
import math
import platform


# bench_attention's decode points: (symmetric cache, cache length L, batch B), both cache formats
DECODE_POINTS = tuple((sym, L, B) for sym in (True, False) for L in (8192, 32768, 131072) for B in (1, 8))


def env_info() -> dict:
    import torch
    import triton

    d = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        d.update(device=torch.cuda.get_device_name(), sms=p.multi_processor_count,
                 l2_bytes=getattr(p, "L2_cache_size", None), capability=list(torch.cuda.get_device_capability()))
    return d


def copies_for(bytes_per_set: int, l2_bytes: int | None, min_sets: int = 2, max_sets: int = 32) -> int:
    """How many input sets to rotate so that one pass over them exceeds 2x L2."""
    l2 = l2_bytes or 50 * 2**20
    return max(min_sets, min(max_sets, math.ceil(2 * l2 / max(1, bytes_per_set))))


def int4_weight_copies(n: int, k: int, l2_bytes: int | None, group: int = 128) -> list[tuple]:
    """(qweight, scales, log2_multiplier) of random INT4 (N, K) weights, as many distinct copies as one pass
    over more than 2x L2 needs (two quantized weights, cloned into separate memory)."""
    import torch

    from fireq.formats.int4 import quantize_int4

    base = [quantize_int4(torch.randn(n, k, device="cuda") * 0.02, group) for _ in range(2)]
    return [(base[i % 2].qweight.clone(), base[i % 2].scales.clone(), base[i % 2].log2_multiplier)
            for i in range(copies_for(n * k // 2, l2_bytes))]


def bench_rotating(fns: list, warmup: int = 25, rep: int = 100) -> float:
    """Median ms of calling fns in rotation (each call uses the next input set)."""
    from triton.testing import do_bench

    it = itertools.cycle(fns)
    return do_bench(lambda: next(it)(), warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fns: list, warmup: int = 25, rep: int = 100) -> float:
    """Median ms per call of fns captured once each (in order) into one CUDA graph: launch overhead
    (Python, Triton's launcher, cuBLAS's) is taken out for every contender alike."""
    import torch
    from triton.testing import do_bench

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    t = do_bench(g.replay, warmup=warmup, rep=rep, return_mode="median") / len(fns)
    del g
    return t


def cuda_kernel_tally(prof, width: int = 90) -> dict:
    """The CUDA kernels of a torch.profiler run: {name (first `width` characters): [calls, microseconds]}."""
    import collections

    import torch

    acc: dict = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            a = acc[ev.name[:width]]
            a[0] += 1
            a[1] += ev.time_range.elapsed_us()
    return dict(acc)


def geomean(xs) -> float:
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    w = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(w[c]) for c in cols)]
    lines += ["  ".join(fmt(r.get(c, "")).rjust(w[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def check_then_bench(args, check, bench, *extra) -> None:
    """The diag scripts' two modes: check(device, *extra) against references (on the GPU, or on the CPU
    under TRITON_INTERPRET=1), run unless only --json was given; then bench(args.json, *extra), the GPU
    timings, when --json was."""
    import torch

    if args.check or not args.json:
        check("cuda" if torch.cuda.is_available() else "cpu", *extra)
    if args.json:
        bench(args.json, *extra)


def diag_parser(description: str | None = None):
    """The diag scripts' command line: --check (references, on the GPU or the CPU interpreter) and --json FILE
    (the GPU timings); a script adds its own options to the parser returned."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", default=None)
    return ap


def decode_gemm_operands(dev: str, m: int, n: int, k: int, group: int = 128, block: int = 128):
    """Random operands of the W4A8 GEMM for the diag checks, seeded by (m, n): x (m, k) quantized to FP8 rows,
    INT4 weights (n, k) with FP8 group scales in the kernel layout of `block`-channel blocks. Returns
    (xq, x_scale, packed weights, (None, scales, log2 multiplier))."""
    import torch

    from fireq.formats.int4 import quantize_int4
    from fireq_kernels.gemm_w4a8 import quantize_fp8_rows_triton, repack_half

    g = torch.Generator().manual_seed(m + n)
    qw = quantize_int4(torch.randn(n, k, generator=g) * 0.02, group)
    w = repack_half(qw.qweight, k, block).to(dev)
    xq, xs = quantize_fp8_rows_triton(torch.randn(m, k, generator=g).to(dev))
    return xq, xs, w, (None, qw.scales.to(dev), qw.log2_multiplier)


def decode_attention_operands(L: int, B: int, spec, l2_bytes: int | None, seed: int | None = None):
    """The decode attention diags' operands: BF16 q (B, 32, 1, 128), k and v (B, 8, L, 128) on the GPU, the
    queries as FP8 rows with their (B, 32, 1) scales, and as many INT4 caches (quantized with spec) as rotating
    past L2 takes, the first of k and v themselves. Returns (q, k, v, q8, qs, [(k cache, v cache), ...])."""
    import torch

    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import quantize_kv

    if seed is not None:
        torch.manual_seed(seed)
    q = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.bfloat16)
    q8, qs = quantize_fp8_rows(q)
    sets = copies_for(B * 8 * L * 65 * 2, l2_bytes, min_sets=1, max_sets=4)
    caches = [(quantize_kv(k if i == 0 else torch.randn_like(k), spec),
               quantize_kv(v if i == 0 else torch.randn_like(v), spec)) for i in range(sets)]
    return q, k, v, q8, qs.squeeze(-1).contiguous(), caches


def check_scale_prefetch(dev: str, cases) -> None:
    """GEMM_SCALE_PREFETCH leaves the tiled GEMM's output unchanged bit for bit: cases of (M, N, K, SPLIT_K,
    UNROLL) for the CPU interpreter or for the GPU, as dev says (SWAP configs, kernel layout, g128)."""
    small = dev == "cpu"
    for m, n, k, split, u in cases:
        xq, xs, w, qwt = decode_gemm_operands(dev, m, n, k)
        cfg = dict(SWAP=True, BM=16, BN=32 if small else 64, BK=128, SPLIT_K=split, GROUP_M=8, num_warps=4,
                   num_stages=2 if small else 3, UNROLL=u)
        same_output(gemm_kernel_layout(xq, xs, w, qwt, cfg), gemm_kernel_layout(xq, xs, w, qwt, cfg, prefetch=True),
                    f"M={m} N={n} K={k} split {split}, prefetch vs off")


def rel_err(got, ref) -> float:
    """|got - ref| / |ref| (Frobenius), in float64."""
    return ((got.double() - ref).norm() / ref.norm()).item()


def gemm_reference(xq, x_scale, qw, group: int = 128):
    """The W4A8 GEMM's float64 reference on the operands and its fp32 twin's relative error against it:
    qw = (qweight, scales, log2 multiplier) in the checkpoint layout -> (ref (M, N) float64, twin error)."""
    import torch

    from fireq_kernels.reference import w4a8_gemm_ref

    ref = w4a8_gemm_ref(xq, x_scale, qw[0], qw[1], qw[2], group, None, torch.float64, torch.float64)
    twin = w4a8_gemm_ref(xq, x_scale, qw[0], qw[1], qw[2], group, None, torch.float32, torch.float32)
    return ref, rel_err(twin, ref)


def same_output(a, b, label: str) -> None:
    """Print the largest difference of two kernel outputs under label and require them equal bit for bit."""
    import torch

    print(f"{label}: max |difference| {(a.float() - b.float()).abs().max().item():.1e}")
    assert torch.equal(a, b), label


def gemm_bench_setup() -> dict:
    """The GEMM diags' bench prologue: this GPU's tuned configs loaded (reported), the environment returned."""
    from fireq_kernels.gemm_w4a8 import load_tuned

    print(f"tuned configs loaded: {load_tuned()}", flush=True)
    return env_info()


def kernel_layout_weights(n: int, k: int, l2_bytes: int | None, block: int = 128) -> list[tuple]:
    """int4_weight_copies(n, k) with each copy's weights also in the kernel layout of `block`-channel blocks:
    [(packed, (qweight, scales, log2 multiplier)), ...]."""
    from fireq_kernels.gemm_w4a8 import repack_half

    return [(repack_half(w[0], k, block), w) for w in int4_weight_copies(n, k, l2_bytes)]


def gemm_sets(m: int, k: int, kw: list[tuple], l2_bytes: int | None) -> list[tuple]:
    """The GEMM diags' rotation at M tokens: [((xq, x_scale), packed weights, (qweight, scales, log2 multiplier))]
    a weight copy of kw (kernel_layout_weights), with enough distinct FP8 activations to pass L2 (up to 8)."""
    import torch

    from fireq_kernels.gemm_w4a8 import quantize_fp8_rows_triton

    nx = copies_for(m * k, l2_bytes, min_sets=1, max_sets=8)
    xs = [quantize_fp8_rows_triton(torch.randn(m, k, device="cuda", dtype=torch.bfloat16)) for _ in range(nx)]
    return [(xs[i % nx], p, w) for i, (p, w) in enumerate(kw)]


def finish(path: str, env: dict, rows: list[dict], summary: dict, cols: list[str], **extra) -> None:
    """A diag's end: its table (cols) and summary printed, the JSON (env, rows, summary, extra) written."""
    print(table(rows, cols))
    print(summary)
    write_json(path, dict(env=env, rows=rows, summary=summary, **extra))


def diag_main(check, bench) -> None:
    """The command line of a diag with no options of its own: --check, --json FILE."""
    check_then_bench(diag_parser().parse_args(), check, bench)


def gemm_kernel_layout(xq, xq_scale, w, qw, cfg: dict, prefetch: bool = False, per_channel: bool = False,
                       block: int = 128):
    """The W4A8 GEMM of the GEMM diags: FP8 x with its scales, weights w in the kernel layout of `block`-channel
    blocks with qw = (qweight, scales, log2 multiplier) from int4_weight_copies / decode_gemm_operands, group 128,
    one config; BF16 out on the GPU (FP32 under the interpreter). prefetch: GEMM_SCALE_PREFETCH on for this call;
    per_channel: the first group's scales as per-channel ones (a bound with no group-scale loads)."""
    import torch

    import fireq_kernels.gemm_w4a8 as G

    out = torch.bfloat16 if xq.is_cuda else torch.float32
    scales, group = (qw[1][:, :1].contiguous(), -1) if per_channel else (qw[1], 128)
    G.GEMM_SCALE_PREFETCH = prefetch
    try:
        return G.w4a8_gemm_triton(xq, xq_scale, w, scales, qw[2], group, None, out, config=cfg, layout_block=block)
    finally:
        G.GEMM_SCALE_PREFETCH = False
