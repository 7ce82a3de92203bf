"""Where an eager prefill's time goes on the host: is it the GPU, or Python and launches?

    python scripts/profile_prefill.py --json FILE [--layers 8] [--prompts 1024,4096]

For BF16 (SDPA, StaticCache) and fireq (the model bench_e2e.py quantizes in place) it measures, per prompt:
- gpu_ms: the prefill from first launch to last kernel (CUDA events, median);
- host_ms: how long the Python call takes to return, with the GPU idle at its start (median). A host_ms
  close to gpu_ms means the GPU waits on the host (launch-bound); far below it, the GPU is the limit;
- kernel_ms: the summed kernel time (profiler), and the number of kernel launches;
- syncs: host-device synchronizations the call makes (torch.cuda.set_sync_debug_mode warnings);
- the top operators by self CPU time (profiler), so the host's cost is attributable;
- with --graphed: fireq's prompts of up to 2048 tokens as GraphDecoder's graph replays (default: eager,
  the path this script diagnoses);
- with --cprofile N: the N Python functions with the most own time in one fireq prefill (cProfile), which
  the operator profiler does not see (Triton's launcher, fireq's wrappers).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import cuda_kernel_tally, env_info, table, write_json  # noqa: E402
from bench_e2e import llama3_8b, static_cache, to_fireq  # noqa: E402


def measure(call, reps: int) -> dict:
    gpu, host = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        a.record()
        call()
        b.record()
        host.append((time.perf_counter() - t0) * 1e3)
        b.synchronize()
        gpu.append(a.elapsed_time(b))
    return dict(gpu_ms=statistics.median(gpu), host_ms=statistics.median(host))


def count_syncs(call) -> list[str]:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return [str(w.message).split("\n")[0][:160] for w in caught if "synchroniz" in str(w.message)]


def profile_ops(call, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kern = cuda_kernel_tally(prof, 80)
    ops = [dict(op=e.key[:80], calls=e.count, self_cpu_ms=e.self_cpu_time_total / 1e3,
                cpu_ms=e.cpu_time_total / 1e3) for e in prof.key_averages()]
    ops.sort(key=lambda r: -r["self_cpu_ms"])
    kernels = [dict(kernel=k, calls=c, ms=t / 1e3) for k, (c, t) in kern.items()]
    kernels.sort(key=lambda r: -r["ms"])
    return dict(kernel_ms=sum(r["ms"] for r in kernels), launches=sum(r["calls"] for r in kernels),
                top_ops=ops[:top], top_kernels=kernels[:top])


def python_profile(call, top: int) -> list[dict]:
    """The top functions by own time (cProfile) in one call, printed and returned."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    call()
    pr.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(pr)
    rows = []
    for (file, line, fn), (_, ncalls, tottime, cumtime, _) in st.stats.items():
        rows.append(dict(function=f"{os.path.basename(file)}:{line}:{fn}"[:90], calls=ncalls,
                         own_ms=tottime * 1e3, cum_ms=cumtime * 1e3))
    total = sum(r["own_ms"] for r in rows)
    by_own = sorted(rows, key=lambda r: -r["own_ms"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cum_ms"])[:top]
    print(f"cProfile: {total:.2f} ms of Python in the call")
    print(table(by_own, ["function", "calls", "own_ms", "cum_ms"]))
    print(table(by_cum, ["function", "calls", "own_ms", "cum_ms"]), flush=True)
    return dict(total_ms=total, by_own=by_own, by_cum=by_cum)


def main() -> None:
    from fireq.nn.attention import make_cache
    from fireq.nn.graphs import GraphDecoder

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", default="1024,4096")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sides", default="bf16,fireq")
    ap.add_argument("--cprofile", type=int, default=0)
    ap.add_argument("--graphed", action="store_true", help="fireq prompts <= 2048 as graph replays (default: eager)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = llama3_8b(args.layers, max_positions=16384)
    cfg = model.config
    prompts = [int(p) for p in args.prompts.split(",")]
    max_len = max(prompts) + 8
    out: dict = {}
    rows = []
    with torch.no_grad():
        for tag in args.sides.split(","):
            if tag == "fireq":
                to_fireq(model)
            cache = static_cache(cfg, max_len, 1) if tag == "bf16" else make_cache(model, max_len)
            dec = GraphDecoder(model, 1, max_len, cache=cache, prefill_graphs=2048 if args.graphed else 0)
            for p in prompts:
                ids = torch.randint(0, cfg.vocab_size, (1, p), device="cuda")
                for _ in range(2):
                    dec.prefill(ids)
                m = measure(lambda: dec.prefill(ids), args.reps)
                syncs = count_syncs(lambda: dec.prefill(ids))
                prof = profile_ops(lambda: dec.prefill(ids), args.top)
                row = dict(side=tag, prompt=p, **m, kernel_ms=prof["kernel_ms"], launches=prof["launches"],
                           syncs=len(syncs))
                rows.append(row)
                out[f"{tag}_{p}"] = dict(**row, sync_messages=sorted(set(syncs)), top_ops=prof["top_ops"],
                                         top_kernels=prof["top_kernels"])
                print(table([row], list(row)), flush=True)
                print(table(prof["top_ops"], ["op", "calls", "self_cpu_ms", "cpu_ms"]), flush=True)
                for s in sorted(set(syncs)):
                    print("  sync:", s)
                if tag == "fireq" and args.cprofile:
                    out[f"{tag}_{p}"]["python"] = python_profile(lambda: dec.prefill(ids), args.cprofile)
            dec.cache = None
            del dec, cache
            gc.collect()
            torch.cuda.empty_cache()
    print(table(rows, list(rows[0])))
    write_json(args.json, dict(env=env_info(), model="Llama-3-8B shape, random weights", layers=args.layers,
                               batch=1, rows=rows, detail=out))


if __name__ == "__main__":
    main()
