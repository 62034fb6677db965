"""The WKV recurrences of every RWKV generation, batched, in pure torch.

These are the reference ("torch") paths: the compiled kernels in ``csrc/`` implement the same
functions with the same signatures (``rwkv_chat.models.kernels.dispatch``). A model's blocks call the
ones its backend chose (``ctx.ops.wkv4/wkv5/wkv7``): ``wkv4_torch``, ``wkv5_auto`` and ``wkv7_auto`` without
the compiled kernels. Shapes use B = batch, T = tokens, C = channels, H = heads, N = head size.

Formulas follow BlinkDL's ChatRWKV ``rwkv/model.py`` (pip package 0.8.32): ``att_seq`` (v4),
``att_seq_v5_2`` / ``att_seq_v6_0`` (v5, v5.1, v5.2, v6) and ``RWKV_x070_TMix_seq`` (v7).
"""

from __future__ import annotations

import torch


def wkv4_torch(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               aa: torch.Tensor, bb: torch.Tensor, pp: torch.Tensor):
    """RWKV-4 WKV with the numerically stable (aa, bb, pp) state.

    Args:
        w: float32 [C], the decay as stored after loading: ``-exp(time_decay)``.
        u: float32 [C], ``time_first``.
        k, v: float32 [B, T, C].
        aa, bb, pp: float32 [B, C], the running numerator, denominator and max exponent.
    Returns:
        ``(y, aa, bb, pp)``: y float32 [B, T, C] and the new state (new tensors).
    """
    T = k.shape[1]
    y = torch.empty_like(k)
    for t in range(T):
        kk = k[:, t]
        vv = v[:, t]
        ww = u + kk
        p = torch.maximum(pp, ww)
        e1 = torch.exp(pp - p)
        e2 = torch.exp(ww - p)
        y[:, t] = (e1 * aa + e2 * vv) / (e1 * bb + e2)
        ww = w + pp
        p = torch.maximum(ww, kk)
        e1 = torch.exp(ww - p)
        e2 = torch.exp(kk - p)
        aa = e1 * aa + e2 * vv
        bb = e1 * bb + e2
        pp = p
    return y, aa, bb, pp


def wkv5_torch(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor,
               u: torch.Tensor, s: torch.Tensor):
    """RWKV-5/5.1/5.2/6 multi-head linear attention with a matrix state.

    ``out_t = r_t · (u ⊙ k_tᵀv_t + S)``, ``S ← k_tᵀv_t + w_t ⊙ S`` (w and u act on the key index).

    Args:
        r, k, v: float32 [B, T, H, N].
        w: float32 decay factors in (0, 1): [H, N] (v5, fixed) or [B, T, H, N] (v6, per token).
        u: float32 [H, N], the bonus of the current token (``time_first``/``time_faaaa``).
        s: float32 [B, H, N, N], indexed [b, h, key, value].
    Returns:
        ``(y, s)``: y float32 [B, T, H, N] and the new state.
    """
    T = r.shape[1]
    per_token = w.dim() == 4
    uu = u.unsqueeze(-1)                      # [H, N, 1]
    y = torch.empty_like(r)
    for t in range(T):
        kv = k[:, t].unsqueeze(-1) @ v[:, t].unsqueeze(-2)        # [B, H, N, N]
        y[:, t] = (r[:, t].unsqueeze(-2) @ (uu * kv + s)).squeeze(-2)
        wt = w[:, t] if per_token else w
        s = kv + wt.unsqueeze(-1) * s
    return y, s


def wkv7_torch(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               a: torch.Tensor, b: torch.Tensor, s: torch.Tensor):
    """RWKV-7 generalized delta rule.

    ``S ← S·diag(w_t) + (S·a_t)·b_tᵀ + v_t·k_tᵀ``, ``y_t = S·r_t``, where (as in the reference)
    ``a = -kk`` and ``b = kk ⊙ a_gate``.

    Args:
        r, k, v, a, b: [B, T, H, N] in the activation dtype (computed in float32).
        w: float32 [B, T, H, N], decay factors in (0, 1): ``exp(-exp(-0.5)·sigmoid(w0 + w_lora))``.
        s: float32 [B, H, N, N], indexed [b, h, value, key].
    Returns:
        ``(y, s)``: y float32 [B, T, H, N] and the new state.
    """
    T = r.shape[1]
    r, k, v, a, b = (x.float() for x in (r, k, v, a, b))
    y = torch.empty_like(r)
    for t in range(T):
        sa = s @ a[:, t].unsqueeze(-1)                             # [B, H, N, 1]
        s = (s * w[:, t].unsqueeze(-2) + sa @ b[:, t].unsqueeze(-2)
             + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2))
        y[:, t] = (s @ r[:, t].unsqueeze(-1)).squeeze(-1)
    return y, s


def wkv7_one(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             a: torch.Tensor, b: torch.Tensor, s: torch.Tensor):
    """``wkv7_torch`` for T = 1 written as broadcasts and last-dim sums (no batched matmuls), so that
    ``torch.compile`` fuses a decode step's WKV into a couple of kernels. Same arguments and results."""
    r, k, v, a, b = (x[:, 0].float() for x in (r, k, v, a, b))             # [B, H, N]
    w = w[:, 0].float()
    sa = (s * a.unsqueeze(-2)).sum(-1, keepdim=True)                        # [B, H, V, 1]
    s = s * w.unsqueeze(-2) + sa * b.unsqueeze(-2) + v.unsqueeze(-1) * k.unsqueeze(-2)
    y = (s * r.unsqueeze(-2)).sum(-1)                                       # [B, H, V]
    return y.unsqueeze(1), s


def wkv7_auto(r, w, k, v, a, b, s):
    """RWKV-7 WKV in pure torch: one step for T = 1, the chunked form (``prefill.wkv7_chunked``) for T > 1.
    Same contract as ``wkv7_torch``."""
    if r.shape[1] == 1:
        return wkv7_one(r, w, k, v, a, b, s)
    from rwkv_chat.models.rwkv.chunked import wkv7_chunked

    return wkv7_chunked(r, w, k, v, a, b, s)


def wkv5_auto(r, k, v, w, u, s):
    """RWKV-5/6 WKV in pure torch: the sequential step for T = 1, the chunked form
    (``prefill.wkv5_chunked``) for T > 1. Same contract as ``wkv5_torch``."""
    if r.shape[1] == 1:
        return wkv5_torch(r, k, v, w, u, s)
    from rwkv_chat.models.rwkv.chunked import wkv5_chunked

    return wkv5_chunked(r, k, v, w, u, s)
