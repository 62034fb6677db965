"""Triton kernels of ``rmsnorm_rope.py`` (imported only through ``_triton.kernels``: this module imports triton).

All row kernels run one program per token row, load in the tensor's dtype and compute in fp32.
The RoPE tile views a row as [heads, 2, D/2]: ``x1 = x[h, :D/2]``, ``x2 = x[h, D/2:]`` and writes
``out[h, :D/2] = x1*cos[:D/2] - x2*sin[:D/2]``, ``out[h, D/2:] = x2*cos[D/2:] + x1*sin[D/2:]``, which is
``x*cos + rotate_half(x)*sin`` of Hugging Face's ``apply_rotary_pos_emb`` (Llama, Qwen2, Qwen3).
"""

from __future__ import annotations

import triton
import triton.language as tl

#: norm modes of the RoPE tile: no norm, RMSNorm per head (weight [D]), RMSNorm of the whole row (weight [H*D])
NORM_NONE, NORM_HEAD, NORM_ROW = 0, 1, 2


@triton.jit
def _rope_tile(X, O, W, C, S, x_off, o_off, c_off, sxh, soh, n_heads, n_row, eps,
               HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dm = d < HALF
    m = (h < n_heads) & dm
    x1 = tl.load(X + x_off + h * sxh + d, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + h * sxh + d + HALF, mask=m, other=0.0).to(tl.float32)
    if NORM == 1:  # RMSNorm over each head's D (Qwen3 q_norm / k_norm), weight [D]
        ms = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        r = tl.rsqrt(ms + eps)[:, None]
        w1 = tl.load(W + d, mask=dm, other=0.0).to(tl.float32)
        w2 = tl.load(W + d + HALF, mask=dm, other=0.0).to(tl.float32)
        x1 = x1 * r * w1
        x2 = x2 * r * w2
    if NORM == 2:  # RMSNorm over the whole row (n_row = H*D values), weight [H*D]
        ms = (tl.sum(tl.sum(x1 * x1, axis=1), axis=0) + tl.sum(tl.sum(x2 * x2, axis=1), axis=0)) / n_row
        r = tl.rsqrt(ms + eps)
        w1 = tl.load(W + h * (2 * HALF) + d, mask=m, other=0.0).to(tl.float32)
        w2 = tl.load(W + h * (2 * HALF) + d + HALF, mask=m, other=0.0).to(tl.float32)
        x1 = x1 * r * w1
        x2 = x2 * r * w2
    c1 = tl.load(C + c_off + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(C + c_off + d + HALF, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(S + c_off + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(S + c_off + d + HALF, mask=dm, other=0.0).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    tl.store(O + o_off + h * soh + d, o1.to(O.dtype.element_ty), mask=m)
    tl.store(O + o_off + h * soh + d + HALF, o2.to(O.dtype.element_ty), mask=m)


@triton.jit
def rmsnorm_rope_kernel(X, O, W, C, S, T, sxr, sor, scb, sct, n_heads, n_row, eps,
                        HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """X, O: [N, H*D] rows (row r = b*T + t), W: [H*D], C/S: cos/sin rows at b*scb + t*sct."""
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    _rope_tile(X, O, W, C, S, r * sxr, r * sor, b * scb + t * sct, 2 * HALF, 2 * HALF, n_heads, n_row, eps,
               HALF, BLOCK_H, BLOCK_HALF, 2)


@triton.jit
def rope_qk_kernel(Q, K, QO, KO, QW, KW, C, S, T,
                   sqb, sqt, sqh, skb, skt, skh, sob, sot, soh, skob, skot, skoh, scb, sct,
                   n_q, n_k, eps,
                   HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    """q [B, T, Hq, D] and k [B, T, Hkv, D] (strided, last dim contiguous) of one (b, t) per program; NORM 0
    (RoPE only) or 1 (per-head RMSNorm with QW/KW [D], then RoPE)."""
    r = tl.program_id(0).to(tl.int64)
    b = r // T
    t = r % T
    c_off = b * scb + t * sct
    _rope_tile(Q, QO, QW, C, S, b * sqb + t * sqt, b * sob + t * sot, c_off, sqh, soh, n_q, 2 * HALF, eps,
               HALF, BLOCK_HQ, BLOCK_HALF, NORM)
    _rope_tile(K, KO, KW, C, S, b * skb + t * skt, b * skob + t * skot, c_off, skh, skoh, n_k, 2 * HALF, eps,
               HALF, BLOCK_HK, BLOCK_HALF, NORM)


@triton.jit
def rmsnorm_kernel(X, R, W, O, H, n_cols, sx, sr, so, sh, eps, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """O = RMSNorm(X [+ R]) * W per row; with R also H = X + R (rounded to X's dtype, the value normed)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(X + row * sx + cols, mask=m, other=0.0)
    if HAS_RES:
        res = tl.load(R + row * sr + cols, mask=m, other=0.0)
        hsum = (x.to(tl.float32) + res.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * sh + cols, hsum, mask=m)
        xf = hsum.to(tl.float32)
    else:
        xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(O + row * so + cols, (xf * rstd * w).to(O.dtype.element_ty), mask=m)


@triton.jit
def rope_store_kernel(QKV, C, S, POS, KC, VC, QO, QW, KW,
                      sxr, scp, skb, skh, skp, svb, svh, svp, sob, soh,
                      n_q, n_k, cap, n_pos, eps,
                      HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                      BLOCK_HALF: tl.constexpr, NORM: tl.constexpr):
    """One decode token per program (row r of QKV [b, (Hq + 2 Hkv) D]: q heads, then k heads, then v heads) at its
    position p = POS[r]: q rotated with cos/sin rows C/S[p] into QO [b, Hq, D]; k rotated into KC[r, :, p, :] and
    v copied into VC[r, :, p, :] (the cache slots; p clamped to the capacity ``cap`` for the writes and to the
    ``n_pos`` rows of C/S for the reads, memory-safe whatever the device value). NORM 1: Qwen3's per-head RMSNorm (QW/KW [D]) before RoPE."""
    r = tl.program_id(0).to(tl.int64)
    p = tl.load(POS + r).to(tl.int64)
    c_off = tl.minimum(p, n_pos - 1) * scp
    p = tl.minimum(p, cap - 1)
    x_off = r * sxr
    D = 2 * HALF
    _rope_tile(QKV, QO, QW, C, S, x_off, r * sob, c_off, D, soh, n_q, D, eps, HALF, BLOCK_HQ, BLOCK_HALF, NORM)
    _rope_tile(QKV, KC, KW, C, S, x_off + n_q * D, r * skb + p * skp, c_off, D, skh, n_k, D, eps,
               HALF, BLOCK_HK, BLOCK_HALF, NORM)
    h = tl.arange(0, BLOCK_HK)[:, None]
    d = tl.arange(0, BLOCK_HALF)[None, :]
    m = (h < n_k) & (d < HALF)
    src = QKV + x_off + (n_q + n_k) * D + h * D + d
    dst = VC + r * svb + p * svp + h * svh + d
    tl.store(dst, tl.load(src, mask=m, other=0.0).to(VC.dtype.element_ty), mask=m)
    tl.store(dst + HALF, tl.load(src + HALF, mask=m, other=0.0).to(VC.dtype.element_ty), mask=m)
