"""Pure-PyTorch twins of the Triton kernels: the CPU path and the test oracle.

Shapes are written next to every argument; dtypes are the ones the kernels take.
"""

from __future__ import annotations

import torch

# The quantizers and the unpacking are the format's own definitions (fireq.formats), shared here so that
# the twins and the checkpoint code cannot drift apart.
from fireq.formats.fp8 import quantize_fp8_rows as quantize_fp8_rows_ref  # noqa: E402
from fireq.formats.int4 import expand_group_scales as group_scales_ref  # noqa: E402
from fireq.formats.int4 import unpack_int4 as unpack_int4_ref  # noqa: E402

__all__ = ["quantize_fp8_rows_ref", "group_scales_ref", "unpack_int4_ref", "w4a8_gemm_ref", "w4a8_linear_ref",
           "code_histogram", "fp8_row_factors", "fp8_row_rescale", "int4_to_fp8_ref", "w4a8_prefill_fp8_ref", "w4a8_linear_fp8_ref",
           "kv4_attention_ref", "stage_kv_ref", "rmsnorm_ref", "rope_ref", "argmax_rows_ref"]


def w4a8_gemm_ref(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                  log2_multiplier: int, group_size: int, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16, acc_dtype: torch.dtype = torch.float32,
                  epilogue: str | None = None, log2_multiplier2: int | None = None,
                  residual: torch.Tensor | None = None) -> torch.Tensor:
    """out = (xq * x_scale) @ (q * s_w / 2^e)^T + bias.

    xq: (M, K) fp8; x_scale: (M, 1) fp32; qweight: (N, ceil(K/2)) uint8; w_scales: (N, G) fp8 or bf16;
    bias: (N,) or None. Accumulates in acc_dtype (float32 like the kernel; float64 for the oracle).
    epilogue "silu_mul" / "gelu_tanh_mul": rows 2i and 2i + 1 are gate and up channel i (the up rows with
    multiplier 2^log2_multiplier2); out (M, N/2) = act(gate) * up, computed before the cast.
    residual: (M, N or N/2), added last.
    """
    k = xq.shape[1]
    w = unpack_int4_ref(qweight, k).to(acc_dtype) * group_scales_ref(w_scales, k, group_size).to(acc_dtype)
    out = (xq.to(acc_dtype) @ w.t()) * x_scale.to(acc_dtype)
    if epilogue is None:
        out = out * 2.0 ** -log2_multiplier
    if bias is not None:
        out = out + bias.to(acc_dtype)
    if epilogue is not None:
        e2 = log2_multiplier if log2_multiplier2 is None else log2_multiplier2
        out = gated_act_ref(out[:, 0::2] * 2.0 ** -log2_multiplier, epilogue) * (out[:, 1::2] * 2.0 ** -e2)
    if residual is not None:
        out = out + residual.to(acc_dtype)
    return out.to(out_dtype)


def gated_act_ref(g: torch.Tensor, epilogue: str) -> torch.Tensor:
    """The gate's activation of a gated MLP: silu_mul -> SiLU, gelu_tanh_mul -> GELU (tanh approximation)."""
    if epilogue == "silu_mul":
        return torch.nn.functional.silu(g)
    if epilogue == "gelu_tanh_mul":
        return torch.nn.functional.gelu(g, approximate="tanh")
    raise ValueError(f"unknown epilogue {epilogue!r}")


def w4a8_linear_ref(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int,
                    group_size: int, bias: torch.Tensor | None = None, act_quant: bool = True,
                    epilogue: str | None = None, log2_multiplier2: int | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """A whole quantized linear: per-token FP8 quantization of x (..., K), then the GEMM (with the epilogue
    and residual of w4a8_gemm_ref). Output in x.dtype."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    r2 = None if residual is None else residual.reshape(x2.shape[0], -1)
    if act_quant:
        xq, xs = quantize_fp8_rows_ref(x2)
    else:  # the float input itself, scale 1
        xq, xs = x2.float(), torch.ones(x2.shape[0], 1)
    out = w4a8_gemm_ref(xq, xs.to(x2.device), qweight, w_scales, log2_multiplier, group_size, bias,
                        out_dtype=x.dtype, epilogue=epilogue, log2_multiplier2=log2_multiplier2, residual=r2)
    return out.reshape(*x.shape[:-1], -1)


FP8_ROW_CODE_MAX = 56.0  # 448 / 8: |q| <= 8 codes times this stay inside E4M3's range


FP8_ROW_SEARCH = 32  # row scales tried per binade by fp8_row_factors


def code_histogram(codes: torch.Tensor, group_size: int, rows_per_chunk: int = 2048) -> torch.Tensor:
    """codes: (N, K) INT4 codes in -8..7 -> (N, G, 16) float64, how often each code occurs in each group."""
    n, k = codes.shape
    gs = k if group_size in (-1, 0) or group_size >= k else group_size
    g = -(-k // gs)
    grp = (torch.arange(k, device=codes.device) // gs) * 16
    out = torch.zeros((n, g * 16), dtype=torch.float64, device=codes.device)
    for r0 in range(0, n, rows_per_chunk):
        idx = grp[None, :] + codes[r0:r0 + rows_per_chunk].long() + 8
        out[r0:r0 + rows_per_chunk].scatter_add_(1, idx, torch.ones(idx.shape, dtype=torch.float64, device=idx.device))
    return out.reshape(n, g, 16)


def fp8_row_factors(w_scales: torch.Tensor, log2_multiplier: int, log2_multiplier2: int | None = None,
                    hist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row factors of the INT4 -> FP8 row re-rounding (int4_to_fp8_ref), shared by kernel and twin.

    w_scales: (N, G) fp8/bf16 -> (inv_row (N,) fp32 = 1 / c, row_scale (N,) fp32 = c 2^-e); the group ratio is
    s_g inv_row (an fp32 product), so that q s_g 2^-e ~= fp8(q s_g inv_row) row_scale. c starts at
    max_g |s_g| / 56 (|q s_g / c| <= 448, E4M3's largest value). With hist (code_histogram of the weight's
    codes), c is the one of FP8_ROW_SEARCH values in [max / 56, 2 max / 56) (a binade: a power of two more
    would change no rounding) with the least squared re-rounding error over the row's codes: on SmolLM2's
    weights 0.4x the error of max / 56. log2_multiplier2: the odd rows' e (interleaved gate/up rows of a
    gated MLP), else every row's is log2_multiplier."""
    s = w_scales.float()
    smax = s.abs().amax(dim=1)
    smax = torch.where(smax > 0, smax, torch.ones_like(smax))
    c = smax * (1.0 / FP8_ROW_CODE_MAX)
    if hist is not None:
        v = torch.arange(-8, 8, dtype=torch.float32, device=s.device)
        best_c, best = c, None
        for t in range(FP8_ROW_SEARCH):
            ct = c * 2.0 ** (t / FP8_ROW_SEARCH)
            x = v * (s * (1.0 / ct)[:, None])[:, :, None]  # (N, G, 16), the values the kernel rounds
            d = (x.to(torch.float8_e4m3fn).float() - x).double() * ct.double()[:, None, None]
            err = (d * d * hist).sum(dim=(1, 2))
            if best is None:
                best = err
                continue
            better = err < best * (1.0 - 1e-9)  # a margin: sums in another order never flip a near tie
            best = torch.where(better, err, best)
            best_c = torch.where(better, ct, best_c)
        c = best_c
    row_scale = c
    if log2_multiplier2 is None:
        row_scale = row_scale * 2.0 ** -log2_multiplier
    else:
        odd = torch.arange(row_scale.shape[0], device=c.device) % 2 == 1  # (no host tensor: capturable)
        row_scale = row_scale * torch.where(odd, 2.0 ** -log2_multiplier2, 2.0 ** -log2_multiplier)
    return 1.0 / c, row_scale


def fp8_row_rescale(w_scales: torch.Tensor, log2_multiplier: int, log2_multiplier2: int | None = None,
                    hist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio (N, G) fp32 = s_g inv_row, row_scale (N,)) of fp8_row_factors."""
    inv_row, row_scale = fp8_row_factors(w_scales, log2_multiplier, log2_multiplier2, hist)
    return w_scales.float() * inv_row[:, None], row_scale


def int4_to_fp8_ref(qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int, k: int,
                    group_size: int, log2_multiplier2: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """INT4 weights with group scales re-rounded to FP8 E4M3 with one scale a row (inexact: the product
    q s_g has more significant bits than E4M3 keeps; rounded to nearest even). What the FP8 prefill path
    multiplies: a plain FP8 GEMM with per-token and per-channel scales, no per-group rescale.

    qweight: (N, ceil(K/2)) uint8 (checkpoint layout); w_scales: (N, G) -> (w8 (N, K) fp8 e4m3,
    row_scale (N,) fp32), dequantized weight ~= w8 * row_scale[:, None]."""
    codes = unpack_int4_ref(qweight, k)
    ratio, row_scale = fp8_row_rescale(w_scales, log2_multiplier, log2_multiplier2, code_histogram(codes, group_size))
    codes = codes.float() * group_scales_ref(ratio, k, group_size)
    return codes.to(torch.float8_e4m3fn), row_scale


def w4a8_prefill_fp8_ref(xq: torch.Tensor, x_scale: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor,
                         log2_multiplier: int, group_size: int, bias: torch.Tensor | None = None,
                         out_dtype: torch.dtype = torch.bfloat16,
                         acc_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """out = (xq * x_scale) @ (w8 * row_scale)^T + bias with (w8, row_scale) = int4_to_fp8_ref(...).
    xq: (M, K) fp8; x_scale: (M, 1) fp32; qweight: (N, ceil(K/2)) uint8; w_scales: (N, G) -> (M, N)."""
    k = xq.shape[1]
    w8, row_scale = int4_to_fp8_ref(qweight, w_scales, log2_multiplier, k, group_size)
    out = (xq.to(acc_dtype) @ w8.to(acc_dtype).t()) * x_scale.to(acc_dtype) * row_scale.to(acc_dtype)
    if bias is not None:
        out = out + bias.to(acc_dtype)
    return out.to(out_dtype)


def w4a8_linear_fp8_ref(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor, log2_multiplier: int,
                        group_size: int, bias: torch.Tensor | None = None, epilogue: str | None = None,
                        log2_multiplier2: int | None = None, residual: torch.Tensor | None = None,
                        acc_dtype: torch.dtype = torch.float32, gemm_dtype: torch.dtype = torch.bfloat16,
                        out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole linear on the FP8 prefill path (w4_fp8.w4a8_linear_fp8), arguments as w4a8_linear_ref:
    per-token FP8 x, weights re-rounded by int4_to_fp8_ref (the gate/up multipliers folded into the row
    scales), y = bf16((xq @ w8^T) x_scale row_scale) (the rowwise-scaled FP8 GEMM writes bf16), then in
    fp32: + bias (with a gated epilogue, bias times the row's 2^-e: the INT4 GEMM adds it before the
    multipliers), act(gate) * up, + residual, cast to out_dtype (default x.dtype). An oracle passes acc_dtype =
    gemm_dtype = out_dtype = float64 (x is still quantized from its own dtype, as the kernel does)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xq, xs = quantize_fp8_rows_ref(x2)
    e2 = None if epilogue is None else (log2_multiplier if log2_multiplier2 is None else log2_multiplier2)
    w8, row_scale = int4_to_fp8_ref(qweight, w_scales, log2_multiplier, k, group_size, e2)
    y = ((xq.to(acc_dtype) @ w8.to(acc_dtype).t()) * xs.to(acc_dtype) * row_scale.to(acc_dtype))
    y = y.to(gemm_dtype).to(acc_dtype)
    if bias is not None:
        b = bias.to(acc_dtype)
        if epilogue is not None:
            odd = torch.arange(b.shape[0], device=b.device) % 2 == 1
            b = b * torch.where(odd, 2.0 ** -e2, 2.0 ** -log2_multiplier).to(acc_dtype)
        y = y + b
    if epilogue is not None:
        y = gated_act_ref(y[:, 0::2], epilogue) * y[:, 1::2]
    if residual is not None:
        y = y + residual.reshape(y.shape[0], -1).to(acc_dtype)
    return y.to(out_dtype or x.dtype).reshape(*x.shape[:-1], -1)


def kv4_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      mask: torch.Tensor | None = None, q_bias: torch.Tensor | None = None,
                      k_bias: torch.Tensor | None = None, acc_dtype: torch.dtype = torch.float32,
                      pv_fp8_scale: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + q_bias k_bias^T + mask) v with GQA.

    q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) (already dequantized); mask: broadcastable to
    (B, Hq, Lq, Lk), additive (-inf where masked) or boolean (True = keep); q_bias: (B, Hq, Lq, R),
    k_bias: (B, Hkv or Hq, Lk, R) low-rank bias factors (FlashBias). Output (B, Hq, Lq, D) in q.dtype.

    pv_fp8_scale: V's per-token scales (B, Hkv, Lk) (v = codes * scale): P.V as the kernel's FP8 option
    computes it. The unnormalized probabilities exp(s - rowmax) times each key's V scale over the
    largest V scale of the head, times 256, are rounded to FP8 E4M3 and multiply V's integer codes;
    the row sum uses the unrounded probabilities. (The kernel rounds against its running max and the
    running largest scale, tile by tile: the same rounding, at other points.)
    """
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    kk = k.to(acc_dtype).repeat_interleave(rep, dim=1)
    vv = v.to(acc_dtype).repeat_interleave(rep, dim=1)
    s = (q.to(acc_dtype) @ kk.transpose(-1, -2)) * scale
    if q_bias is not None:
        kb = k_bias.to(acc_dtype)
        if kb.shape[1] != hq:
            kb = kb.repeat_interleave(hq // kb.shape[1], dim=1)
        s = s + q_bias.to(acc_dtype) @ kb.transpose(-1, -2)
    if mask is not None:
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask, float("-inf"))
        else:
            s = s + mask.to(acc_dtype)
    if pv_fp8_scale is not None:
        return _pv_fp8(s, vv, pv_fp8_scale.to(acc_dtype).repeat_interleave(rep, dim=1)).to(q.dtype)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows give zeros
    return (p @ vv).to(q.dtype)


PV_RANGE = 256.0  # the kernel's FP8 P.V scaling (attention_kv4.PV_RANGE)


def _pv_fp8(s: torch.Tensor, vv: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """s: (B, H, Lq, Lk) scores (-inf masked); vv: (B, H, Lk, D) dequantized V; vs: (B, H, Lk) V scales."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # masked: 0
    l = p.sum(dim=-1, keepdim=True)
    c = vs.amax(dim=-1, keepdim=True).clamp_min(1e-30)  # (B, H, 1)
    pv = (p * (vs * (PV_RANGE / c))[:, :, None, :]).to(torch.float8_e4m3fn).to(s.dtype)
    codes = torch.where(vs[..., None] > 0, vv / vs[..., None].clamp_min(1e-30), torch.zeros_like(vv)).round()
    out = (pv @ codes) * (c / PV_RANGE)[..., None]
    return out / torch.where(l == 0, torch.ones_like(l), l)


def stage_kv_ref(k: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor, k_zero: torch.Tensor | None = None,
                 v_zero: torch.Tensor | None = None, pv_fp8: bool = False,
                 seqlens_k: torch.Tensor | None = None, v_scaled: bool = False,
                 k_scale: torch.Tensor | None = None):
    """Twin of attention_kv4.stage_kv_triton. k, v: (B, Hkv, Lk, D/2) uint8 codes of one group a token;
    v_scale, k_scale: (B, Hkv, Lk, 1); k_zero, v_zero: (B, Hkv, Lk, 1) uint8 or None. Returns (k8 (B, Hkv,
    Lk, D) float8 codes, vo (B, Hkv, Lk, D) fp16 or (pv_fp8) float8 codes, vmax (B * Hkv,) fp32 the largest
    V scale of each head's first seqlens_k[b] keys, or None, ks_copy (B, Hkv, Lk) the key scales in fp16
    for FP8 scales (exact) or fp32, or None without k_scale); with seqlens_k, keys past seqlens_k[b] are
    zeros in all three. v_scaled (fp16 V): codes times the token's V scale, rounded to fp16 (exact for FP8
    scales)."""
    from fireq.formats.kv import unpack_kv_codes

    d = 2 * k.shape[-1]
    sym = k_zero is None
    kc = unpack_kv_codes(k, d, sym).float()
    vc = unpack_kv_codes(v, d, sym).float()
    if not sym:
        kc = kc - k_zero.float()
        vc = vc - v_zero.float()
    keep = torch.ones(k.shape[:3], dtype=torch.bool, device=k.device)  # (B, Hkv, Lk)
    if seqlens_k is not None:  # keys past a sequence's length: zeros
        keep = (torch.arange(k.shape[2], device=k.device)[None, :] < seqlens_k.to(k.device)[:, None])[:, None, :]
        keep = keep.expand(k.shape[:3])
    k8 = torch.where(keep[..., None], kc, 0.0).to(torch.float8_e4m3fn)
    ks_copy = None
    if k_scale is not None:
        ks = torch.where(keep, k_scale[..., 0].float(), 0.0)
        ks_copy = ks.to(torch.float16 if k_scale.dtype == torch.float8_e4m3fn else torch.float32)
    if not pv_fp8:
        if v_scaled:
            vc = vc * v_scale.float()
        return k8, torch.where(keep[..., None], vc, 0.0).to(torch.float16), None, ks_copy
    vc = torch.where(keep[..., None], vc, 0.0)
    vs = torch.where(keep, v_scale[..., 0].float(), 0.0)
    return k8, vc.to(torch.float8_e4m3fn), vs.amax(dim=-1).clamp_min(0).reshape(-1), ks_copy


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool = False) -> torch.Tensor:
    """RMSNorm as transformers computes it. x: (..., D); weight: (D,). Llama family: the normalized x is
    rounded to x's dtype before the weight multiplies it; Gemma (plus_one): x * rsqrt(.) * (1 + w) in
    fp32, rounded to x's dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if plus_one:
        return (y * (1.0 + weight.float())).type_as(x)
    return weight * y.to(x.dtype)


def argmax_rows_ref(x: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B, 1) int64: each row's first index of its largest value (NaN counts as the largest)."""
    return torch.argmax(x, dim=-1, keepdim=True)


def rope_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding as transformers' Llama-family apply_rotary_pos_emb computes it: x * cos + rotate_half(x)
    * sin in x's dtype, every operation rounded. q (B, Hq, L, D), k (B, Hk, L, D); cos, sin (B or 1, L, D)."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def rot(x):
        h = x.shape[-1] // 2
        return torch.cat((-x[..., h:], x[..., :h]), dim=-1)

    return q * c + rot(q) * s, k * c + rot(k) * s
