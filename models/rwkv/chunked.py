"""Chunked (parallel) forms of the WKV recurrences, for prefill: T tokens at matrix-multiply speed.

The sequential recurrences in ``wkv.py`` take T dependent steps. Here the sequence is cut into chunks of
L tokens; inside a chunk every interaction is a small matrix product (batched over batch, heads and
chunks), and only one [N, N] state product per chunk remains sequential. The results equal the
sequential recurrence up to float32 rounding (tests/models/test_prefill.py checks 1e-5 relative).

RWKV-7 (generalized delta rule, state S [V, K], ``S_t = S_{t-1}(diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ``,
``y_t = S_t r_t``). With the in-chunk cumulative decay ``Γ_t = ∏_{i≤t} w_i`` and ``u_t = S_{t-1} a_t``::

    u_t = S_0 (Γ_{t-1}⊙a_t) + Σ_{j<t} [u_j (b_j/Γ_j)·(Γ_{t-1}⊙a_t) + v_j (k_j/Γ_j)·(Γ_{t-1}⊙a_t)]
    y_t = S_0 (Γ_t⊙r_t)     + Σ_{j≤t} [u_j (b_j/Γ_j)·(Γ_t⊙r_t)     + v_j (k_j/Γ_j)·(Γ_t⊙r_t)]
    S_L = S_0 diag(Γ_L) + Σ_j [u_j (b_j⊙Γ_L/Γ_j)ᵀ + v_j (k_j⊙Γ_L/Γ_j)ᵀ]

so U = (I − M_ab)⁻¹ (Ã S_0ᵀ + M_ak V) with strictly lower-triangular L×L matrices (a triangular solve),
which is linear in S_0: U = W S_0ᵀ + U_v. That gives a per-chunk transition ``S ← S P + D`` with
P = diag(Γ_L) + Wᵀ B' and D = U_vᵀ B' + Vᵀ K', all computed for every chunk at once (the WY form of
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length", Yang et al. 2024, and
flash-linear-attention's chunked DPLR delta rule). The division by Γ_j is safe for RWKV-7, whose decay
is ``w = exp(-e^{-1/2}·sigmoid(·)) ≥ 0.545``: over a chunk of 64, 1/Γ ≤ 8e16, far inside float32.

RWKV-5/6 (``S_t = diag(w_t) S_{t-1} + k_tᵀ v_t``, ``y_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t)``, S [K, V]):
the in-chunk scores use ``exp(G_{t-1} − G_j)`` (exponents ≤ 0) so any decay in [0, 1) is safe.
"""

from __future__ import annotations

import torch

#: default chunk lengths (tokens); RWKV-7 uses matrix products of L×N, RWKV-5/6 a [L, L, N] score tensor
CHUNK7 = 32
CHUNK5 = 16


def _chunks(x: torch.Tensor, L: int, pad_value: float = 0.0) -> torch.Tensor:
    """[B, T, H, N] -> [B, H, nc, L, N] float32, padding T up to a multiple of L."""
    B, T, H, N = x.shape
    nc = -(-T // L)
    x = x.float()
    if nc * L != T:
        x = torch.cat([x, x.new_full((B, nc * L - T, H, N), pad_value)], dim=1)
    return x.view(B, nc, L, H, N).permute(0, 3, 1, 2, 4)


def _unchunk(y: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, nc, L, N] -> [B, T, H, N]."""
    B, H, nc, L, N = y.shape
    return y.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, N)[:, :T].contiguous()


def _shift_down(x: torch.Tensor) -> torch.Tensor:
    """Along dim -2: out[t] = x[t-1], out[0] = 0 (exclusive prefix sums without a subtraction)."""
    return torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :]], dim=-2)


def _suffix_exclusive(lw: torch.Tensor) -> torch.Tensor:
    """Along dim -2: out[j] = Σ_{i>j} lw[i], summed directly (no difference of large prefix sums)."""
    inc = torch.flip(torch.cumsum(torch.flip(lw, (-2,)), dim=-2), (-2,))
    return torch.cat([inc[..., 1:, :], torch.zeros_like(inc[..., :1, :])], dim=-2)


def wkv7_chunked(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor, s: torch.Tensor, chunk: int = CHUNK7):
    """RWKV-7 WKV over T tokens in chunks; same contract as ``wkv.wkv7_torch``.

    Args:
        r, k, v, a, b: [B, T, H, N], any float dtype (computed in float32).
        w: float32 [B, T, H, N], decay factors in [0.5, 1) (RWKV-7's range; see the module docstring).
        s: float32 [B, H, N, N] indexed [value, key] (not modified).
        chunk: tokens per chunk L (16–64).
    Returns:
        ``(y, s)``: y float32 [B, T, H, N]; the state after the last token, float32 [B, H, N, N].
    """
    B, T, H, N = r.shape
    L = chunk
    # padding tokens: w = 1 and zero vectors leave the state unchanged
    r, k, v, a, b = (_chunks(x, L) for x in (r, k, v, a, b))                # [B, H, nc, L, N]
    lw = _chunks(torch.log(w.float()), L)
    nc = r.shape[2]
    g_inc = torch.cumsum(lw, dim=-2)                                          # log Γ_t
    g_exc = _shift_down(g_inc)                                                # log Γ_{t-1}
    g_last = g_inc[..., -1:, :]                                               # log Γ_L  [.., 1, K]
    a_t = a * torch.exp(g_exc)                                                # Γ_{t-1} ⊙ a_t
    r_t = r * torch.exp(g_inc)                                                # Γ_t ⊙ r_t
    inv = torch.exp(-g_inc)
    b_h, k_h = b * inv, k * inv                                               # b_j/Γ_j, k_j/Γ_j
    tail = torch.exp(_suffix_exclusive(lw))                                   # Γ_L/Γ_j
    b_p, k_p = b * tail, k * tail
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    m_ab = (a_t @ b_h.transpose(-1, -2)) * strict                             # [.., L, L]
    m_ak = (a_t @ k_h.transpose(-1, -2)) * strict
    m_rb = (r_t @ b_h.transpose(-1, -2)) * incl
    m_rk = (r_t @ k_h.transpose(-1, -2)) * incl
    eye = torch.eye(L, dtype=torch.float32, device=r.device)
    rhs = torch.cat([a_t, m_ak @ v], dim=-1)                                  # [.., L, K + V]
    sol = torch.linalg.solve_triangular(eye - m_ab, rhs, upper=False, unitriangular=True)
    w_m, u_v = sol[..., :N], sol[..., N:]                                     # U = W S_0ᵀ + U_v
    p = torch.diag_embed(torch.exp(g_last.squeeze(-2))) + w_m.transpose(-1, -2) @ b_p   # [.., K, K]
    d = u_v.transpose(-1, -2) @ b_p + v.transpose(-1, -2) @ k_p                        # [.., V, K]
    q = r_t + m_rb @ w_m                                                      # y = Q S_cᵀ + Y_v
    y_v = m_rb @ u_v + m_rk @ v
    # the sequential part: one [V, K] @ [K, K] product per chunk
    states = torch.empty(B, H, nc, N, N, dtype=torch.float32, device=r.device)
    cur = s.float()
    for c in range(nc):
        states[:, :, c] = cur
        cur = torch.baddbmm(d[:, :, c].reshape(B * H, N, N), cur.reshape(B * H, N, N),
                            p[:, :, c].reshape(B * H, N, N)).view(B, H, N, N)
    y = q @ states.transpose(-1, -2) + y_v                                    # [B, H, nc, L, V]
    return _unchunk(y, T), cur


def wkv5_chunked(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
                 s: torch.Tensor, chunk: int = CHUNK5):
    """RWKV-5/5.1/5.2/6 WKV over T tokens in chunks; same contract as ``wkv.wkv5_torch``.

    Args:
        r, k, v: float32 [B, T, H, N].
        w: float32 decay factors in [0, 1): [H, N] (v5) or [B, T, H, N] (v6).
        u: float32 [H, N], the current token's bonus.
        s: float32 [B, H, N, N] indexed [key, value] (not modified).
        chunk: tokens per chunk L.
    Returns:
        ``(y, s)``: y float32 [B, T, H, N] and the state after the last token.
    """
    B, T, H, N = r.shape
    L = chunk
    if w.dim() == 2:
        w = w.expand(B, T, H, N)
    r, k, v = (_chunks(x, L) for x in (r, k, v))                              # [B, H, nc, L, N]
    # log w >= -1e4: a decay that underflows to 0 stays exactly 0 after exp, without -inf - -inf
    lw = _chunks(torch.log(w.float()).clamp_min(-1e4), L)
    nc = r.shape[2]
    g_inc = torch.cumsum(lw, dim=-2)
    g_exc = _shift_down(g_inc)
    g_last = g_inc[..., -1:, :]
    # scores[t, j] = Σ_k r_tk k_jk Γ_{t-1,k}/Γ_{j,k} for j < t; the diagonal carries the bonus u.
    # The exponent Σ_{j<i<t} log w_i is summed per (t, j) segment (as Mamba-2's segsum), never as a
    # difference of prefix sums, which would lose precision when decays are strong.
    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    seg = torch.cumsum(lw.unsqueeze(-2).expand(*lw.shape[:-1], L, N)          # [.., i, j, K] = lw_i
                       .masked_fill(~strict.unsqueeze(-1), 0.0), dim=-3)      # [.., t, j, K]: Σ_{j<i≤t}
    diff = torch.cat([torch.zeros_like(seg[..., :1, :, :]), seg[..., :-1, :, :]], dim=-3)   # Σ_{j<i<t}
    decay = torch.exp(diff.masked_fill(~strict.unsqueeze(-1), float("-inf")))
    scores = (r.unsqueeze(-2) * k.unsqueeze(-3) * decay).sum(-1)              # [.., L, L]
    scores = scores + torch.diag_embed((r * k * u.float().view(1, H, 1, 1, N)).sum(-1))
    y_v = scores @ v                                                          # [.., L, V]
    r_t = r * torch.exp(g_exc)                                                # r_t ⊙ Γ_{t-1}
    k_p = k * torch.exp(_suffix_exclusive(lw))                                # k_j ⊙ Γ_L/Γ_j
    d = k_p.transpose(-1, -2) @ v                                             # [.., K, V]
    decay_l = torch.exp(g_last).squeeze(-2).unsqueeze(-1)                     # [B, H, nc, K, 1]
    states = torch.empty(B, H, nc, N, N, dtype=torch.float32, device=r.device)
    cur = s.float()
    for c in range(nc):
        states[:, :, c] = cur
        cur = decay_l[:, :, c] * cur + d[:, :, c]
    y = r_t @ states + y_v
    return _unchunk(y, T), cur
