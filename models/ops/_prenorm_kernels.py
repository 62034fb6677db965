"""Triton kernels of ``prenorm.py`` (imported only through ``_triton.kernels``: this module imports triton).

A decode step's product of a few rows: every program holds the (at most 4) activation rows it needs, so the
norm that precedes a projection is computed where the projection reads it — no launch of its own, nothing
written but the residual stream (by program 0). The jit helpers here also serve ``_gptq_kernels.py``.

Rows: R_PAD (a power of two >= the rows) row slots; rows past ``rows`` are masked. Norms (``NORM``):
0 none, 1 RMSNorm ``h * rsqrt(mean(h²) + eps) * w`` (Qwen2 ``Qwen2RMSNorm``; one rounding, as ``ops.rmsnorm``),
2 LayerNorm ``(h - mean) * rsqrt(var + eps) * w + b`` (biased variance; mean and M2 merged chunk by chunk with
Chan et al.'s parallel update, as Welford). ``h = x + residual`` rounded to x's dtype, as a torch add.

``norm_gemv_kernel``: y[r, n] = epilogue(sum_k norm(h)[r, k] * W[n, k]) for W output-major [N, K] (nn.Linear's
layout, K contiguous). Each program owns BLOCK_N outputs and walks K in BLOCK_K chunks, accumulating the
elementwise products in a float32 [R_PAD, BLOCK_N, BLOCK_K] register tile that is summed once at the end (no
cross-thread reduction per chunk). Epilogues: + bias[n]; SwiGLU ``silu(g) * u`` with g from W's row n and u
from row ``up_off + n`` (the gate|up matrix packed [2F, K]), on the float32 sums.
"""

import triton
import triton.language as tl

NORM_NONE, NORM_RMS, NORM_LAYER = 0, 1, 2


@triton.jit
def load_rows(x_ptr, res_ptr, offs_r, r_ok, offs_k, k_ok, stride_xm, stride_rm, HAS_RES: tl.constexpr):
    """h = x (+ residual) [R_PAD, BLOCK_K] in x's dtype (the sum rounded as a torch add; 0 where masked)."""
    m = r_ok[:, None] & k_ok[None, :]
    x = tl.load(x_ptr + offs_r[:, None] * stride_xm + offs_k[None, :], mask=m, other=0.0)
    if HAS_RES:
        res = tl.load(res_ptr + offs_r[:, None] * stride_rm + offs_k[None, :], mask=m, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def row_stats(x_ptr, res_ptr, offs_r, r_ok, K, stride_xm, stride_rm, eps, NORM: tl.constexpr, HAS_RES: tl.constexpr,
              R_PAD: tl.constexpr, BLOCK_K: tl.constexpr):
    """(mean, rstd) float32 [R_PAD] of the rows ``offs_r`` (masked by ``r_ok``) of h over their K values (mean 0 for
    RMSNorm)."""
    count = tl.zeros((R_PAD,), dtype=tl.float32)
    mean = tl.zeros((R_PAD,), dtype=tl.float32)
    m2 = tl.zeros((R_PAD,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        h = load_rows(x_ptr, res_ptr, offs_r, r_ok, offs_k, k_ok, stride_xm, stride_rm, HAS_RES).to(tl.float32)
        if NORM == 1:
            m2 += tl.sum(h * h, axis=1)
        else:
            n_b = tl.sum(k_ok.to(tl.float32), axis=0)
            mean_b = tl.sum(h, axis=1) / n_b
            d = tl.where(k_ok[None, :], h - mean_b[:, None], 0.0)
            m2_b = tl.sum(d * d, axis=1)
            total = count + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / total)
            m2 = m2 + m2_b + delta * delta * (count * n_b / total)
            count = total
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    if NORM == 1:
        mean = tl.zeros((R_PAD,), dtype=tl.float32)
    return mean, rstd


@triton.jit
def apply_norm(h, lw_ptr, lb_ptr, offs_k, k_ok, mean, rstd, NORM: tl.constexpr, HAS_LNB: tl.constexpr):
    """The normed chunk [R_PAD, BLOCK_K] as float32 values of h's dtype (rounded once, as the norm's output);
    h itself (as float32) for NORM 0. Masked columns are 0."""
    if NORM == 0:
        return h.to(tl.float32)
    lw = tl.load(lw_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
    xn = (h.to(tl.float32) - mean[:, None]) * rstd[:, None] * lw[None, :]
    if HAS_LNB:
        xn += tl.load(lb_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    xn = tl.where(k_ok[None, :], xn, 0.0)
    return xn.to(h.dtype).to(tl.float32)


@triton.jit
def norm_gemv_kernel(x_ptr, res_ptr, h_ptr, lw_ptr, lb_ptr, w_ptr, b_ptr, y_ptr, rows, K, N, up_off,
                     stride_xm, stride_rm, stride_hm, stride_wn, stride_ym, eps,
                     NORM: tl.constexpr, HAS_RES: tl.constexpr, HAS_LNB: tl.constexpr, HAS_BIAS: tl.constexpr,
                     SWIGLU: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < rows
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    wn = tl.where(n_ok, offs_n, 0).to(tl.int64)          # rows past N read row 0 (not stored)
    if NORM != 0:
        mean, rstd = row_stats(x_ptr, res_ptr, offs_r, r_ok, K, stride_xm, stride_rm, eps, NORM, HAS_RES, R_PAD,
                               BLOCK_K)
    else:
        mean = tl.zeros((R_PAD,), dtype=tl.float32)
        rstd = mean
    acc = tl.zeros((R_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if SWIGLU:
        acc_u = tl.zeros((R_PAD, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        h = load_rows(x_ptr, res_ptr, offs_r, r_ok, offs_k, k_ok, stride_xm, stride_rm, HAS_RES)
        if HAS_RES:
            if pid == 0:                                  # the residual stream, written once
                tl.store(h_ptr + offs_r[:, None] * stride_hm + offs_k[None, :], h,
                         mask=r_ok[:, None] & k_ok[None, :])
        xk = apply_norm(h, lw_ptr, lb_ptr, offs_k, k_ok, mean, rstd, NORM, HAS_LNB)
        w_ok = k_ok[None, :]
        w = tl.load(w_ptr + wn[:, None] * stride_wn + offs_k[None, :], mask=w_ok, other=0.0).to(tl.float32)
        acc += xk[:, None, :] * w[None, :, :]
        if SWIGLU:
            u = tl.load(w_ptr + (wn[:, None] + up_off) * stride_wn + offs_k[None, :], mask=w_ok,
                        other=0.0).to(tl.float32)
            acc_u += xk[:, None, :] * u[None, :, :]
    out = tl.sum(acc, axis=2)                             # [R_PAD, BLOCK_N]
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        out = out * tl.sigmoid(out) * tl.sum(acc_u, axis=2)
    tl.store(y_ptr + offs_r[:, None] * stride_ym + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & n_ok[None, :])
