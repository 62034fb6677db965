"""Triton kernels of ``wkv7_chunk.py`` (imported only through ``_triton.kernels``: this module imports triton).

The chunked RWKV-7 WKV of ``models/rwkv/chunked.py``'s ``wkv7_chunked`` (same formulas, same names) in three launches:

* ``wkv7_prep_kernel``, one program per (batch x head, chunk), all chunks at once: with Γ the in-chunk decay
  products (log Γ summed directly; RWKV-7's decay >= 0.545 keeps 1/Γ <= e^19.4 over 32 tokens, inside float32),
  the L x L products M_ab, M_ak (strictly lower) and M_rb, M_rk (lower), the unit-triangular inverse
  T = (I - M_ab)^-1, W = T (Γ_{t-1} a), U_v = T M_ak V, and the chunk's affine map S_next = S P + D with
  P = diag(Γ_L) + Wᵀ B', D = U_vᵀ B' + Vᵀ K', and the output terms Q = Γ r + M_rb W, Y_v = M_rb U_v + M_rk V.
* ``wkv7_scan_kernel``, one program per (batch x head, 16 value rows; rows of S are independent): the only
  sequential part, one [16, N] x [N, N] product per chunk; each chunk's D slice is replaced by the chunk's start
  state (read before written).
* ``wkv7_out_kernel``, one program per (batch x head, chunk): y = Q S_startᵀ + Y_v.

Every product runs on the tensor cores in ``PREC`` (``"tf32x3"``: three tf32 products per float32 product, the
float32 precision class; ``"tf32"``: one; ``"ieee"``: float32 on the CUDA cores), the all-chunks phase's in-chunk
products in ``PREC_IN``. The inverse: each 16 x 16 diagonal block by
forward substitution (the rows of every block at once), then T = T_bd + T_bd A_off T_bd for L = 32 (A_off: M_ab
below the diagonal blocks), exact since T_bd A_off T_bd A_off = 0 for two blocks.
"""

import triton
import triton.language as tl

from rwkv_chat.models.ops._wkv5_chunk_kernels import _chunk_program


@triton.jit
def _load(ptr, off, kk, ok, other):
    return tl.load(ptr + off[:, None] + kk[None, :], mask=ok[:, None], other=other).to(tl.float32)


@triton.jit
def _unit_lower_inverse(A, tt, L: tl.constexpr, PREC: tl.constexpr):
    """(I - A)^-1 [L, L] float32 for A [L, L] float32 strictly lower triangular, L in {16, 32}."""
    blk = tt // 16
    same = blk[:, None] == blk[None, :]
    Ab = tl.where(same, A, 0.0)                                   # the diagonal 16 x 16 blocks
    eye = tl.where(tt[:, None] == tt[None, :], 1.0, 0.0)
    Ti = eye                                                      # rows not reached yet stay e_i
    for i in tl.static_range(1, 16):
        # row i of every block: T[i, :] = e_i + sum_{s < i} A[i, s] T[s, :]; A's row is zero from s = i on and the
        # rows s < i are final, so the whole product's row i is the update
        Ti = tl.where(((tt % 16) == i)[:, None], eye + tl.dot(Ab, Ti, input_precision=PREC), Ti)
    if L > 16:
        Aoff = tl.where(same, 0.0, A)
        Ti = Ti + tl.dot(tl.dot(Ti, Aoff, input_precision=PREC), Ti, input_precision=PREC)
    return Ti


@triton.jit
def wkv7_prep_kernel(r_ptr, w_ptr, k_ptr, v_ptr, a_ptr, b_ptr, p_ptr, d_ptr, q_ptr, yv_ptr, T, H, nc,
                     N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr, PREC_IN: tl.constexpr):
    """Phase 1, one program per (batch x head, chunk): P, D ([B*H, nc, N, N]) and Q, Y_v ([B*H, nc, L, N]),
    float32 (module docstring); the in-chunk products (the L x L matrices, the inverse, W, U_v, Q, Y_v) in PREC_IN,
    the products of P and D in PREC. Tokens past T: zero vectors with decay 1 (they change nothing)."""
    bh, c, h, kk, tt, row, off, ok, ok_prev, ok_next = _chunk_program(T, H, N, L)
    r = _load(r_ptr, off, kk, ok, 0.0)                                                  # [L, N] each
    k = _load(k_ptr, off, kk, ok, 0.0)
    v = _load(v_ptr, off, kk, ok, 0.0)
    a = _load(a_ptr, off, kk, ok, 0.0)
    b = _load(b_ptr, off, kk, ok, 0.0)
    lw = tl.log(_load(w_ptr, off, kk, ok, 1.0))
    g_inc = tl.cumsum(lw, axis=0)                                                        # log Γ_t
    g_exc = tl.cumsum(tl.log(_load(w_ptr, off - row, kk, ok_prev, 1.0)), axis=0)        # log Γ_{t-1}
    g_suf = tl.cumsum(tl.log(_load(w_ptr, off + row, kk, ok_next, 1.0)), axis=0, reverse=True)   # log Γ_L/Γ_t
    a_t = a * tl.exp(g_exc)
    r_t = r * tl.exp(g_inc)
    inv = tl.exp(-g_inc)
    b_h = b * inv
    k_h = k * inv
    tail = tl.exp(g_suf)
    b_p = b * tail
    k_p = k * tail
    strict = tt[:, None] > tt[None, :]
    incl = tt[:, None] >= tt[None, :]
    m_ab = tl.where(strict, tl.dot(a_t, tl.trans(b_h), input_precision=PREC_IN), 0.0)     # [L, L]
    m_ak = tl.where(strict, tl.dot(a_t, tl.trans(k_h), input_precision=PREC_IN), 0.0)
    m_rb = tl.where(incl, tl.dot(r_t, tl.trans(b_h), input_precision=PREC_IN), 0.0)
    m_rk = tl.where(incl, tl.dot(r_t, tl.trans(k_h), input_precision=PREC_IN), 0.0)
    t_inv = _unit_lower_inverse(m_ab, tt, L, PREC_IN)
    w_m = tl.dot(t_inv, a_t, input_precision=PREC_IN)                                        # U = W S_0ᵀ + U_v
    u_v = tl.dot(t_inv, tl.dot(m_ak, v, input_precision=PREC_IN), input_precision=PREC_IN)
    diag = tl.where(kk[:, None] == kk[None, :], tl.exp(tl.sum(lw, axis=0))[:, None], 0.0)
    p = diag + tl.dot(tl.trans(w_m), b_p, input_precision=PREC)                          # [K, K]
    d = tl.dot(tl.trans(u_v), b_p, input_precision=PREC) + tl.dot(tl.trans(v), k_p, input_precision=PREC)  # [V, K]
    q = r_t + tl.dot(m_rb, w_m, input_precision=PREC_IN)                                     # y = Q S_cᵀ + Y_v
    y_v = tl.dot(m_rb, u_v, input_precision=PREC_IN) + tl.dot(m_rk, v, input_precision=PREC_IN)
    cbase = bh.to(tl.int64) * nc + c
    sq = cbase * N * N + kk[:, None] * N + kk[None, :]
    tl.store(p_ptr + sq, p)
    tl.store(d_ptr + sq, d)
    sl = cbase * L * N + tt[:, None] * N + kk[None, :]
    tl.store(q_ptr + sl, q)
    tl.store(yv_ptr + sl, y_v)


@triton.jit
def wkv7_scan_kernel(s_ptr, p_ptr, d_ptr, so_ptr, nc, N: tl.constexpr, R: tl.constexpr, PREC: tl.constexpr):
    """Phase 2, one program per (batch x head, R value rows): S <- S P_c + D_c over the chunks, replacing each
    chunk's D slice by the chunk's start state; the final state into so ([B*H, N, N], may be s itself)."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * R + tl.arange(0, R)
    kk = tl.arange(0, N)
    sbase = bh.to(tl.int64) * N * N
    S = tl.load(s_ptr + sbase + rows[:, None] * N + kk[None, :])                        # [R, K] float32
    for c in range(0, nc):
        cbase = (bh.to(tl.int64) * nc + c) * N * N
        at = d_ptr + cbase + rows[:, None] * N + kk[None, :]
        inc = tl.load(at)
        tl.store(at, S)
        S = tl.dot(S, tl.load(p_ptr + cbase + kk[:, None] * N + kk[None, :]), input_precision=PREC) + inc
    tl.store(so_ptr + sbase + rows[:, None] * N + kk[None, :], S)


@triton.jit
def wkv7_out_kernel(q_ptr, yv_ptr, d_ptr, y_ptr, T, H, nc, N: tl.constexpr, L: tl.constexpr, PREC: tl.constexpr):
    """Phase 3, one program per (batch x head, chunk): y = Q S_startᵀ + Y_v into y (float32 [B, T, H, N])."""
    bh, c, h, kk, tt, row, off, ok, ok_prev, ok_next = _chunk_program(T, H, N, L)
    cbase = bh.to(tl.int64) * nc + c
    sl = cbase * L * N + tt[:, None] * N + kk[None, :]
    S = tl.load(d_ptr + cbase * N * N + kk[:, None] * N + kk[None, :])                 # [V, K]
    y = tl.dot(tl.load(q_ptr + sl), tl.trans(S), input_precision=PREC) + tl.load(yv_ptr + sl)
    tl.store(y_ptr + off[:, None] + kk[None, :], y, mask=ok[:, None])
