"""Triton kernel of ``wkv5_chunk.py`` (imported only through ``_triton.kernels``: this module imports triton).

``wkv5_chunk_kernel``: the RWKV-5/6 WKV of ``models/rwkv/chunked.py``'s ``wkv5_chunked`` (same formulas, same
segment sums), one program per (batch x head, block of BV value columns). Columns of the state S [K, V] evolve
independently, so each program keeps its [K, BV] slice in registers (float32) and walks the chunks of L tokens in
order; per chunk, with lw = log w (clamped at -1e4) and the in-chunk sums taken directly (never as differences):

    g_exc[t]   = sum_{i<t} lw_i                 (r_t decays by exp(g_exc[t]) from the chunk's start state)
    e[t, j]    = sum_{j<i<t} lw_i, j < t        (scores: the decay from token j's write to token t's read)
    g_suf[j]   = sum_{i>j} lw_i                 (token j's write as the chunk's end state sees it)
    scores     = sum_k r_tk k_jk exp(e[t, j, k]) (j < t) + diag(sum_k r_tk u_k k_tk)
    y          = (r * exp(g_exc)) @ S + scores @ v
    S          = exp(sum_i lw_i) * S + (k * exp(g_suf))^T @ v

Every exponent is <= 0, so any decay in [0, 1) is safe. The [L, L, BK] segment sums are built per block of BK key
channels (a cumulative sum over the shifted log decays). Products in float32 (``input_precision="ieee"``: the
sequential kernel's precision class, no tf32). Tokens past T are zeros with decay 1 (they change nothing).
"""

import triton
import triton.language as tl


@triton.jit
def _log_decay(w_ptr, off, h, cols, ok, PER_TOKEN: tl.constexpr, N: tl.constexpr):
    """log w (clamped at -1e4) at the token offsets ``off`` [L] and key channels ``cols`` [C]; 0 (decay 1) where
    ``ok`` [L] is false. w: [B, T, H, N] (PER_TOKEN, RWKV-6) or [H, N] (RWKV-5)."""
    if PER_TOKEN:
        w = tl.load(w_ptr + off[:, None] + cols[None, :], mask=ok[:, None], other=1.0)
    else:
        w = tl.load(w_ptr + h * N + cols)[None, :] + (off * 0).to(tl.float32)[:, None]
    return tl.where(ok[:, None], tl.maximum(tl.log(w), -1e4), 0.0)


@triton.jit
def wkv5_chunk_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s_ptr, y_ptr, so_ptr, T, H,
                      PER_TOKEN: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                      BK: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    v0 = tl.program_id(1) * BV
    kk = tl.arange(0, N)                                  # key channels
    vv = v0 + tl.arange(0, BV)                            # this program's value columns
    tt = tl.arange(0, L)
    bk = tl.arange(0, BK)
    row = H * N                                           # elements between consecutive tokens
    base = b.to(tl.int64) * T * row + h * N               # token 0, channel 0 of (b, h)
    sbase = bh.to(tl.int64) * N * N
    S = tl.load(s_ptr + sbase + kk[:, None] * N + vv[None, :])                          # [N, BV] float32
    u = tl.load(u_ptr + h * N + kk)                                                      # [N]
    strict = tt[:, None] > tt[None, :]                                                   # [t, j]: j < t
    later = (tt[:, None] > tt[None, :] + 1)[:, :, None]                                  # [m, j]: m > j + 1
    for c in range(0, tl.cdiv(T, L)):
        t = c * L + tt
        ok = t < T
        ok_prev = ok & (tt >= 1)
        ok_next = (t + 1 < T) & (tt < L - 1)
        off = base + t.to(tl.int64) * row                                                # [L]
        r = tl.load(r_ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)   # [L, N]
        k = tl.load(k_ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + off[:, None] + vv[None, :], mask=ok[:, None], other=0.0).to(tl.float32)   # [L, BV]
        lw = _log_decay(w_ptr, off, h, kk, ok, PER_TOKEN, N)                             # [L, N]
        g_exc = tl.cumsum(_log_decay(w_ptr, off - row, h, kk, ok_prev, PER_TOKEN, N), axis=0)          # sum_{i<t}
        g_suf = tl.cumsum(_log_decay(w_ptr, off + row, h, kk, ok_next, PER_TOKEN, N), axis=0, reverse=True)
        g_all = tl.sum(lw, axis=0)                                                       # [N]
        # scores [L(t), L(j)], one block of BK key channels at a time
        scores = tl.zeros((L, L), tl.float32)
        for k0 in tl.static_range(0, N, BK):
            cols = k0 + bk
            rb = tl.load(r_ptr + off[:, None] + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            kb = tl.load(k_ptr + off[:, None] + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            lpb = _log_decay(w_ptr, off - row, h, cols, ok_prev, PER_TOKEN, N)           # [L, BK]: lw_{m-1}
            # x[m, j, :] = lw_{m-1} for m > j + 1: the cumulative sum over m is e[t, j] at m = t
            e = tl.cumsum(tl.where(later, lpb[:, None, :], 0.0), axis=0)                 # [L, L, BK]
            d = tl.where(strict[:, :, None], tl.exp(e), 0.0)
            scores += tl.sum(rb[:, None, :] * kb[None, :, :] * d, axis=2)
        bonus = tl.sum(r * k * u[None, :], axis=1)                                       # [L]
        scores += tl.where(tt[:, None] == tt[None, :], bonus[:, None], 0.0)
        y = tl.dot(r * tl.exp(g_exc), S, input_precision="ieee") + tl.dot(scores, v, input_precision="ieee")
        tl.store(y_ptr + off[:, None] + vv[None, :], y.to(y_ptr.dtype.element_ty), mask=ok[:, None])
        kp = k * tl.exp(g_suf)                                                           # [L, N]
        S = tl.exp(g_all)[:, None] * S + tl.dot(tl.trans(kp), v, input_precision="ieee")
    tl.store(so_ptr + sbase + kk[:, None] * N + vv[None, :], S)
