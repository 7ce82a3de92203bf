"""Benchmark the W4A8 GEMM against cuBLAS BF16 and cuBLAS FP8 in the same run (H100).

    python scripts/bench_gemm.py --json benchmarks/results/gemm-h100.json [--tune] [--save-tuned FILE]

From --fp8-path-from tokens on (default 256), rows also time the opt-in FP8 prefill path (kernels/w4_fp8.py:
INT4 -> FP8 row re-rounding, then cuBLAS's rowwise-scaled FP8 GEMM), as a GEMM from FP8 x (fp8path_us) and
as the whole linear from bf16 x (fp8path_linear_us), after checking it against its own twin; the summary's
prefill_fp8path_* keys are its geometric means. The prefill_vs_* keys stay those of the INT4 GEMM.

Shapes: Llama-3-8B linears (N x K) 6144x4096, 4096x4096, 28672x4096, 4096x14336; M in 1..8192.
Every timing is a triton.testing.do_bench median after warm-up over inputs rotated through more than
2x L2. Random inputs, never zeros. Correctness against a float64 reference is checked at every shape
before timing. FP8 cuBLAS (torch._scaled_mm, per-tensor scales) needs M % 16 == 0: M < 16 is padded to
16 for it (the time reported is the padded call, as a caller would have to make it).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, bench_rotating, copies_for, env_info, geomean, table, write_json  # noqa: E402

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
MS = [1, 4, 16, 64, 256, 1024, 4096, 8192]


def tune_candidates(m: int, group: int, kernel_layout: bool) -> list[dict]:
    from fireq_kernels.gemm_w4a8 import gemm_configs

    return gemm_configs(m, 0, 1 << 20, group, kernel_layout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--tune", action="store_true", help="search configs per point (else the defaults)")
    ap.add_argument("--save-tuned", default=None)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--shapes", default=None, help="e.g. 28672x4096,4096x14336")
    ap.add_argument("--no-graph", action="store_true", help="time eager calls (launch overhead included)")
    ap.add_argument("--fp8-path-from", type=int, default=256, help="time the FP8 prefill path from this M on")
    ap.add_argument("--layout-block", type=int, default=128,
                    help="weights in the kernel layout of repack_half with this block (what QuantLinear uses on "
                         "the GPU); 0: the checkpoint layout")
    args = ap.parse_args()
    timer = bench_rotating if args.no_graph else bench_graph

    from fireq.formats.int4 import quantize_int4
    from fireq_kernels.gemm_w4a8 import (FP8_MMA_ACC_RTOL, load_tuned, remember_config, m_bucket, pick_config, quantize_fp8_rows_triton, repack_half,
                                         w4a8_gemm_triton,
                                         w4a8_linear_triton)
    from fireq_kernels.reference import quantize_fp8_rows_ref, w4a8_gemm_ref, w4a8_prefill_fp8_ref
    from fireq_kernels.w4_fp8 import w4a8_linear_fp8, w4a8_prefill_fp8

    if not args.tune:
        print(f"tuned configs loaded: {load_tuned()}", flush=True)
    env = env_info()
    l2 = env.get("l2_bytes")
    dev = "cuda"
    torch.manual_seed(0)
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    rows, tuned = [], {}
    t_start = time.time()
    for n, k in shapes:
        # weights: INT4 (ours), BF16 and FP8 (baselines), rotated over enough copies
        ncopy = copies_for(n * k // 2, l2)
        w_sets = []
        for _ in range(min(ncopy, 4)):  # quantizing is slow on huge shapes: reuse 4 distinct and repeat
            w = torch.randn(n, k, device=dev) * 0.02
            qw = quantize_int4(w, args.group)
            w_sets.append((qw, w.to(torch.bfloat16), w.to(torch.float8_e4m3fn)))
        # rotate over ncopy sets in distinct memory: clones of the (up to 4) distinct quantized weights
        w_sets = [(replace(qw, qweight=qw.qweight.clone(), scales=qw.scales.clone()), wb.clone(), w8.clone())
                  for qw, wb, w8 in (w_sets[i % len(w_sets)] for i in range(ncopy))]
        lb = args.layout_block
        kern_w = {id(qw): repack_half(qw.qweight, k, lb) if lb else qw.qweight for qw, _, _ in w_sets}
        for m in ms:
            nx = copies_for(m * k * 2, l2, min_sets=len(w_sets))
            xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(min(nx, 8))]
            sets = [(xs[i % len(xs)], w_sets[i % len(w_sets)]) for i in range(max(nx, len(w_sets)))]
            # correctness at this point: kernel vs float64 reference, within 2x of the fp32 twin
            x0, (qw0, _, _) = sets[0]
            xq0, xs0 = quantize_fp8_rows_triton(x0)
            xqr, xsr = quantize_fp8_rows_ref(x0)
            assert torch.equal(xq0.float(), xqr.float()) and torch.equal(xs0, xsr), "activation quant mismatch"
            ref = w4a8_gemm_ref(xq0, xs0, qw0.qweight, qw0.scales, qw0.log2_multiplier, args.group, None,
                                torch.float64, torch.float64)
            twin = w4a8_gemm_ref(xq0, xs0, qw0.qweight, qw0.scales, qw0.log2_multiplier, args.group, None,
                                 torch.float32, torch.float32)
            e_twin = ((twin.double() - ref).norm() / ref.norm()).item()

            def run_cfg(cfg):
                fns = []
                for x, (qw, _, _) in sets:
                    xq, xsc = quantize_fp8_rows_triton(x)
                    fns.append(lambda xq=xq, xsc=xsc, qw=qw: w4a8_gemm_triton(
                        xq, xsc, kern_w[id(qw)], qw.scales, qw.log2_multiplier, args.group, None, torch.bfloat16,
                        config=cfg, layout_block=lb))
                return fns

            def check(cfg):
                got = w4a8_gemm_triton(xq0, xs0, kern_w[id(qw0)], qw0.scales, qw0.log2_multiplier, args.group, None,
                                       torch.float32, config=cfg, layout_block=lb)
                err = ((got.double() - ref).norm() / ref.norm()).item()
                return err

            best_cfg, best_ms = pick_config(m, n, k, args.group), None
            cands = tune_candidates(m, args.group, lb > 0) if args.tune else [best_cfg]
            for cfg in cands:
                try:
                    err = check(cfg)
                    if not err <= 2 * e_twin + FP8_MMA_ACC_RTOL:
                        print(f"  config {cfg} wrong: err {err:.2e} vs twin {e_twin:.2e}", flush=True)
                        continue
                    t = timer(run_cfg(cfg), warmup=5, rep=25)
                except Exception as ex:  # out of resources etc.
                    print(f"  config {cfg} failed: {type(ex).__name__}: {str(ex)[:120]}", flush=True)
                    continue
                if best_ms is None or t < best_ms:
                    best_cfg, best_ms = cfg, t
            err = check(best_cfg)
            if args.tune:  # the linear below (and QuantLinear, once saved) picks this winner
                remember_config(m, n, k, args.group, best_cfg)
            t_ours = timer(run_cfg(best_cfg))
            t_lin = timer([lambda x=x, qw=qw: w4a8_linear_triton(x, kern_w[id(qw)], qw.scales,
                                                                 qw.log2_multiplier, args.group, layout_block=lb)
                                    for x, (qw, _, _) in sets])
            # baselines
            t_bf16 = timer([lambda x=x, wb=wb: torch.matmul(x, wb.t()) for x, (_, wb, _) in sets])
            mp = max(16, (m + 15) // 16 * 16)
            one = torch.ones((), device=dev)
            x8s = [torch.randn(mp, k, device=dev).to(torch.float8_e4m3fn) for _ in range(min(len(sets), 8))]
            t_fp8 = timer([lambda a=x8s[i % len(x8s)], b=s[1][2]: torch._scaled_mm(
                a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16) for i, s in enumerate(sets)])
            flops = 2.0 * m * n * k
            row = dict(N=n, K=k, M=m, ours_us=t_ours * 1e3, linear_us=t_lin * 1e3, bf16_us=t_bf16 * 1e3,
                       fp8_us=t_fp8 * 1e3, vs_bf16=t_bf16 / t_ours, vs_fp8=t_fp8 / t_ours,
                       linear_vs_bf16=t_bf16 / t_lin, tflops=flops / t_ours / 1e9,
                       weight_tbps=(n * k / 2 + n * k / args.group) / t_ours / 1e9,
                       err=err, err_twin=e_twin, config=best_cfg)
            if m >= args.fp8_path_from and lb in (0, 128):  # the FP8 prefill path, checked against its twin
                p_ref = w4a8_prefill_fp8_ref(xq0, xs0, qw0.qweight, qw0.scales, qw0.log2_multiplier, args.group,
                                             None, torch.float64, torch.float64)
                p_twin = w4a8_prefill_fp8_ref(xq0, xs0, qw0.qweight, qw0.scales, qw0.log2_multiplier, args.group,
                                              None, torch.bfloat16, torch.float32)
                p_got = w4a8_prefill_fp8(xq0, xs0, kern_w[id(qw0)], qw0.scales, qw0.log2_multiplier, args.group,
                                         None, torch.bfloat16, lb)
                p_err = ((p_got.double() - p_ref).norm() / p_ref.norm()).item()
                p_et = ((p_twin.double() - p_ref).norm() / p_ref.norm()).item()
                assert p_err <= 2 * p_et + FP8_MMA_ACC_RTOL, ("fp8 path", p_err, p_et)
                q8 = [quantize_fp8_rows_triton(x) for x in xs]
                t_p = timer([lambda i=i, qw=s[1][0]: w4a8_prefill_fp8(
                    q8[i % len(q8)][0], q8[i % len(q8)][1], kern_w[id(qw)], qw.scales, qw.log2_multiplier,
                    args.group, None, torch.bfloat16, lb) for i, s in enumerate(sets)])
                t_pl = timer([lambda x=x, qw=qw: w4a8_linear_fp8(x, kern_w[id(qw)], qw.scales, qw.log2_multiplier,
                                                                 args.group, None, lb) for x, (qw, _, _) in sets])
                row.update(fp8path_us=t_p * 1e3, fp8path_linear_us=t_pl * 1e3, fp8path_vs_bf16=t_bf16 / t_p,
                           fp8path_vs_fp8=t_fp8 / t_p, fp8path_linear_vs_bf16=t_bf16 / t_pl,
                           fp8path_vs_int4=t_ours / t_p, fp8path_err=p_err, fp8path_err_twin=p_et)
                del q8
            rows.append(row)
            tuned[f"{m_bucket(m)},{n},{k},{args.group}"] = best_cfg
            print(f"N={n} K={k} M={m}: ours {row['ours_us']:.1f}us linear {row['linear_us']:.1f}us "
                  f"bf16 {row['bf16_us']:.1f}us fp8 {row['fp8_us']:.1f}us  x{row['vs_bf16']:.2f} bf16 "
                  f"x{row['vs_fp8']:.2f} fp8  {row['tflops']:.0f} TFLOP/s  cfg {best_cfg}  "
                  f"[{time.time() - t_start:.0f}s]", flush=True)
            del sets, xs, x8s
        del w_sets
        torch.cuda.empty_cache()
        write_json(args.json + ".partial", dict(env=env, rows=rows))
        if args.save_tuned:
            write_json(args.save_tuned, tuned)

    def gm(key, mset):
        return geomean([r[key] for r in rows if r["M"] in mset])

    summary = dict(decode_vs_bf16=gm("vs_bf16", {1, 4, 16}), decode_vs_fp8=gm("vs_fp8", {1, 4, 16}),
                   prefill_vs_bf16=gm("vs_bf16", {4096, 8192}), prefill_vs_fp8=gm("vs_fp8", {4096, 8192}),
                   linear_decode_vs_bf16=gm("linear_vs_bf16", {1, 4, 16}),
                   linear_prefill_vs_bf16=gm("linear_vs_bf16", {4096, 8192}))
    if any("fp8path_us" in r for r in rows):
        summary.update(prefill_fp8path_vs_bf16=gm("fp8path_vs_bf16", {4096, 8192}),
                       prefill_fp8path_vs_fp8=gm("fp8path_vs_fp8", {4096, 8192}),
                       linear_prefill_fp8path_vs_bf16=gm("fp8path_linear_vs_bf16", {4096, 8192}))
    print()
    print(table(rows, ["N", "K", "M", "ours_us", "linear_us", "bf16_us", "fp8_us", "vs_bf16", "vs_fp8",
                       "linear_vs_bf16", "tflops", "fp8path_us", "fp8path_linear_us", "fp8path_vs_bf16",
                       "fp8path_vs_fp8", "fp8path_vs_int4"]))
    print({k: round(v, 3) for k, v in summary.items()})
    write_json(args.json, dict(env=env, group_size=args.group, layout_block=args.layout_block, tuned=args.tune, timing="cuda_graph" if not
                               args.no_graph else "eager", rows=rows, summary=summary))
    if args.save_tuned:
        write_json(args.save_tuned, tuned)


if __name__ == "__main__":
    main()
