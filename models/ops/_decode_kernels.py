"""Triton kernels of ``decode.py`` (imported only through ``_triton.kernels``: this module imports triton).

``decode_attention_kernel``: one program per (row, key/value head, split of the positions). Its BLOCK_G query
heads (the H / K heads that share this key/value head, padded to 16 rows for ``tl.dot``) are loaded once, and
every tile of BLOCK_N cached keys and values is loaded once for all of them (grouped-query attention without
repeating K and V). Online softmax in fp32 (Milakov & Gimelshein 2018; FlashAttention, Dao et al. 2022), in base 2:
scores are scaled by ``scale * log2(e)`` and exponentiated with ``exp2``. Each row attends over its own positions
``0 .. LENS[row]`` (the new token's key is already in the cache): no mask tensor. With one split the program
writes the normalised output; with several (flash-decoding, Dao et al. 2023) it writes its running max, sum and
unnormalised output in fp32, and ``decode_combine_kernel`` merges the splits of each (row, query head).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_attention_kernel(Q, KC, VC, LENS, O, PM, PL, PO,
                            sqb, sqh, skb, skh, skp, svb, svh, svp, sob, soh,
                            n_group, n_head, n_split, split_len, cap, qk_scale,
                            HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                            BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    n = tl.minimum(tl.load(LENS + row).to(tl.int32) + 1, cap)
    start = sp * split_len
    end = tl.minimum(start + split_len, n)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_D
    gm = g < n_group
    qh = kvh * n_group + g
    q = tl.load(Q + row * sqb + qh[:, None] * sqh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_base = KC + row * skb + kvh * skh
    v_base = VC + row * svb + kvh * svh
    for s in range(start, end, BLOCK_N):
        p = s + tl.arange(0, BLOCK_N)
        pm = p < end
        lm = pm[:, None] & dm[None, :]
        k = tl.load(k_base + p[:, None].to(tl.int64) * skp + d[None, :], mask=lm, other=0.0)     # [N, D]
        sc = tl.dot(q, tl.trans(k)) * qk_scale                                                   # [G, N] fp32
        sc = tl.where(pm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(v_base + p[:, None].to(tl.int64) * svp + d[None, :], mask=lm, other=0.0)     # [N, D]
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    om = gm[:, None] & dm[None, :]
    if SPLIT:
        part = (row * n_head + qh) * n_split + sp                                                # [G]
        tl.store(PM + part, m_i, mask=gm)
        tl.store(PL + part, l_i, mask=gm)
        tl.store(PO + part[:, None] * HEAD_D + d[None, :], acc, mask=om)
    else:
        out = acc / l_i[:, None]
        tl.store(O + row * sob + qh[:, None] * soh + d[None, :], out.to(O.dtype.element_ty), mask=om)


@triton.jit
def decode_combine_kernel(PM, PL, PO, O, sob, soh, n_head, n_split,
                          HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """O[row, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s over the splits s of (row, h); a split past
    the row's length holds m = -inf, l = 0 and weighs 0 (split 0 always holds position 0)."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    sm = s < n_split
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_D
    part = (row * n_head + h) * n_split + s
    m = tl.load(PM + part, mask=sm, other=float("-inf"))
    l = tl.load(PL + part, mask=sm, other=0.0)
    top = tl.max(m, 0)
    w = tl.where(sm, tl.exp2(m - top), 0.0)
    total = tl.sum(l * w, 0)
    acc = tl.load(PO + part[:, None] * HEAD_D + d[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / total
    tl.store(O + row * sob + h * soh + d, out.to(O.dtype.element_ty), mask=dm)


@triton.jit
def _rotated(QKV, W, C, S, offs, c_off, dh, dm, rm, eps, HALF: tl.constexpr, NORM: tl.constexpr):
    """Rows of heads at element offsets ``offs`` [R, 1] of QKV, as two rotated halves [R, BLOCK_HALF] in float32
    (``rmsnorm_rope._rope_tile``'s formulas; NORM 1: per-head RMSNorm with W [D] first), masked rows/columns 0."""
    m = rm & dm
    x1 = tl.load(QKV + offs + dh, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(QKV + offs + dh + HALF, mask=m, other=0.0).to(tl.float32)
    if NORM == 1:
        r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
        x1 = x1 * r * tl.load(W + dh, mask=dm, other=0.0).to(tl.float32)
        x2 = x2 * r * tl.load(W + dh + HALF, mask=dm, other=0.0).to(tl.float32)
    c1 = tl.load(C + c_off + dh, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(C + c_off + dh + HALF, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(S + c_off + dh, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(S + c_off + dh + HALF, mask=dm, other=0.0).to(tl.float32)
    return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2


@triton.jit
def rope_attention_kernel(QKV, C, S, LENS, KC, VC, QW, KW, O, PM, PL, PO,
                          sxr, scp, skb, skh, skp, svb, svh, svp, sob, soh,
                          n_group, n_head, n_kv, n_split, split_len, cap, n_pos, qk_scale, eps,
                          HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, NORM: tl.constexpr):
    """``rope_store`` + ``decode_attention`` in one launch: program (row, key/value head, split) rotates its group's
    query heads and the new key at p = LENS[row] itself (q never leaves registers), attends over the cached
    positions of its split below p, and the split holding p adds the new key/value from registers and writes them
    into the cache at p — no program reads position p from the cache, so no program waits for that write. The
    scores use the two halves of each head (two ``tl.dot`` of D/2), as the rotation produces them."""
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    D = 2 * HALF
    p = tl.minimum(tl.load(LENS + row).to(tl.int64), cap - 1)
    c_off = tl.minimum(tl.load(LENS + row).to(tl.int64), n_pos - 1) * scp        # the tables' rows, clamped
    start = sp * split_len
    end = tl.minimum(start + split_len, p)
    g = tl.arange(0, BLOCK_G)
    gm = g < n_group
    qh = kvh * n_group + g
    dh = tl.arange(0, BLOCK_HALF)[None, :]
    dm = dh < HALF
    x_off = row * sxr
    q1, q2 = _rotated(QKV, QW, C, S, x_off + qh[:, None] * D, c_off, dh, dm, gm[:, None], eps, HALF, NORM)
    q1 = q1.to(KC.dtype.element_ty)
    q2 = q2.to(KC.dtype.element_ty)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    d = tl.arange(0, BLOCK_D)
    dfm = d < D
    k_base = KC + row * skb + kvh * skh
    v_base = VC + row * svb + kvh * svh
    for s in range(start, end, BLOCK_N):
        pos = s + tl.arange(0, BLOCK_N)
        pm = pos < end
        prow = pos[:, None].to(tl.int64)
        hm = pm[:, None] & dm
        k1 = tl.load(k_base + prow * skp + dh, mask=hm, other=0.0)                              # [N, D/2]
        k2 = tl.load(k_base + prow * skp + dh + HALF, mask=hm, other=0.0)
        sc = (tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))) * qk_scale                    # [G, N] fp32
        sc = tl.where(pm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        alpha = tl.exp2(m_i - m_new)
        pr = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(v_base + prow * svp + d[None, :], mask=pm[:, None] & dfm[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
        m_i = m_new
    if (p >= start) & (p < start + split_len):          # the new token: from registers, and into the cache
        one = tl.arange(0, 1)[:, None] < 1
        k_off = x_off + (n_head + kvh) * D
        k1n, k2n = _rotated(QKV, KW, C, S, k_off + tl.zeros([1, 1], dtype=tl.int64), c_off, dh, dm, one, eps, HALF,
                            NORM)
        k1n = k1n.to(KC.dtype.element_ty)
        k2n = k2n.to(KC.dtype.element_ty)
        tl.store(k_base + p * skp + dh, k1n, mask=one & dm)
        tl.store(k_base + p * skp + dh + HALF, k2n, mask=one & dm)
        vn = tl.load(QKV + x_off + (n_head + n_kv + kvh) * D + d, mask=dfm, other=0.0).to(VC.dtype.element_ty)
        tl.store(v_base + p * svp + d, vn, mask=dfm)
        s_new = (tl.sum(q1.to(tl.float32) * k1n.to(tl.float32), 1)
                 + tl.sum(q2.to(tl.float32) * k2n.to(tl.float32), 1)) * qk_scale               # [G]
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp2(m_i - m_new)
        pn = tl.exp2(s_new - m_new)
        l_i = l_i * alpha + pn
        acc = acc * alpha[:, None] + pn.to(VC.dtype.element_ty).to(tl.float32)[:, None] * vn.to(tl.float32)[None, :]
        m_i = m_new
    om = gm[:, None] & dfm[None, :]
    if SPLIT:
        part = (row * n_head + qh) * n_split + sp
        tl.store(PM + part, m_i, mask=gm)
        tl.store(PL + part, l_i, mask=gm)
        tl.store(PO + part[:, None] * D + d[None, :], acc, mask=om)
    else:
        out = acc / l_i[:, None]
        tl.store(O + row * sob + qh[:, None] * soh + d[None, :], out.to(O.dtype.element_ty), mask=om)
