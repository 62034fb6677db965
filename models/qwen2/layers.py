"""The Qwen2 / Qwen3 decoder layer as small free functions, and the ops object that fused kernels replace.

The math is ``transformers``' (``models/qwen2/modeling_qwen2.py``, ``models/qwen3/modeling_qwen3.py``):

* RMSNorm: ``w * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` (float32 statistics);
* RoPE, ``rotate_half`` convention: ``inv_freq = 1 / theta^(2i/D)``, ``freqs = pos · inv_freq`` (float32),
  ``cos/sin = cos/sin(cat(freqs, freqs))`` cast to the activation dtype, ``q' = q·cos + rotate_half(q)·sin``;
* attention: ``softmax(q kᵀ / √D)`` in float32 over the causal past, GQA (each K/V head serves H/K query heads);
* SwiGLU MLP: ``down(silu(gate(x)) · up(x))``;
* Qwen3: RMSNorm over each head's D channels of q and k (``q_norm``, ``k_norm``) before RoPE.

``QwenOps`` names the per-layer operators (``rmsnorm``, ``rope``, ``gated_mlp``, ``attention``, ``matmul``); the
pure-torch forms are here, and a backend may hand the block fused ones (``rwkv_chat.models.ops`` on CUDA) with
the same contracts. ``block`` is the one layer function: a sequence (prefill), one token, or a batch of slots
of the batched decoder all run through it; only ``attend`` (how new keys/values enter the cache and which
positions each query sees) differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., C] (any float dtype), weight [C] -> [..., C] in x's dtype (statistics in
    float32; ``transformers`` ``Qwen2RMSNorm``)."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rope_table(theta: float, head_dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 [length, head_dim] for positions 0 .. length - 1 (``Qwen2RotaryEmbedding``, default type:
    ``inv_freq = 1 / theta ** (arange(0, D, 2) / D)``, ``emb = cat(freqs, freqs)``)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.arange(length, dtype=torch.int64).float()[:, None] * inv_freq[None, :]   # [L, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, T, H, D] and k [B, T, K, D] with cos, sin [B or 1, T, D] (q's dtype)."""
    cos, sin = cos[:, :, None], sin[:, :, None]                                  # [B|1, T, 1, D]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3: RMSNorm of every head of q [B, T, H, D] and k [B, T, K, D] over D (weights [D]), then ``rope``."""
    return rope(rmsnorm(q, q_weight, eps), rmsnorm(k, k_weight, eps), cos, sin)


def gated_mlp(x: torch.Tensor, gate, up, matmul: Callable) -> torch.Tensor:
    """SwiGLU's gated product ``silu(x @ gate) * (x @ up)``: x [..., C], packed weights [C, F] -> [..., F]."""
    return F.silu(matmul(x, gate)) * matmul(x, up)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention with GQA: q [B, H, T, D], k, v [B, K, S, D] (H % K == 0, S >= T) -> [B, H, T, D].

    ``mask``: bool [B or 1, 1, T, S] (True: attend), or None for causal attention aligned at the end (query t is
    position S − T + t: the new tokens after S − T cached ones; T == 1 sees every key).
    ``torch.nn.functional.scaled_dot_product_attention`` (scale 1/√D; float32 softmax in every backend; the flash
    kernel on CUDA where it applies, ``causal_lower_right`` for a causal block after a cache)."""
    B, H, T, D = q.shape
    K, S = k.shape[1], k.shape[2]
    if T == 1 and H != K:
        # one new token: the H / K query heads of a K/V head become its "positions" (same keys, same mask), so
        # the fused kernels serve GQA without repeating K and V (head h reads K/V head h // (H / K))
        m = mask if mask is None else mask[:, :, :1]
        return F.scaled_dot_product_attention(q.reshape(B, K, H // K, D), k, v, attn_mask=m).reshape(B, H, 1, D)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != K)
    if T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != K)
    if T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=H != K)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(T, S), enable_gqa=H != K)


@dataclass(frozen=True)
class QwenOps:
    """The operators ``block`` calls; contracts of the pure-torch forms above.

    Attributes:
        rmsnorm: (x [..., C], weight [C], eps) -> [..., C].
        rope: (q [B, T, H, D], k [B, T, K, D], cos, sin [B|1, T, D]) -> (q, k).
        qk_norm_rope: (q, k as rope, q_weight, k_weight [D], cos, sin, eps) -> (q, k): per-head RMSNorm, then RoPE.
        gated_mlp: (x [..., C], gate, up packed [C, F], matmul) -> silu(x @ gate) * (x @ up) [..., F].
        attention: (q [B, H, T, D], k, v [B, K, S, D], mask bool [B|1, 1, T, S] or None (causal, aligned at the
            end)) -> [B, H, T, D].
        matmul: ``formats.matmul_with``'s product (x [..., N], packed [N, M], output_dtype=None) -> [..., M].
    """

    rmsnorm: Callable = rmsnorm
    rope: Callable = rope
    qk_norm_rope: Callable = qk_norm_rope
    gated_mlp: Callable = gated_mlp
    attention: Callable = attention
    matmul: Callable | None = None


def block(x: torch.Tensor, p: dict, eps: float, head_dim: int, ops: QwenOps, cos: torch.Tensor, sin: torch.Tensor,
          attend: Callable) -> torch.Tensor:
    """One decoder layer (pre-norm attention, then pre-norm SwiGLU MLP, each with a residual).

    Args:
        x: the residual stream [B, T, C] in the layer's activation dtype.
        p: the layer's parameters: ``ln1``, ``ln2`` [C]; packed ``wq`` [C, H*D], ``wk``, ``wv`` [C, K*D], ``wo``
            [H*D, C], ``gate``, ``up`` [C, F], ``down`` [F, C]; optional ``bq``, ``bk``, ``bv``, ``bo`` (biases),
            ``q_norm``, ``k_norm`` [D] (Qwen3).
        eps: RMSNorm epsilon. head_dim: D.
        ops: the operators (``QwenOps``).
        cos, sin: RoPE of the new positions [B|1, T, D] in x's dtype.
        attend: ``attend(q [B, H, T, D], k, v [B, K, T, D]) -> [B, H, T, D]``: stores the new keys/values in
            the cache and attends over the cached past and themselves.
    Returns:
        x [B, T, C].
    """
    B, T, _ = x.shape
    mm = ops.matmul
    h = ops.rmsnorm(x, p["ln1"], eps)
    q, k, v = mm(h, p["wq"]), mm(h, p["wk"]), mm(h, p["wv"])
    if "bq" in p:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.view(B, T, -1, head_dim)                                       # [B, T, H, D]
    k = k.view(B, T, -1, head_dim)                                       # [B, T, K, D]
    v = v.view(B, T, -1, head_dim).transpose(1, 2)                       # [B, K, T, D]
    if "q_norm" in p:
        q, k = ops.qk_norm_rope(q, k, p["q_norm"], p["k_norm"], cos, sin, eps)
    else:
        q, k = ops.rope(q, k, cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)                          # [B, H, T, D], [B, K, T, D]
    o = attend(q, k, v)                                                  # [B, H, T, D]
    o = mm(o.transpose(1, 2).reshape(B, T, -1), p["wo"])
    x = x + (o + p["bo"] if "bo" in p else o)
    h = ops.rmsnorm(x, p["ln2"], eps)
    return x + mm(ops.gated_mlp(h, p["gate"], p["up"], mm), p["down"])
