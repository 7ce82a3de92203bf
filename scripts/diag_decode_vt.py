"""Decode attention over a key-contiguous V layout: a stand-alone copy of the shipped decode kernel's path
(one scale a token, fp16 Q.K^T and P.V, split along the keys) that reads V from a cache laid out in blocks
of BN keys with the keys of each channel byte contiguous, (B, Hkv, L / BN, D / 2, BN), instead of the
token-contiguous (B, Hkv, L, D / 2). The point: P.V wants four consecutive keys of one channel byte in a
thread, which the token-contiguous layout can only give by byte loads from shared memory (256 LDS.U8 in
the shipped kernel, benchmarks/results/sass-sm90.md); here they are one 32-bit load.

    python scripts/diag_decode_vt.py --check               # CPU (interpreter) or GPU: matches the shipped kernel
    python scripts/diag_decode_vt.py --sass                # CPU: registers and SASS mix of both, for sm_90
    python scripts/diag_decode_vt.py --json FILE           # GPU: both kernels and SDPA at bench_attention's points

Nothing in the package uses this layout; if it pays, the KV cache write, fireq.formats.kv, the twins and the
staging pass move to it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

def to_key_blocks(v: torch.Tensor, bn: int) -> torch.Tensor:
    """(B, H, L, D/2) token-contiguous codes -> (B, H, ceil(L / bn), D/2, bn), keys contiguous (zero padded)."""
    b, h, n, dh = v.shape
    nb = -(-n // bn)
    pad = torch.zeros(b, h, nb * bn, dh, dtype=v.dtype, device=v.device)
    pad[:, :, :n] = v
    return pad.view(b, h, nb, bn, dh).transpose(-1, -2).contiguous()


def _kernel():
    """The kernel (scripts/_decode_vt_kernel.py), imported on first use so that --sass can switch Triton to
    the compiler first."""
    from _decode_vt_kernel import _decode_vt

    return _decode_vt


def decode_vt(q8, q_scale, k, k_scale, vt, v_scale, sm_scale, k_zero=None, v_zero=None, splits=8, block_n=128,
              num_warps=2, num_stages=3, out_dtype=torch.bfloat16):
    """q8 (B, Hq, 1, D) fp8, q_scale (B, Hq); k (B, Hkv, L, D/2) codes; vt = to_key_blocks(v, block_n);
    scales and zero points (B, Hkv, L, 1) as the shipped kernel takes them (contiguous)."""
    from fireq_kernels.attention_kv4 import _combine
    from fireq_kernels.int4cvt import use_asm

    bsz, hq, _, d = q8.shape
    hkv, lk = k.shape[1], k.shape[2]
    sym = k_zero is None
    part = torch.empty((bsz, hq, 1, splits, d), dtype=torch.float32, device=q8.device)
    lse = torch.empty((bsz, hq, 1, splits), dtype=torch.float32, device=q8.device)
    dummy = k_scale
    _kernel()[(1, bsz * hkv, splits)](
        q8, q_scale.float().contiguous(), k, k_scale, k_zero if not sym else dummy, vt, v_scale,
        v_zero if not sym else dummy, part, lse, lk, sm_scale,
        q8.stride(0), q8.stride(1), k.stride(0), k.stride(1), k.stride(2), k_scale.stride(0), k_scale.stride(1),
        vt.stride(0), vt.stride(1), part.stride(0), part.stride(1), part.stride(3),
        HQ=hq, HKV=hkv, D=d, SYM=sym, SPLITS=splits, BM=max(16, triton.next_power_of_2(hq // hkv)), BN=block_n,
        ASM=use_asm(), num_warps=num_warps, num_stages=num_stages)
    out = torch.empty((bsz, hq, 1, d), dtype=out_dtype, device=q8.device)
    _combine[(bsz * hq,)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
                          out.stride(0), out.stride(1), out.stride(2), 1, HQ=hq, D=d, SPLITS=splits,
                          SP2=triton.next_power_of_2(splits))
    return out


def _case(B, L, sym, dev, seed=0, hq=32, hkv=8, d=128):
    from fireq.formats.fp8 import quantize_fp8_rows
    from fireq.formats.kv import KVSpec, quantize_kv

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, hq, 1, d, generator=g).to(dev, torch.bfloat16)
    k = torch.randn(B, hkv, L, d, generator=g).to(dev, torch.bfloat16)
    v = torch.randn(B, hkv, L, d, generator=g).to(dev, torch.bfloat16)
    q8, qs = quantize_fp8_rows(q)
    spec = KVSpec(symmetric=sym)
    return q8, qs.squeeze(-1).contiguous(), quantize_kv(k, spec), quantize_kv(v, spec)


def check(dev):
    """The key-blocked kernel against the shipped decode kernel (same arithmetic) and a float64 reference."""
    from diag_decode_regs import rel_err
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    small = dev == "cpu"
    for sym in (True, False):
        for B, L, splits, bn in ((1, 200, 2, 64), (2, 333, 3, 64)) if small else ((1, 8192, 8, 128), (8, 4000, 4, 128)):
            hq, hkv, d = (8, 2, 64) if small else (32, 8, 128)
            q8, qs, qk, qv = _case(B, L, sym, dev, seed=L + B, hq=hq, hkv=hkv, d=d)
            sm = 1 / math.sqrt(d)
            vt = to_key_blocks(qv.packed, bn)
            got = decode_vt(q8, qs, qk.packed, qk.scales, vt, qv.scales, sm, qk.zeros, qv.zeros, splits=splits,
                            block_n=bn, out_dtype=torch.float32)
            ship = kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales, sm, True,
                                        k_zero=qk.zeros, v_zero=qv.zeros, splits=splits, block_m=16, block_n=bn,
                                        out_dtype=torch.float32)
            e_new = rel_err(got, q8, qs, qk, qv, sym)
            e_ship = rel_err(ship, q8, qs, qk, qv, sym)
            diff = (got - ship).abs().max().item()
            print(f"sym={sym} B={B} L={L}: err new {e_new:.2e}, shipped {e_ship:.2e}, max |new - shipped| {diff:.2e}")
            assert e_new <= 2 * e_ship + 1e-6, "the key-blocked kernel is less accurate than the shipped one"


def sass_report():
    """Registers and SASS mix of the key-blocked kernel next to the shipped decode kernel, for sm_90."""
    import diag_sass

    diag_sass.setup()
    from fireq_kernels.int4cvt import use_asm

    B, L, splits, bn = 8, 131072, 8, 128
    q8 = torch.empty(B, 32, 1, 128, dtype=torch.float8_e4m3fn)
    qs = torch.empty(B, 32)
    k = torch.empty(B, 8, L, 64, dtype=torch.uint8)
    ks = torch.empty(B, 8, L, 1, dtype=torch.float8_e4m3fn)
    vt = torch.empty(B, 8, L // bn, 64, bn, dtype=torch.uint8)
    part = torch.empty(B, 32, 1, splits, 128)
    lse = torch.empty(B, 32, 1, splits)
    kern = _kernel().warmup(q8, qs, k, ks, ks, vt, ks, ks, part, lse, L, 0.1, q8.stride(0), q8.stride(1),
                             k.stride(0), k.stride(1), k.stride(2), ks.stride(0), ks.stride(1), vt.stride(0),
                             vt.stride(1), part.stride(0), part.stride(1), part.stride(3),
                             HQ=32, HKV=8, D=128, SYM=True, SPLITS=splits, BM=16, BN=bn, ASM=use_asm(),
                             num_warps=2, num_stages=3, grid=(1,))
    for name, kk in (("key-blocked V", kern), ("shipped", diag_sass.decode(16, bn, 2, 3, splits=splits, L=L, B=B))):
        text = diag_sass.report(name, kk, top=14)
        whole = diag_sass.opcode_mix(text.splitlines())
        print(f"  shared loads: LDS.U8 {whole.get('LDS.U8', 0)}, "
              f"LDS {sum(n for op, n in whole.items() if op.startswith('LDS'))}, PRMT {whole.get('PRMT', 0)}, "
              f"IMAD.MOV.U32 {whole.get('IMAD.MOV.U32', 0)}")


def bench(path, bn=128, warps=2):
    """GPU: the key-blocked kernel (bn-key tiles, warps a program), the shipped one and SDPA over a BF16 cache at
    bench_attention's points."""
    import torch.nn.functional as F

    from _bench_util import DECODE_POINTS, bench_graph, env_info, geomean, table, write_json
    from fireq_kernels.attention_kv4 import kv4_attention_triton

    env = env_info()
    rows = []
    for sym, L, B in DECODE_POINTS:
        q8, qs, qk, qv = _case(B, L, sym, "cuda", seed=L + B)
        vt = to_key_blocks(qv.packed, bn)
        sm = 1 / math.sqrt(128)
        best_new = None
        for splits in (4, 8, 16, 32, 64) if warps > 1 else (16, 32, 64, 128):
            if L // bn < splits:
                continue
            f = lambda s=splits: decode_vt(q8, qs, qk.packed, qk.scales, vt, qv.scales, sm,  # noqa: E731
                                           qk.zeros, qv.zeros, splits=s, block_n=bn, num_warps=warps)
            t = bench_graph([f], warmup=5, rep=20)
            if best_new is None or t < best_new[0]:
                best_new = (t, splits, f)
        t_new = bench_graph([best_new[2]])
        t_ship = bench_graph([lambda: kv4_attention_triton(q8, qs, qk.packed, qk.scales, qv.packed, qv.scales,
                                                           sm, True, k_zero=qk.zeros, v_zero=qv.zeros)])
        qb = torch.randn(B, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        kb = torch.randn(B, 8, L, 128, device="cuda", dtype=torch.bfloat16)
        vb = torch.randn_like(kb)  # separate tensors (one for both halves SDPA's reads from HBM)
        t_sdpa = bench_graph([lambda: F.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)])
        rows.append(dict(sym=sym, L=L, B=B, new_ms=t_new, new_splits=best_new[1], shipped_ms=t_ship,
                         sdpa_ms=t_sdpa, new_vs_shipped=t_ship / t_new, new_vs_sdpa=t_sdpa / t_new,
                         shipped_vs_sdpa=t_sdpa / t_ship))
        print(rows[-1], flush=True)
    summary = {f"{k}{'' if s else '_asym'}": geomean([r[k] for r in rows if r["sym"] == s])
               for k in ("new_vs_shipped", "new_vs_sdpa", "shipped_vs_sdpa") for s in (True, False)}
    print(table(rows, ["sym", "L", "B", "new_ms", "new_splits", "shipped_ms", "sdpa_ms", "new_vs_shipped",
                       "new_vs_sdpa"]))
    print(summary)
    write_json(path, dict(env=env, rows=rows, summary=summary, block_n=bn, num_warps=warps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--bn", type=int, default=128, help="--json: keys a tile (and a V block)")
    ap.add_argument("--warps", type=int, default=2, help="--json: warps a program (1: the shipped decode's shape)")
    args = ap.parse_args()
    if args.sass:
        sass_report()
        return
    from _bench_util import check_then_bench

    check_then_bench(args, check, lambda path: bench(path, args.bn, args.warps))


if __name__ == "__main__":
    main()
