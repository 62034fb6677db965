"""Triton kernels of the weight-only GEMVs (``models/ops/gemv.py``): int4 (GPTQ layout), fp8 e4m3 and the reference's
uint8 scheme (i8, for batches above the compiled GEMV's rows).

Imported only through ``gemv._kernels()`` (after checking that Triton and CUDA are there). The kernels take
x [M, K] (fp16/bf16; BLOCK_M rows per program, the third grid axis over row blocks; the int4 kernel also over the
G matrices of a stack), dequantize a [BLOCK_K, BLOCK_N] weight tile in registers
(the i8 kernel: [BLOCK_N, BLOCK_K], the product's first operand), and accumulate
``tl.dot`` products in float32 over a slice of K (``k_per_split``; the second grid axis), so that a decode
step's matrices fill every multiprocessor. Split results meet in ``_finish``.
"""

import triton
import triton.language as tl


@triton.jit
def _f32_bits(v):
    """int32 v in 0..15 -> float32 v + 2^23 (bits 0x4B000000 | v: the value lands in the mantissa), without a
    conversion instruction; the difference of two such numbers is the integer difference, exactly."""
    return (v | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _f16_bits(v):
    """int32 / int16 v in 0..1023 -> float16 v + 1024 (bits 0x6400 | v), exactly and without a conversion
    instruction; the difference of two such numbers is the integer difference, exactly."""
    return (v.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True)


@triton.jit
def _zeros(qz_ptr, g, offs_n, n_ok, N):
    """The zero points z (int32 0..15) of group row(s) g and columns offs_n: stored z - 1 (GPTQ v1), 8 per word."""
    zw = tl.load(qz_ptr + g * (N // 8) + offs_n // 8, mask=n_ok, other=0)
    return (((zw >> ((offs_n % 8) * 4)) & 15) + 1) & 15


@triton.jit
def _nibbles(qw_ptr, k0, offs_n, n_ok, K, stride_qk, stride_qn, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The int32 nibbles q [BLOCK_K, BLOCK_N] (0..15) at rows k0.. and columns offs_n of a GPTQ int4 matrix: each
    int32 of ``qweight`` (word [i, n] at ``i * stride_qk + n * stride_qn``: (N, 1) in the GPTQ layout, (1, K / 8)
    output-major) loaded once ([BLOCK_K / 8, BLOCK_N] words) and split into its eight nibbles (row k = 8·i + j is
    nibble j of word i)."""
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    qw = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                 mask=(offs_w[:, None] < K // 8) & n_ok[None, :], other=0)
    shifts = tl.arange(0, 8) * 4
    return tl.reshape((qw[:, None, :] >> shifts[None, :, None]) & 15, (BLOCK_K, BLOCK_N))


@triton.jit
def _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, k0, offs_k, k_ok, offs_n, n_ok, K, N, group, stride_qk, stride_qn,
                  HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float32 weight tile [BLOCK_K, BLOCK_N] at rows k0.. and columns offs_n of a GPTQ int4 matrix.

    The nibbles of ``_nibbles``; q - z is made exactly in float32 from the bits (``_f32_bits``: no int-to-float
    conversion). With ``ONE_GROUP`` (no g_idx, BLOCK_K divides the group) the tile lies in one group:
    one row of scales and zeros; otherwise per row through g_idx or k // group.
    """
    q = _f32_bits(_nibbles(qw_ptr, k0, offs_n, n_ok, K, stride_qk, stride_qn, BLOCK_K, BLOCK_N))
    if ONE_GROUP:
        g = k0 // group
        s = tl.load(sc_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        return (q - _f32_bits(_zeros(qz_ptr, g, offs_n, n_ok, N))[None, :]) * s[None, :]
    if HAS_GIDX:
        g = tl.load(gi_ptr + offs_k, mask=k_ok, other=0)
    else:
        g = offs_k // group
    tile_ok = k_ok[:, None] & n_ok[None, :]
    s = tl.load(sc_ptr + g[:, None] * N + offs_n[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return (q - _f32_bits(_zeros(qz_ptr, g[:, None], offs_n[None, :], tile_ok, N))) * s


@triton.jit
def _finish(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, m_ok, n_ok, M, N, stride_ym, n_splits,
            SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write a program's float32 partial sums. One split: straight to y. Several: into the workspace
    [n_splits, M, N]; the tile's counter counts the splits done (acq_rel atomic), and the last one adds the
    partials in split order, writes y in its dtype and resets the counter to 0 for the next call (no zeroing
    launch, no atomics on y; the sum order is fixed, so results do not depend on timing)."""
    out_ok = m_ok[:, None] & n_ok[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT:
        pid_k = tl.program_id(1)
        tile = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile, acc, mask=out_ok)
        tile_id = tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        done = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if done == n_splits - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for i in range(0, n_splits):
                total += tl.load(ws_ptr + i * M * N + tile, mask=out_ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=out_ok)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _program_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's rows and columns of y (grid: column blocks, splits of K, row blocks) and their masks."""
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def _x_tile(x_ptr, offs_m, m_ok, k0, K, stride_xm, BLOCK_K: tl.constexpr):
    """The columns k0 .. k0 + BLOCK_K of x's rows offs_m (zeros past K or M), with those columns and their mask."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
    return offs_k, k_ok, xk


@triton.jit
def i4_gemv_kernel(x_ptr, qw_ptr, qz_ptr, sc_ptr, gi_ptr, y_ptr, ws_ptr, cnt_ptr, M, K, N, group, stride_qk, stride_qn,
                   stride_xm, stride_ym, k_per_split, n_splits, row_blocks, stride_xg, stride_qg, stride_zg, stride_sg,
                   stride_yg, HAS_GIDX: tl.constexpr, ONE_GROUP: tl.constexpr, BF16: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[i, m, n] = sum_k x[i, m, k] * (q_i[k, n] - ((z_i[g(k), n] + 1) & 15)) * s_i[g(k), n] (GPTQ v1 zeros,
    g(k) the group of row k) for the G matrices i of a stack (G = 1: one matrix, strides 0): the third grid axis
    runs over G x ``row_blocks`` blocks of rows; matrix i's words, zeros, scales, x and y lie i ``stride_*g``
    elements after matrix 0's, and its split partials in the workspace's i-th [n_splits, M, N] block.

    With ``ONE_GROUP`` and float16 x the tile is made in half precision without a conversion instruction: the
    nibble as the float16 1024 + q (``_f16_bits``), less 1024 + z (exact), times the group's scale (one rounding of
    the exact product: the same values as ``Int4Weight.dequantize``). Otherwise (bfloat16 x, g_idx, groups that
    split a tile) the float32 tile of ``_dequant_tile`` rounded once to x's dtype.
    """
    g_mat = tl.program_id(2) // row_blocks
    offs_m = (tl.program_id(2) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptr += g_mat * stride_xg
    qw_ptr += g_mat * stride_qg
    qz_ptr += g_mat * stride_zg
    sc_ptr += g_mat * stride_sg
    y_ptr += g_mat * stride_yg
    ws_ptr += g_mat * n_splits * M * N
    pid_k = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k, k_ok, xk = _x_tile(x_ptr, offs_m, m_ok, k0, K, stride_xm, BLOCK_K)
        if ONE_GROUP and not BF16:
            g = k0 // group
            q = _nibbles(qw_ptr, k0, offs_n, n_ok, K, stride_qk, stride_qn, BLOCK_K, BLOCK_N)
            s = tl.load(sc_ptr + g * N + offs_n, mask=n_ok, other=0.0)
            w = (_f16_bits(q) - _f16_bits(_zeros(qz_ptr, g, offs_n, n_ok, N))[None, :]) * s[None, :]
        else:
            w = _dequant_tile(qw_ptr, qz_ptr, sc_ptr, gi_ptr, k0, offs_k, k_ok, offs_n, n_ok, K, N, group, stride_qk,
                              stride_qn, HAS_GIDX, ONE_GROUP, BLOCK_K, BLOCK_N).to(xk.dtype)
        acc = tl.dot(xk, w, acc)
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, m_ok, n_ok, M, N, stride_ym, n_splits, SPLIT, BLOCK_M,
            BLOCK_N)


@triton.jit
def f8_gemv_kernel(x_ptr, w_ptr, sc_ptr, y_ptr, ws_ptr, cnt_ptr, M, K, N, stride_xm, stride_ym, k_per_split, n_splits,
                   SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[m, n] = scale[n] * sum_k x[m, k] * float(w8[n, k]) for e4m3fn w8 [N, K] (output-major)."""
    offs_m, offs_n, m_ok, n_ok = _program_tile(M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k, k_ok, xk = _x_tile(x_ptr, offs_m, m_ok, k0, K, stride_xm, BLOCK_K)
        w8 = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(xk, w8.to(xk.dtype))
    acc = acc * tl.load(sc_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    _finish(acc, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, m_ok, n_ok, M, N, stride_ym, n_splits, SPLIT, BLOCK_M,
            BLOCK_N)


@triton.jit
def fp8_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, BLOCK_K: tl.constexpr):
    """Per-row e4m3 quantization, one program per row: s[m] = max_k |x[m, k]| / 448 (1 for a zero row),
    q[m, k] = e4m3(clamp(x[m, k] / s[m], ±448)); q contiguous [M, K], s float32 [M]."""
    m = tl.program_id(0)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    a = tl.max(amax, axis=0)
    s = tl.where(a > 0, a / 448.0, 1.0)
    tl.store(s_ptr + m, s)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
        tl.store(q_ptr + m * K + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)


@triton.jit
def i8_gemm_kernel(x_ptr, w_ptr, mx_ptr, rx_ptr, my_ptr, ry_ptr, y_ptr, ws_ptr, cnt_ptr, M, K, N, stride_wk,
                   stride_wn, stride_xm, stride_ym, k_per_split, n_splits, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The reference's mm8 product y[m, n] = sum_k x[m, k] ((w[k, n] + 0.5) ry[k] rx[n] + my[k] + mx[n]) for uint8
    w [K, N] (element [k, n] at k * stride_wk + n * stride_wn: either layout), as
    rx[n] (sum_k xr[m, k] w[k, n] + 0.5 sum_k xr[m, k]) + sum_k x[m, k] my[k] + mx[n] sum_k x[m, k] with xr = x ry
    rounded to x's dtype: the first sum on the tensor cores in x's dtype (w, 0..255, is exact in fp16 and bf16),
    the row sums in float32 beside it. The operands are swapped (y^T = W^T xr^T): the uint8 tile [BLOCK_N, BLOCK_K],
    converted in registers (float16 x: as the float16 1024 + w less 1024, ``_f16_bits``, no conversion instruction),
    is the product's first operand, which the tensor cores take from registers (H100, 16 to 128 rows: 1.2-1.9x the
    kernel with x first)."""
    offs_m, offs_n, m_ok, n_ok = _program_tile(M, N, BLOCK_M, BLOCK_N)
    pid_k = tl.program_id(1)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    sx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sxm = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sxr = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    for k0 in range(k_lo, tl.minimum(k_lo + k_per_split, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None], mask=m_ok[None, :] & k_ok[:, None],
                     other=0.0)                                                                    # [BK, BM]
        xf = xt.to(tl.float32)
        ry = tl.load(ry_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        my = tl.load(my_ptr + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        sx += tl.sum(xf, axis=0)
        sxm += tl.sum(xf * my[:, None], axis=0)
        w = tl.load(w_ptr + offs_k[None, :] * stride_wk + offs_n[:, None] * stride_wn,
                    mask=k_ok[None, :] & n_ok[:, None], other=0)                                   # [BN, BK]
        xr = (xf * ry[:, None]).to(xt.dtype)
        sxr += tl.sum(xr.to(tl.float32), axis=0)
        if xt.dtype == tl.float16:      # w as float16 1024 + w less 1024: exact, no conversion instruction
            acc = tl.dot(_f16_bits(w) - 1024.0, xr, acc)
        else:
            acc = tl.dot(w.to(xt.dtype), xr, acc)
    rx = tl.load(rx_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    mx = tl.load(mx_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    out = (tl.trans(acc) + 0.5 * sxr[:, None]) * rx[None, :] + sxm[:, None] + sx[:, None] * mx[None, :]
    _finish(out, y_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, m_ok, n_ok, M, N, stride_ym, n_splits, SPLIT, BLOCK_M,
            BLOCK_N)
