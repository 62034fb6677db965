"""Triton kernel of ``fused_ln_qkv_gptq`` (``models/ops/gptq.py``); imported only after Triton was found.

One program computes BLOCK_N output columns for BLOCK_M rows: the rows' LayerNorm (or RMSNorm) statistics in
float32 by Welford's method over chunks of BLOCK_K (each chunk's mean and M2, merged with Chan et al.'s
parallel update), then the product with the int4 weight, dequantized in registers ((q - ((z + 1) & 15)) * s,
GPTQ "v1" zeros) chunk by chunk, the normalized input recomputed per chunk (x, weight and bias re-read from
cache). The output columns are written into three regions of one buffer: q [M, Nq], k [M, Nk], v [M, Nv].
``ln_qkv_gptq_gemv_kernel`` serves M <= 4 rows (decode) as a GEMV (see its docstring).
"""

import triton
import triton.language as tl

from rwkv_chat.models.ops._gemv_kernels import _dequant_tile
from rwkv_chat.models.ops._prenorm_kernels import apply_norm, load_rows, row_stats


@triton.jit
def ln_qkv_gptq_kernel(x_ptr, lw_ptr, lb_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, out_ptr, M, H, N, n_q, n_k, group,
                       eps, stride_xm, stride_qk, stride_qn, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    # -- statistics: Welford over chunks (count, mean, M2 per row), float32
    mean, rstd = row_stats(x_ptr, x_ptr, offs_m, m_ok, H, stride_xm, stride_xm, eps, NORM, False, BLOCK_M, BLOCK_K)
    # -- product with the dequantized int4 weight
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        x = load_rows(x_ptr, x_ptr, offs_m, m_ok, offs_k, k_ok, stride_xm, stride_xm, False)
        xn = apply_norm(x, lw_ptr, lb_ptr, offs_k, k_ok, mean, rstd, NORM, HAS_BIAS).to(x.dtype)
        w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, k0, offs_k, k_ok, offs_n, n_ok, H, N, group, stride_qk,
                          stride_qn, HAS_GIDX, ONE_GROUP, BLOCK_K, BLOCK_N).to(x.dtype)
        acc += tl.dot(xn, w)
    _store_qkv(out_ptr, acc, offs_m, m_ok, offs_n, n_ok, M, N, n_q, n_k)


@triton.jit
def _store_qkv(out_ptr, acc, offs_m, m_ok, offs_n, n_ok, M, N, n_q, n_k):
    """Write the [rows, BLOCK_N] sums into the q [M, Nq], k [M, Nk], v [M, Nv] regions of the output."""
    n_kv = n_q + n_k
    n_v = N - n_kv
    in_q = offs_n < n_q
    in_k = (offs_n >= n_q) & (offs_n < n_kv)
    base = tl.where(in_q, 0, tl.where(in_k, M * n_q, M * n_kv))
    width = tl.where(in_q, n_q, tl.where(in_k, n_k, n_v))
    col = tl.where(in_q, offs_n, tl.where(in_k, offs_n - n_q, offs_n - n_kv))
    ptrs = out_ptr + base[None, :] + offs_m[:, None] * width[None, :] + col[None, :]
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def ln_qkv_gptq_gemv_kernel(x_ptr, lw_ptr, lb_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, out_ptr, M, H, N, n_q, n_k, group,
                            eps, stride_xm, stride_qk, stride_qn, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                            HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr, R_PAD: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same product for M <= 4 rows (a decode step): a GEMV, no tensor-core tile. One program per BLOCK_N
    outputs over all of H; the norm statistics by ``_prenorm_kernels.row_stats``; the elementwise products
    accumulate in a float32 [R_PAD, BLOCK_K, BLOCK_N] register tile summed once at the end. NORM: 1 RMSNorm,
    2 LayerNorm (``_prenorm_kernels``)."""
    pid = tl.program_id(0)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < M
    mean, rstd = row_stats(x_ptr, x_ptr, offs_r, r_ok, H, stride_xm, stride_xm, eps, NORM, False, R_PAD, BLOCK_K)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    acc = tl.zeros((R_PAD, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < H
        h = load_rows(x_ptr, x_ptr, offs_r, r_ok, offs_k, k_ok, stride_xm, stride_xm, False)
        xk = apply_norm(h, lw_ptr, lb_ptr, offs_k, k_ok, mean, rstd, NORM, HAS_BIAS)
        w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, k0, offs_k, k_ok, offs_n, n_ok, H, N, group, stride_qk,
                          stride_qn, HAS_GIDX, ONE_GROUP, BLOCK_K, BLOCK_N)
        acc += xk[:, :, None] * w.to(h.dtype).to(tl.float32)[None, :, :]
    _store_qkv(out_ptr, tl.sum(acc, axis=1), offs_r, r_ok, offs_n, n_ok, M, N, n_q, n_k)


@triton.jit
def _v7_rkv_product(x_ptr, dx_ptr, lw_ptr, lb_ptr, shift_ptr, mix_ptr, qw_ptr, qz_ptr, sc_ptr, mean, rstd,
                    offs_r, r_ok, offs_n, n_ok, C, N, group, stride_xm, stride_dm, stride_sm, stride_qk, stride_qn,
                    HAS_DX: tl.constexpr, ONE_GROUP: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Sum over C of the mixed input ``round(xl + (shift - xl) * mix)`` (xl the rounded LayerNorm of x + dx) times
    the dequantized int4 weight: [R_PAD, BLOCK_N] float32."""
    acc = tl.zeros((R_PAD, BLOCK_K, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < C
        h = load_rows(x_ptr, dx_ptr, offs_r, r_ok, offs_k, k_ok, stride_xm, stride_dm, HAS_DX)
        xl = apply_norm(h, lw_ptr, lb_ptr, offs_k, k_ok, mean, rstd, 2, True)
        m = r_ok[:, None] & k_ok[None, :]
        pv = tl.load(shift_ptr + offs_r[:, None] * stride_sm + offs_k[None, :], mask=m, other=0.0).to(tl.float32)
        mx = tl.load(mix_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        xm = (xl + (pv - xl) * mx[None, :]).to(h.dtype).to(tl.float32)
        w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, qw_ptr, k0, offs_k, k_ok, offs_n, n_ok, C, N, group, stride_qk,
                          stride_qn, False, ONE_GROUP, BLOCK_K, BLOCK_N)
        acc += xm[:, :, None] * w.to(h.dtype).to(tl.float32)[None, :, :]
    return tl.sum(acc, axis=1)


@triton.jit
def v7_mix_rkv_i4_kernel(x_ptr, dx_ptr, xo_ptr, lw_ptr, lb_ptr, shift_ptr, mix_ptr, mo_ptr,
                         qr_ptr, zr_ptr, sr_ptr, qk_ptr, zk_ptr, sk_ptr, qv_ptr, zv_ptr, sv_ptr,
                         r_ptr, k_ptr, v_ptr, cnt_ptr, rows, C, N, group, eps,
                         stride_xm, stride_dm, stride_sm, stride_qk, stride_qn,
                         HAS_DX: tl.constexpr, ONE_GROUP: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """RWKV-7 decode, the start of a layer in one launch: h = x + dx, xl = LayerNorm(h) (ln1), the six token-shift
    mixes ``round(xl + (shift - xl) * mix6[m])`` (r, w, k, v, a, g; written to mo [6, rows, C] by program 0, with
    h to xo), and the r, k, v products with their int4 weights (program e·nb + j: product e, outputs j·BLOCK_N..).
    Every program reads ``shift`` (the previous token's xl); the last program to finish (an acq_rel counter, reset
    to 0 after) writes the new one, xl, so no program reads it after it changed. The counter is shared with the
    split-K GEMVs of ``gemv.py`` (slot 0): launches on one stream at a time (CUDA graphs and the decoders run one)."""
    pid = tl.program_id(0)
    nb = tl.cdiv(N, BLOCK_N)
    e = pid // nb
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < rows
    offs_n = (pid % nb) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    out_ok = r_ok[:, None] & n_ok[None, :]
    mean, rstd = row_stats(x_ptr, dx_ptr, offs_r, r_ok, C, stride_xm, stride_dm, eps, 2, HAS_DX, R_PAD, BLOCK_K)
    if e == 0:
        y = _v7_rkv_product(x_ptr, dx_ptr, lw_ptr, lb_ptr, shift_ptr, mix_ptr, qr_ptr, zr_ptr, sr_ptr, mean, rstd,
                            offs_r, r_ok, offs_n, n_ok, C, N, group, stride_xm, stride_dm, stride_sm, stride_qk,
                            stride_qn, HAS_DX, ONE_GROUP, R_PAD, BLOCK_N, BLOCK_K)
        tl.store(r_ptr + offs_r[:, None] * N + offs_n[None, :], y.to(r_ptr.dtype.element_ty), mask=out_ok)
    elif e == 1:
        y = _v7_rkv_product(x_ptr, dx_ptr, lw_ptr, lb_ptr, shift_ptr, mix_ptr + 2 * C, qk_ptr, zk_ptr, sk_ptr, mean,
                            rstd, offs_r, r_ok, offs_n, n_ok, C, N, group, stride_xm, stride_dm, stride_sm, stride_qk,
                            stride_qn, HAS_DX, ONE_GROUP, R_PAD, BLOCK_N, BLOCK_K)
        tl.store(k_ptr + offs_r[:, None] * N + offs_n[None, :], y.to(k_ptr.dtype.element_ty), mask=out_ok)
    else:
        y = _v7_rkv_product(x_ptr, dx_ptr, lw_ptr, lb_ptr, shift_ptr, mix_ptr + 3 * C, qv_ptr, zv_ptr, sv_ptr, mean,
                            rstd, offs_r, r_ok, offs_n, n_ok, C, N, group, stride_xm, stride_dm, stride_sm, stride_qk,
                            stride_qn, HAS_DX, ONE_GROUP, R_PAD, BLOCK_N, BLOCK_K)
        tl.store(v_ptr + offs_r[:, None] * N + offs_n[None, :], y.to(v_ptr.dtype.element_ty), mask=out_ok)
    if pid == 0:                     # the residual stream and the six mixes
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C
            m = r_ok[:, None] & k_ok[None, :]
            h = load_rows(x_ptr, dx_ptr, offs_r, r_ok, offs_k, k_ok, stride_xm, stride_dm, HAS_DX)
            if HAS_DX:
                tl.store(xo_ptr + offs_r[:, None] * C + offs_k[None, :], h, mask=m)
            xl = apply_norm(h, lw_ptr, lb_ptr, offs_k, k_ok, mean, rstd, 2, True)
            pv = tl.load(shift_ptr + offs_r[:, None] * stride_sm + offs_k[None, :], mask=m, other=0.0).to(tl.float32)
            for j in range(0, 6):
                mx = tl.load(mix_ptr + j * C + offs_k, mask=k_ok, other=0.0).to(tl.float32)
                tl.store(mo_ptr + j * rows * C + offs_r[:, None] * C + offs_k[None, :],
                         (xl + (pv - xl) * mx[None, :]).to(h.dtype), mask=m)
    tl.debug_barrier()                   # every warp's reads of shift come before this program's release
    done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:   # every program has read shift: the new shift state, xl
        for k0 in range(0, C, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < C
            h = load_rows(x_ptr, dx_ptr, offs_r, r_ok, offs_k, k_ok, stride_xm, stride_dm, HAS_DX)
            xl = apply_norm(h, lw_ptr, lb_ptr, offs_k, k_ok, mean, rstd, 2, True)
            tl.store(shift_ptr + offs_r[:, None] * stride_sm + offs_k[None, :], xl.to(h.dtype),
                     mask=r_ok[:, None] & k_ok[None, :])
        tl.atomic_xchg(cnt_ptr, 0)
