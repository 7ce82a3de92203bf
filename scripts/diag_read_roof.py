"""How fast can a Triton kernel read a weight matrix on this GPU? Read-only kernels (an XOR of every word,
one small store a program) over the bytes of the decode GEMM's weights, with cuBLAS in the same run.

Why: the W4A8 decode GEMM reads its INT4 weights at about 2 TB/s on the H200 whatever its instruction count
(gemm-unroll-diag-h200.json) while cuBLAS BF16 reads 4.2 TB/s; a flat stream of plain loads measured 3.0 at
best (gemm-gemv-rows-diag-h200.json). This asks which way of loading gets closer to cuBLAS:

- ldg:  a contiguous range a program, plain loads of BLOCK words, UNR of them issued together;
- tile: the GEMM's own pattern: (BN rows, BKH bytes) tiles of the (N, K/2) weights walked along K, one row
        block a program, pointer loads (the pipeliner's asynchronous copies, num_stages);
- tma:  the same tiles by tensor-memory descriptors (bulk copies into shared memory, num_stages deep).

    python scripts/diag_read_roof.py --sass          # CPU: compile for sm_90, report the loads in the SASS
    python scripts/diag_read_roof.py --json FILE     # GPU: TB/s of every variant

Buffers rotated past L2, CUDA-graph timing (do_bench medians).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ((28672, 4096), (4096, 4096), (4096, 14336))  # N x K of INT4 weights: N x K/2 bytes


@triton.jit
def _ldg_stream(x_ptr, out_ptr, n_per, BLOCK: tl.constexpr, UNR: tl.constexpr):
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * n_per
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.int32)
    for i in range(0, n_per, BLOCK * UNR):
        for u in tl.static_range(UNR):
            acc ^= tl.load(base + i + u * BLOCK + offs)
    tl.store(out_ptr + pid * BLOCK + offs, acc)


@triton.jit
def _tile_ldg(w_ptr, out_ptr, KW, stride, BN: tl.constexpr, BKW: tl.constexpr):
    """w: (N, KW) int32 words; a program XORs its BN rows' words, BKW words of each row a step."""
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    cols = tl.arange(0, BKW)
    base = w_ptr + rows[:, None].to(tl.int64) * stride
    acc = tl.zeros((BN, BKW), tl.int32)
    for k in range(0, KW, BKW):
        acc ^= tl.load(base + (k + cols)[None, :])
    tl.store(out_ptr + pid * BN * BKW + (tl.arange(0, BN)[:, None] * BKW + cols[None, :]), acc)


@triton.jit
def _tile_tma(desc, out_ptr, KW, BN: tl.constexpr, BKW: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros((BN, BKW), tl.int32)
    for k in tl.range(0, KW, BKW, num_stages=STAGES):
        acc ^= desc.load([pid * BN, k])
    tl.store(out_ptr + pid * BN * BKW + (tl.arange(0, BN)[:, None] * BKW + tl.arange(0, BKW)[None, :]), acc)


def ldg_variants():
    return [dict(kind="ldg", P=p, BLOCK=b, UNR=u, warps=w) for p in (2, 4, 8, 16) for b in (1024, 2048)
            for u in (1, 2, 4) for w in (4, 8) if b * u <= 8192]


def tile_variants():
    out = [dict(kind="tile", BN=bn, BKW=bkw, stages=s, warps=4) for bn in (32, 64, 128) for bkw in (16, 32)
           for s in (1, 3, 4)]
    out += [dict(kind="tma", BN=bn, BKW=bkw, stages=s, warps=4) for bn in (32, 64, 128, 256) for bkw in (16, 32)
            for s in (2, 3, 4, 6) if bn * bkw * 4 * s <= 160 * 1024]
    return out


def launch(v, x, out, sms):
    """One read of x ((N, KW) int32) by variant v."""
    n, kw = x.shape
    if v["kind"] == "ldg":
        progs = v["P"] * sms
        total = x.numel() // (progs * v["BLOCK"] * v["UNR"]) * (v["BLOCK"] * v["UNR"])
        _ldg_stream[(progs,)](x, out, total, BLOCK=v["BLOCK"], UNR=v["UNR"], num_warps=v["warps"], num_stages=1)
        return progs * total * 4
    if v["kind"] == "tile":
        _tile_ldg[(n // v["BN"],)](x, out, kw, x.stride(0), BN=v["BN"], BKW=v["BKW"], num_warps=v["warps"],
                                   num_stages=v["stages"])
        return x.numel() * 4
    from triton.tools.tensor_descriptor import TensorDescriptor

    desc = TensorDescriptor(x, [n, kw], [kw, 1], [v["BN"], v["BKW"]])
    _tile_tma[(n // v["BN"],)](desc, out, kw, BN=v["BN"], BKW=v["BKW"], STAGES=v["stages"], num_warps=v["warps"])
    return x.numel() * 4


def sass_report():
    import diag_sass as D

    D.setup()
    x = torch.empty(4096, 512, dtype=torch.int32)
    out = torch.empty(1 << 20, dtype=torch.int32)
    from triton.tools.tensor_descriptor import TensorDescriptor

    for name, kern, args, kw in (
        ("ldg B2048 U4", _ldg_stream, (x, out, 1 << 16), dict(BLOCK=2048, UNR=4, num_warps=8, num_stages=1)),
        ("tile 64x32w s4", _tile_ldg, (x, out, 512, 512), dict(BN=64, BKW=32, num_warps=4, num_stages=4)),
        ("tma 64x32w s4", _tile_tma, (TensorDescriptor(x, [4096, 512], [512, 1], [64, 32]), out, 512),
         dict(BN=64, BKW=32, STAGES=4, num_warps=4)),
    ):
        k = kern.warmup(*args, grid=(1,), **kw)
        text = D.sass(k)
        ops = D.opcode_mix(text.splitlines())
        loads = {op: c for op, c in ops.items() if "LDG" in op or "UTMA" in op or "SYNCS" in op or "LDS" in op}
        print(f"{name}: {D.usage(k)} loads {loads}")


def bench(path):
    from _bench_util import bench_graph, copies_for, env_info, table, write_json

    env = env_info()
    sms = env["sms"]
    rows = []
    for n, k in SHAPES:
        kw = k // 8  # int32 words a row (K/2 bytes)
        sets = copies_for(n * kw * 4, env.get("l2_bytes"))
        xs = [torch.randint(-2**31, 2**31 - 1, (n, kw), device="cuda", dtype=torch.int32) for _ in range(sets)]
        out = torch.empty(1 << 24, device="cuda", dtype=torch.int32)
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_for(n * k * 2,
                                                                                               env.get("l2_bytes")))]
        w8 = [t.to(torch.float8_e4m3fn) for t in wb]
        xb = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        x8 = torch.randn(16, k, device="cuda").to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        t = bench_graph([lambda w=w: torch.matmul(xb, w.t()) for w in wb]) * 1e3
        rows.append(dict(N=n, K=k, kind="cublas_bf16", us=t, tbps=n * k * 2 / t * 1e-6))
        t = bench_graph([lambda w=w: torch._scaled_mm(x8, w.t(), one, one, out_dtype=torch.bfloat16) for w in w8]) * 1e3
        rows.append(dict(N=n, K=k, kind="cublas_fp8", us=t, tbps=n * k / t * 1e-6))
        print(rows[-2], rows[-1], flush=True)
        for v in ldg_variants() + tile_variants():
            if v["kind"] != "ldg" and (n % v["BN"] or kw % v["BKW"]):
                continue
            nbytes = launch(v, xs[0], out, sms)
            t = bench_graph([lambda x=x: launch(v, x, out, sms) for x in xs]) * 1e3
            rows.append(dict(N=n, K=k, **v, us=t, tbps=nbytes / t * 1e-6))
            print(rows[-1], flush=True)
        del xs, wb, w8
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        key = (r["N"], r["K"], r["kind"])
        if key not in best or r["tbps"] > best[key]["tbps"]:
            best[key] = r
    print(table(list(best.values()), ["N", "K", "kind", "us", "tbps", "P", "BLOCK", "UNR", "BN", "BKW", "stages",
                                      "warps"]))
    write_json(path, dict(env=env, rows=rows, best=[dict(r) for r in best.values()]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.sass:
        sass_report()
    if args.json:
        bench(args.json)


if __name__ == "__main__":
    main()
