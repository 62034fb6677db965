"""The Qwen2 / Qwen3 decoder layer as small free functions, and the ops object that fused kernels replace.

The math is ``transformers``' (``models/qwen2/modeling_qwen2.py``, ``models/qwen3/modeling_qwen3.py``):

* RMSNorm: ``w * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype)`` (float32 statistics);
* RoPE, ``rotate_half`` convention: ``inv_freq = 1 / theta^(2i/D)``, ``freqs = pos · inv_freq`` (float32),
  ``cos/sin = cos/sin(cat(freqs, freqs))`` cast to the activation dtype, ``q' = q·cos + rotate_half(q)·sin``;
* attention: ``softmax(q kᵀ / √D)`` in float32 over the causal past, GQA (each K/V head serves H/K query heads);
* SwiGLU MLP: ``down(silu(gate(x)) · up(x))``;
* Qwen3: RMSNorm over each head's D channels of q and k (``q_norm``, ``k_norm``) before RoPE.

``QwenOps`` names the per-layer operators (``rmsnorm`` with the residual add, ``rope``, ``gated_mlp``,
``attention``, the decode step's ``rope_store`` and ``decode_attention``, ``linear``, the pre-norm products
``norm_linear`` and ``norm_gated_mlp``, ``matmul``); the pure-torch forms are here, and a backend may hand the block fused ones (``rwkv_chat.models.ops`` on CUDA) with the same contracts.
``block`` is the one layer function: a sequence (prefill), one token, or a batch of slots of the batched decoder
all run through it; only ``attend`` (``attend.py``: how new keys/values enter the cache and which positions each
query sees) differs.
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


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm: ``h = x + residual`` (in x's dtype; ``h = x`` without a residual) ->
    ``(rmsnorm(h, weight, eps), h)``, both [..., C] in x's dtype (the contract of ``rwkv_chat.models.ops.rmsnorm``)."""
    h = x if residual is None else x + residual
    return rmsnorm(h, weight, eps), h


def linear(x: torch.Tensor, w, bias: torch.Tensor | None, matmul: Callable) -> torch.Tensor:
    """``x @ w + bias``: x [..., N], w packed [N, M] (any format), bias [M] or None -> [..., M] in x's dtype.
    A plain float matrix with a bias is one ``torch.addmm`` (the bias added in the GEMM's epilogue); a tuple of
    packed weights (parts that could not be joined at load, ``weights.py``) gives its products side by side."""
    if isinstance(w, tuple):
        y = torch.cat([matmul(x, part) for part in w], dim=-1)
        return y if bias is None else y + bias
    if bias is None:
        return matmul(x, w)
    if isinstance(w, torch.Tensor) and x.dtype == w.dtype:
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[1])
    return matmul(x, w) + bias


def norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, w,
                bias: torch.Tensor | None, ops: "QwenOps") -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm projection: ``h, residual' = ops.rmsnorm(x, norm_weight, eps, residual)`` then
    ``ops.linear(h, w, bias)`` -> ``(y [..., M], residual')`` (the composed form of ``QwenOps.norm_linear``)."""
    h, residual = ops.rmsnorm(x, norm_weight, eps, residual)
    return ops.linear(h, w, bias, ops.matmul), residual


def norm_gated_mlp(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, gate_up,
                   ops: "QwenOps") -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm gated product: ``ops.rmsnorm`` then ``ops.gated_mlp`` -> ``(silu(h @ gate) * (h @ up) [..., F],
    residual')`` (the composed form of ``QwenOps.norm_gated_mlp``)."""
    h, residual = ops.rmsnorm(x, norm_weight, eps, residual)
    return ops.gated_mlp(h, gate_up, ops.matmul), residual


def gated_mlp(x: torch.Tensor, gate_up, matmul: Callable) -> torch.Tensor:
    """SwiGLU's gated product ``silu(x @ gate) * (x @ up)``: x [..., C]; ``gate_up`` the packed gate|up weight
    [C, 2F] (one product; gate the first F outputs) or a pair (gate, up) of packed [C, F] -> [..., F]."""
    if isinstance(gate_up, tuple):
        return F.silu(matmul(x, gate_up[0])) * matmul(x, gate_up[1])
    y = matmul(x, gate_up)
    f = y.shape[-1] // 2
    return F.silu(y[..., :f]) * y[..., f:]


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


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, num_heads: int, q_weight: torch.Tensor | None = None,
               k_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """A decode step's new token per row: q, k, v from the packed ``qkv`` [b, (H + 2K)·D], RoPE of q and k at row
    r's position ``lens[r]`` (cos, sin: the whole tables [P, D] in qkv's dtype; Qwen3: ``qk_norm_rope`` with
    ``q_weight``, ``k_weight`` [D]), k and v written into ``k_cache``, ``v_cache`` [>= b, K, capacity, D] at
    ``[r, :, lens[r]]`` (``scatter_``). Returns q [b, H, D]. The torch form of ``rwkv_chat.models.ops.rope_store``."""
    b = qkv.shape[0]
    kv, d = k_cache.shape[1], k_cache.shape[3]
    q, k, v = qkv.view(b, 1, num_heads + 2 * kv, d).split((num_heads, kv, kv), dim=2)   # [b, 1, H|K, D]
    c, s = cos[lens][:, None], sin[lens][:, None]                                        # [b, 1, D]
    if q_weight is not None:
        q, k = qk_norm_rope(q, k, q_weight, k_weight, c, s, eps)
    else:
        q, k = rope(q, k, c, s)
    index = lens.view(b, 1, 1, 1).expand(b, kv, 1, d)
    k_cache[:b].scatter_(2, index, k.transpose(1, 2))
    v_cache[:b].scatter_(2, index, v.transpose(1, 2))
    return q[:, 0]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """One query per row over that row's positions ``0 .. lens[r]``: q [b, H, D], k_cache, v_cache [>= b, K,
    capacity, D] -> [b, H, D] (``attention`` with the boolean mask of each row's length). The torch form of
    ``rwkv_chat.models.ops.decode_attention``."""
    b = q.shape[0]
    visible = torch.arange(k_cache.shape[2], device=q.device)[None, :] <= lens[:, None]      # [b, capacity]
    return attention(q[:, :, None], k_cache[:b], v_cache[:b], visible.view(b, 1, 1, -1))[:, :, 0]


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lens: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, q_weight: torch.Tensor | None = None,
                   k_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``decode_attention(rope_store(...), k_cache, v_cache, lens)``: a decode step's RoPE, cache write and attention
    (arguments as ``rope_store``) -> [b, H, D]. The torch form of ``rwkv_chat.models.ops.rope_attention``."""
    q = rope_store(qkv, cos, sin, lens, k_cache, v_cache, num_heads, q_weight, k_weight, eps)
    return decode_attention(q, k_cache, v_cache, lens)


@dataclass(frozen=True)
class QwenOps:
    """The operators ``block`` and the attention of ``attend.py`` call; contracts of the pure-torch forms above.

    Attributes:
        rmsnorm: (x [..., C], weight [C], eps, residual [..., C] or None) -> (normed, x + residual), as
            ``add_rmsnorm``.
        rope: (q [B, T, H, D], k [B, T, K, D], cos, sin [B|1, T, D]) -> (q, k).
        qk_norm_rope: (q, k as rope, q_weight, k_weight [D], cos, sin, eps) -> (q, k): per-head RMSNorm, then RoPE.
        gated_mlp: (x [..., C], packed gate|up [C, 2F] or a pair, matmul) -> silu(x @ gate) * (x @ up) [..., F].
        attention: (q [B, H, T, D], k, v [B, K, S, D], mask bool [B|1, 1, T, S] or None (causal, aligned at the
            end)) -> [B, H, T, D].
        rope_store: a decode step's RoPE + cache write, as ``rope_store`` above.
        decode_attention: a decode step's attention over each row's length, as ``decode_attention`` above.
        rope_attention: both of a decode step in one (``attend.decode`` calls it), as ``rope_attention`` above.
        linear: (x [..., N], packed w [N, M], bias [M] or None, matmul) -> [..., M], as ``linear`` above.
        norm_linear: (x, residual, norm_weight [C], eps, packed w, bias, ops) -> (y, x + residual), as
            ``norm_linear`` above (a fused form runs the norm inside the product).
        norm_gated_mlp: (x, residual, norm_weight, eps, gate_up, ops) -> (silu(h @ gate) * (h @ up), x + residual),
            as ``norm_gated_mlp`` above.
        matmul: ``formats.matmul_with``'s product (x [..., N], packed [N, M], output_dtype=None) -> [..., M].
    """

    rmsnorm: Callable = add_rmsnorm
    rope: Callable = rope
    qk_norm_rope: Callable = qk_norm_rope
    gated_mlp: Callable = gated_mlp
    attention: Callable = attention
    rope_store: Callable = rope_store
    decode_attention: Callable = decode_attention
    rope_attention: Callable = rope_attention
    linear: Callable = linear
    norm_linear: Callable = norm_linear
    norm_gated_mlp: Callable = norm_gated_mlp
    matmul: Callable | None = None


def to_layer(x: torch.Tensor, residual: torch.Tensor | None, device: torch.device,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual stream x and the residual ``block`` carries over (None before the first layer) on a layer's
    device and activation dtype; unchanged (no copy) where they already are."""
    if x.device == device and x.dtype == dtype:
        return x, residual
    return x.to(device=device, dtype=dtype), None if residual is None else residual.to(device=device, dtype=dtype)


def block(x: torch.Tensor, residual: torch.Tensor | None, p: dict, eps: float, ops: QwenOps,
          attend: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer (pre-norm attention, then pre-norm SwiGLU MLP, each with a residual), with the residual
    adds fused into the norms: the residual stream entering the layer is ``x + residual`` (``residual`` None: x
    alone, the first layer), and the layer returns ``(y, residual')`` whose sum is the stream after it (the next
    layer's input norm, or the final norm, adds them).

    Args:
        x, residual: [B, T, C] in the layer's activation dtype (residual may be None).
        p: the layer's parameters: ``ln1``, ``ln2`` [C]; packed ``wqkv`` [C, (H+2K)·D] (q, k, v outputs side by
            side), ``wo`` [H·D, C], ``gate_up`` [C, 2F] (or the pair ``(gate, up)``), ``down`` [F, C]; optional
            ``bqkv`` [(H+2K)·D], ``bo`` [C] (biases), ``q_norm``, ``k_norm`` [D] (Qwen3).
        eps: RMSNorm epsilon. ops: the operators (``QwenOps``).
        attend: ``attend(qkv [B, T, (H+2K)·D], p) -> [B, T, H·D]``: RoPE, the new keys/values into the cache,
            attention over the cached past and themselves (``attend.py``: prefill, decode).
    Returns:
        (y, residual) [B, T, C].
    """
    mm = ops.matmul
    qkv, residual = ops.norm_linear(x, residual, p["ln1"], eps, p["wqkv"], p.get("bqkv"), ops)
    o = attend(qkv, p)
    g, residual = ops.norm_gated_mlp(ops.linear(o, p["wo"], p.get("bo"), mm), residual, p["ln2"], eps,
                                     p["gate_up"], ops)
    return ops.linear(g, p["down"], None, mm), residual
