"""Benchmark the fused GEMM epilogues on a Llama-3-8B MLP block (4096 -> 2 x 14336 -> 4096), H100.

    python scripts/bench_mlp.py --json benchmarks/results/mlp-h100.json

Per M, in one run (CUDA-graph timing, do_bench medians, weights rotated past 2x L2, random inputs):
- bf16: cuBLAS BF16 with gate and up stacked in one (28672, 4096) matmul, SiLU-and-mul in PyTorch, down.
- ours_unfused: the W4A8 linear (activation quantization + GEMM) for gate, for up, SiLU-and-mul in
  PyTorch, the W4A8 linear for down (what QuantLinears do without QuantGatedMLP).
- ours_fused: one activation quantization and one GEMM over interleaved gate/up rows with SiLU-and-mul in
  its epilogue (QuantGatedMLP), then down.
- residual: down alone + a PyTorch add vs down with the residual in its epilogue.
The fused result is checked against the float64 twin of the same quantized operands first.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench_util import bench_graph, copies_for, env_info, geomean, table, write_json  # noqa: E402

H, INTER = 4096, 14336
MS = [1, 4, 16, 256, 1024, 4096]


def main() -> None:
    import torch.nn.functional as F

    from fireq.formats.int4 import quantize_int4
    from fireq_kernels.gemm_w4a8 import interleave_gate_up, load_tuned, repack_half, w4a8_linear_triton
    from fireq_kernels.reference import w4a8_linear_ref

    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    args = ap.parse_args()
    print(f"tuned configs loaded: {load_tuned()}", flush=True)
    env = env_info()
    dev = "cuda"
    torch.manual_seed(0)
    lb = 128

    def weights():
        qg = quantize_int4(torch.randn(INTER, H, device=dev) * 0.02, 128)
        qu = quantize_int4(torch.randn(INTER, H, device=dev) * 0.02, 128)
        qd = quantize_int4(torch.randn(H, INTER, device=dev) * 0.02, 128)
        fused_q = repack_half(interleave_gate_up(qg.qweight, qu.qweight), H, lb)
        fused_s = interleave_gate_up(qg.scales, qu.scales)
        wg = (torch.randn(2 * INTER, H, device=dev) * 0.02).to(torch.bfloat16)
        wd = (torch.randn(H, INTER, device=dev) * 0.02).to(torch.bfloat16)
        return dict(g=(repack_half(qg.qweight, H, lb), qg.scales, qg.log2_multiplier),
                    u=(repack_half(qu.qweight, H, lb), qu.scales, qu.log2_multiplier),
                    d=(repack_half(qd.qweight, INTER, lb), qd.scales, qd.log2_multiplier),
                    gu=(fused_q, fused_s, qg.log2_multiplier, qu.log2_multiplier),
                    ref=(qg, qu), bf16=(wg, wd))

    sets = [weights() for _ in range(copies_for(3 * H * INTER // 2, env.get("l2_bytes"), min_sets=2, max_sets=4))]

    def lin(x, w, **kw):
        q, s, e = w
        return w4a8_linear_triton(x, q, s, e, 128, layout_block=lb, **kw)

    def unfused(x, w):
        return lin(F.silu(lin(x, w["g"])) * lin(x, w["u"]), w["d"])

    def gate_up(x, w):
        q, s, eg, eu = w["gu"]
        return w4a8_linear_triton(x, q, s, eg, 128, layout_block=lb, epilogue="silu_mul", log2_multiplier2=eu)

    def fused(x, w):
        return lin(gate_up(x, w), w["d"])

    def bf16(x, w):
        wg, wd = w["bf16"]
        h = x @ wg.t()
        return (F.silu(h[:, :INTER]) * h[:, INTER:]) @ wd.t()

    rows = []
    for m in map(int, args.ms.split(",")):
        x = torch.randn(m, H, device=dev, dtype=torch.bfloat16)
        r = torch.randn(m, H, device=dev, dtype=torch.bfloat16)
        hx = torch.randn(m, INTER, device=dev, dtype=torch.bfloat16)
        w0 = sets[0]
        # the gated GEMM against the float64 twin (first 64 rows)
        qg, qu = w0["ref"]
        xs = x[:64]
        want = (F.silu(w4a8_linear_ref(xs.double(), qg.qweight, qg.scales, qg.log2_multiplier, 128))
                * w4a8_linear_ref(xs.double(), qu.qweight, qu.scales, qu.log2_multiplier, 128))
        err = ((gate_up(xs, w0).double() - want).norm() / want.norm()).item()
        t = {}
        for name, f in (("bf16", bf16), ("unfused", unfused), ("fused", fused)):
            t[name] = bench_graph([lambda w=w, f=f: f(x, w) for w in sets])
        t["down_add"] = bench_graph([lambda w=w: lin(hx, w["d"]) + r for w in sets])
        t["down_res"] = bench_graph([lambda w=w: lin(hx, w["d"], residual=r) for w in sets])
        row = dict(M=m, bf16_us=t["bf16"] * 1e3, unfused_us=t["unfused"] * 1e3, fused_us=t["fused"] * 1e3,
                   fused_vs_unfused=t["unfused"] / t["fused"], fused_vs_bf16=t["bf16"] / t["fused"],
                   unfused_vs_bf16=t["bf16"] / t["unfused"], down_add_us=t["down_add"] * 1e3,
                   down_residual_us=t["down_res"] * 1e3, residual_gain=t["down_add"] / t["down_res"], err_gated=err)
        rows.append(row)
        print(row, flush=True)
    dec = [r for r in rows if r["M"] <= 16]
    pre = [r for r in rows if r["M"] >= 1024]
    summary = dict(mlp_decode_fused_vs_unfused=geomean([r["fused_vs_unfused"] for r in dec]),
                   mlp_decode_fused_vs_bf16=geomean([r["fused_vs_bf16"] for r in dec]),
                   mlp_prefill_fused_vs_unfused=geomean([r["fused_vs_unfused"] for r in pre]),
                   mlp_prefill_fused_vs_bf16=geomean([r["fused_vs_bf16"] for r in pre]),
                   residual_gain_geomean=geomean([r["residual_gain"] for r in rows]))
    print(table(rows, ["M", "bf16_us", "unfused_us", "fused_us", "fused_vs_unfused", "fused_vs_bf16",
                       "down_add_us", "down_residual_us", "residual_gain", "err_gated"]))
    print({k: round(v, 3) for k, v in summary.items()})
    write_json(args.json, dict(env=env, shape=dict(hidden=H, intermediate=INTER, group=128), timing="cuda-graph",
                               rows=rows, summary=summary))


if __name__ == "__main__":
    main()
