"""Row-wise argmax of a (B, V) tensor in two small Triton launches (greedy decoding's next token).

torch.argmax over a 128K-entry vocabulary row is one reduction kernel that takes about 36 us on an H200 at
B = 1 (decode-profile-b1-h200.json): a few programs walk the whole row. Here CHUNKS programs a row each reduce
a slice to one int64 that orders like (value, -index): the value's fp32 bits mapped to an order-preserving
int32 in the high half, 2^32 - 1 - index in the low half, so the largest packed word is the largest value at
its first index. A second launch takes the largest word of each row's slices and writes the index (int64).

Same result as torch.argmax (twin: reference.argmax_rows_ref): the first index of the largest value; -0.0
counts as +0.0 and any NaN as the largest value (its first occurrence), as PyTorch treats them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import on_tensor_device


@triton.jit
def _argmax_chunks_kernel(x_ptr, part_ptr, V, stride_x, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    c = tl.program_id(1)
    best = tl.full((BLOCK,), -9223372036854775807 - 1, dtype=tl.int64)
    for off in range(0, CHUNK, BLOCK):
        idx = c * CHUNK + off + tl.arange(0, BLOCK)
        m = idx < V
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + idx, mask=m, other=0.0).to(tl.float32)
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 as +0.0
        bits = x.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # fp32 order as signed int32 order
        key = tl.where(x != x, 2147483647, key)  # NaN above everything
        word = (key.to(tl.int64) << 32) + (4294967295 - idx.to(tl.int64))
        best = tl.maximum(best, tl.where(m, word, -9223372036854775807 - 1))
    tl.store(part_ptr + row * CHUNKS + c, tl.max(best, axis=0))


@triton.jit
def _argmax_rows_kernel(part_ptr, out_ptr, CHUNKS: tl.constexpr):
    row = tl.program_id(0)
    w = tl.max(tl.load(part_ptr + row * CHUNKS + tl.arange(0, CHUNKS)), axis=0)
    tl.store(out_ptr + row, 4294967295 - (w & 4294967295))


@on_tensor_device
def argmax_rows_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, V) float (contiguous rows, V < 2^32) -> (B, 1) int64 indices of each row's largest value (the
    first one), written into out when given ((B, 1) int64)."""
    if x.dim() != 2 or x.stride(-1) != 1 or not x.is_floating_point() or x.shape[1] >= 2**32 - 1:
        raise ValueError("argmax_rows_triton: x must be (B, V) float with contiguous rows")
    b, v = x.shape
    if out is None:
        out = torch.empty((b, 1), dtype=torch.int64, device=x.device)
    if b == 0:
        return out
    if v == 0:
        raise ValueError("argmax_rows_triton: empty rows")
    block = 1024
    chunks = max(1, min(64, triton.next_power_of_2(triton.cdiv(v, 2 * block))))
    chunk = triton.cdiv(triton.cdiv(v, chunks), block) * block
    part = torch.empty((b, chunks), dtype=torch.int64, device=x.device)
    _argmax_chunks_kernel[(b, chunks)](x, part, v, x.stride(0), CHUNK=chunk, CHUNKS=chunks, BLOCK=block,
                                       num_warps=4)
    _argmax_rows_kernel[(b,)](part, out, CHUNKS=chunks, num_warps=1)
    return out
