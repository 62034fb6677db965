"""Triton kernel of the row-sparse product ``models/ops/sparse_ffn.py``: y[m, :] = sum_f h[m, f] * W[f, :].

Imported only through ``sparse_ffn._kernels()`` (after checking that Triton and CUDA are there). W is stored
input-major ([F, C] contiguous: the row of input f is C contiguous elements), so the rows f where every h[m, f]
is zero can be left out of the weight load: their lanes are masked off and issue no memory traffic. Each
program owns BLOCK_C output columns and one slice of F (``f_per_split``, the second grid axis), walks it in
[BLOCK_F, BLOCK_C] tiles (two per step), and accumulates float32 products element-wise per row of h (the products of two
fp16 / bf16 numbers are exact in float32), reducing over F once at the end; the split partials meet in
``_gemv_kernels._finish`` (fixed split order).

Dense and sparse are the same compiled kernel (``skip_zeros`` is a runtime argument that Triton does not
specialize): a skipped row adds exact zeros in the dense mode, so both modes give the same bits for finite W.
"""

import triton
import triton.language as tl

from rwkv_chat.models.ops._gemv_kernels import _finish


@triton.jit
def _rows_tile(h_ptr, w_ptr, f0, f_hi, offs_c, c_ok, C, stride_hm, skip_zeros, ROWS: tl.constexpr,
               BLOCK_F: tl.constexpr):
    """Rows f0 .. f0 + BLOCK_F (below f_hi) of h (float32 [BLOCK_F] per batch row; rows past ROWS are row 0's,
    unused) and the float32 weight tile [BLOCK_F, BLOCK_C] at columns offs_c, its rows left unread (zero) where
    ``skip_zeros`` and h[:, f] == 0 for every batch row."""
    offs_f = f0 + tl.arange(0, BLOCK_F)
    f_ok = offs_f < f_hi
    h0 = tl.load(h_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)
    h1 = h0
    h2 = h0
    h3 = h0
    nz = h0 != 0.0
    if ROWS > 1:
        h1 = tl.load(h_ptr + stride_hm + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        nz = nz | (h1 != 0.0)
    if ROWS > 2:
        h2 = tl.load(h_ptr + 2 * stride_hm + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        nz = nz | (h2 != 0.0)
    if ROWS > 3:
        h3 = tl.load(h_ptr + 3 * stride_hm + offs_f, mask=f_ok, other=0.0).to(tl.float32)
        nz = nz | (h3 != 0.0)
    keep = f_ok & (nz | (tl.full((BLOCK_F,), skip_zeros, tl.int32) == 0))
    w = tl.load(w_ptr + offs_f[:, None] * C + offs_c[None, :], mask=keep[:, None] & c_ok[None, :],
                other=0.0).to(tl.float32)
    return h0, h1, h2, h3, w


@triton.jit(do_not_specialize=["skip_zeros"])
def sparse_rows_kernel(h_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, M, F, C, stride_hm, stride_ym, f_per_split, n_splits,
                       skip_zeros, ROWS: tl.constexpr, SPLIT: tl.constexpr, BLOCK_F: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """y[m, c] = sum_f h[m, f] * w[f, c] for m < M = ROWS (1..4), w [F, C] contiguous; with ``skip_zeros``
    != 0 the weight rows f with h[:, f] == 0 are not read. Two tiles per loop step, both loads issued before
    their products (twice the bytes in flight for the registers of one accumulator tile)."""
    pid_c = tl.program_id(0)
    pid_f = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = offs_c < C
    acc0 = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_F, BLOCK_C), dtype=tl.float32)
    f_lo = pid_f * f_per_split
    f_hi = tl.minimum(f_lo + f_per_split, F)
    for f0 in range(f_lo, f_hi, 2 * BLOCK_F):
        a0, a1, a2, a3, wa = _rows_tile(h_ptr, w_ptr, f0, f_hi, offs_c, c_ok, C, stride_hm, skip_zeros, ROWS,
                                        BLOCK_F)
        b0, b1, b2, b3, wb = _rows_tile(h_ptr, w_ptr, f0 + BLOCK_F, f_hi, offs_c, c_ok, C, stride_hm, skip_zeros,
                                        ROWS, BLOCK_F)
        acc0 += a0[:, None] * wa
        acc0 += b0[:, None] * wb
        if ROWS > 1:
            acc1 += a1[:, None] * wa
            acc1 += b1[:, None] * wb
        if ROWS > 2:
            acc2 += a2[:, None] * wa
            acc2 += b2[:, None] * wb
        if ROWS > 3:
            acc3 += a3[:, None] * wa
            acc3 += b3[:, None] * wb
    offs_m = tl.arange(0, 4)
    rows = offs_m[:, None]
    acc = tl.where(rows == 0, tl.sum(acc0, axis=0)[None, :], 0.0)
    if ROWS > 1:
        acc = tl.where(rows == 1, tl.sum(acc1, axis=0)[None, :], acc)
    if ROWS > 2:
        acc = tl.where(rows == 2, tl.sum(acc2, axis=0)[None, :], acc)
    if ROWS > 3:
        acc = tl.where(rows == 3, tl.sum(acc3, axis=0)[None, :], acc)
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_c, offs_m < M, c_ok, M, C, stride_ym, n_splits, SPLIT, 4,
            BLOCK_C)
