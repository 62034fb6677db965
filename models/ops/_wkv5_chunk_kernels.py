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
def _rows(t, T, tt, L: tl.constexpr):
    """Masks of a chunk's tokens t [L]: in the sequence, with a previous token in the chunk, with a next one."""
    ok = t < T
    return ok, ok & (tt >= 1), (t + 1 < T) & (tt < L - 1)


@triton.jit
def _r_decayed(r_ptr, w_ptr, off, h, kk, ok, ok_prev, row, PER_TOKEN: tl.constexpr, N: tl.constexpr):
    """r_t * exp(g_exc[t]) [L, N] float32: r decayed from the chunk's start state to token t's read."""
    r = tl.load(r_ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return r * tl.exp(tl.cumsum(_log_decay(w_ptr, off - row, h, kk, ok_prev, PER_TOKEN, N), axis=0))


@triton.jit
def _chunk(r_ptr, k_ptr, w_ptr, u, off, h, kk, tt, ok, ok_prev, ok_next, row,
           PER_TOKEN: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """One chunk's in-chunk terms (module docstring): r * exp(g_exc) [L, N], k * exp(g_suf) [L, N], exp(sum lw)
    [N] and the scores [L, L] (bonus on the diagonal), all float32."""
    r = tl.load(r_ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)     # [L, N]
    k = tl.load(k_ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    lw = _log_decay(w_ptr, off, h, kk, ok, PER_TOKEN, N)                                 # [L, N]
    g_exc = tl.cumsum(_log_decay(w_ptr, off - row, h, kk, ok_prev, PER_TOKEN, N), axis=0)            # sum_{i<t}
    g_suf = tl.cumsum(_log_decay(w_ptr, off + row, h, kk, ok_next, PER_TOKEN, N), axis=0, reverse=True)
    strict = tt[:, None] > tt[None, :]                                                   # [t, j]: j < t
    later = (tt[:, None] > tt[None, :] + 1)[:, :, None]                                  # [m, j]: m > j + 1
    bk = tl.arange(0, BK)
    scores = tl.zeros((L, L), tl.float32)
    for k0 in tl.static_range(0, N, BK):                 # one block of BK key channels at a time
        cols = k0 + bk
        rb = tl.load(r_ptr + off[:, None] + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        kb = tl.load(k_ptr + off[:, None] + cols[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        lpb = _log_decay(w_ptr, off - row, h, cols, ok_prev, PER_TOKEN, N)               # [L, BK]: lw_{m-1}
        # x[m, j, :] = lw_{m-1} for m > j + 1: the cumulative sum over m is e[t, j] at m = t
        e = tl.cumsum(tl.where(later, lpb[:, None, :], 0.0), axis=0)                     # [L, L, BK]
        d = tl.where(strict[:, :, None], tl.exp(e), 0.0)
        scores += tl.sum(rb[:, None, :] * kb[None, :, :] * d, axis=2)
    bonus = tl.sum(r * k * u[None, :], axis=1)                                           # [L]
    scores += tl.where(tt[:, None] == tt[None, :], bonus[:, None], 0.0)
    return r * tl.exp(g_exc), k * tl.exp(g_suf), tl.exp(tl.sum(lw, axis=0)), scores


@triton.jit
def wkv5_chunk_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, s_ptr, y_ptr, so_ptr, T, H,
                      PER_TOKEN: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BV: tl.constexpr,
                      BK: tl.constexpr):
    """One program per (batch x head, BV value columns) walking every chunk in order (the state slice in registers)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    v0 = tl.program_id(1) * BV
    kk = tl.arange(0, N)                                  # key channels
    vv = v0 + tl.arange(0, BV)                            # this program's value columns
    tt = tl.arange(0, L)
    row = H * N                                           # elements between consecutive tokens
    base = b.to(tl.int64) * T * row + h * N               # token 0, channel 0 of (b, h)
    sbase = bh.to(tl.int64) * N * N
    S = tl.load(s_ptr + sbase + kk[:, None] * N + vv[None, :])                          # [N, BV] float32
    u = tl.load(u_ptr + h * N + kk)                                                      # [N]
    for c in range(0, tl.cdiv(T, L)):
        t = c * L + tt
        ok, ok_prev, ok_next = _rows(t, T, tt, L)
        off = base + t.to(tl.int64) * row                                                # [L]
        v = tl.load(v_ptr + off[:, None] + vv[None, :], mask=ok[:, None], other=0.0).to(tl.float32)   # [L, BV]
        rd, kp, decay, scores = _chunk(r_ptr, k_ptr, w_ptr, u, off, h, kk, tt, ok, ok_prev, ok_next, row,
                                       PER_TOKEN, N, L, BK)
        y = tl.dot(rd, S, input_precision="ieee") + tl.dot(scores, v, input_precision="ieee")
        tl.store(y_ptr + off[:, None] + vv[None, :], y.to(y_ptr.dtype.element_ty), mask=ok[:, None])
        S = decay[:, None] * S + tl.dot(tl.trans(kp), v, input_precision="ieee")
    tl.store(so_ptr + sbase + kk[:, None] * N + vv[None, :], S)


@triton.jit
def _chunk_program(T, H, N: tl.constexpr, L: tl.constexpr):
    """The (batch x head, chunk) of a program of grid (nc, B * H) (the chunks on the axis without the 65535 bound):
    bh, c, h, key channels, in-chunk positions, the token stride, the chunk's token offsets [L] and their masks
    (``_rows``)."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    kk = tl.arange(0, N)
    tt = tl.arange(0, L)
    row = H * N
    t = c * L + tt
    ok, ok_prev, ok_next = _rows(t, T, tt, L)
    off = (bh // H).to(tl.int64) * T * row + h * N + t.to(tl.int64) * row
    return bh, c, h, kk, tt, row, off, ok, ok_prev, ok_next


@triton.jit
def wkv5_prep_kernel(r_ptr, k_ptr, v_ptr, w_ptr, u_ptr, yw_ptr, d_ptr, g_ptr, T, H, nc,
                     PER_TOKEN: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BK: tl.constexpr):
    """Phase 1, one program per (batch x head, chunk), all chunks at once: the in-chunk output scores @ v into yw
    (float32 [B, T, H, N]), the chunk's state increment (k * exp(g_suf))^T @ v into d ([B*H, nc, N, N]) and its decay
    exp(sum lw) into g ([B*H, nc, N])."""
    bh, c, h, kk, tt, row, off, ok, ok_prev, ok_next = _chunk_program(T, H, N, L)
    u = tl.load(u_ptr + h * N + kk)
    v = tl.load(v_ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)     # [L, N]
    rd, kp, decay, scores = _chunk(r_ptr, k_ptr, w_ptr, u, off, h, kk, tt, ok, ok_prev, ok_next, row,
                                   PER_TOKEN, N, L, BK)
    tl.store(yw_ptr + off[:, None] + kk[None, :], tl.dot(scores, v, input_precision="ieee"), mask=ok[:, None])
    cbase = (bh.to(tl.int64) * nc + c)
    tl.store(d_ptr + cbase * N * N + kk[:, None] * N + kk[None, :], tl.dot(tl.trans(kp), v, input_precision="ieee"))
    tl.store(g_ptr + cbase * N + kk, decay)


@triton.jit
def wkv5_scan_kernel(s_ptr, d_ptr, g_ptr, so_ptr, nc, N: tl.constexpr, BV: tl.constexpr):
    """Phase 2, one program per (batch x head, BV value columns): the only sequential part. Walks the chunks,
    replacing each chunk's increment in d by the state at the chunk's start (the same slice, read before written),
    S <- exp(sum lw) * S + increment; the final state into so."""
    bh = tl.program_id(0)
    vv = tl.program_id(1) * BV + tl.arange(0, BV)
    kk = tl.arange(0, N)
    sbase = bh.to(tl.int64) * N * N
    S = tl.load(s_ptr + sbase + kk[:, None] * N + vv[None, :])                          # [N, BV]
    for c in range(0, nc):
        cbase = bh.to(tl.int64) * nc + c
        at = d_ptr + cbase * N * N + kk[:, None] * N + vv[None, :]
        inc = tl.load(at)
        tl.store(at, S)
        S = tl.load(g_ptr + cbase * N + kk)[:, None] * S + inc
    tl.store(so_ptr + sbase + kk[:, None] * N + vv[None, :], S)


@triton.jit
def wkv5_out_kernel(r_ptr, w_ptr, yw_ptr, d_ptr, y_ptr, T, H, nc,
                    PER_TOKEN: tl.constexpr, N: tl.constexpr, L: tl.constexpr):
    """Phase 3, one program per (batch x head, chunk): y = yw + (r * exp(g_exc)) @ S_start, in y's dtype."""
    bh, c, h, kk, tt, row, off, ok, ok_prev, ok_next = _chunk_program(T, H, N, L)
    rd = _r_decayed(r_ptr, w_ptr, off, h, kk, ok, ok_prev, row, PER_TOKEN, N)
    S = tl.load(d_ptr + (bh.to(tl.int64) * nc + c) * N * N + kk[:, None] * N + kk[None, :])
    y = tl.load(yw_ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=0.0) + tl.dot(rd, S, input_precision="ieee")
    tl.store(y_ptr + off[:, None] + kk[None, :], y.to(y_ptr.dtype.element_ty), mask=ok[:, None])
