"""How a layer's new tokens meet the KV cache: the ``attend`` functions ``layers.block`` calls.

Both take the packed projection ``qkv`` [B, T, (H + 2K)·D] of the layer (q heads, then k heads, then v heads) and
the layer's parameters (Qwen3's ``q_norm``/``k_norm``), and return the attention output [B, T, H·D]:

* ``prefill(ops, cos, sin, kc, vc, L, need, n_head, eps)``: T new tokens at positions ``L .. need - 1`` of every
  sequence (cos, sin [T, D] of those positions): RoPE (``ops.rope`` / ``ops.qk_norm_rope``), keys and values
  copied into the cache buffers kc, vc [B, K, capacity, D] at ``L .. need - 1``, causal attention over positions
  ``0 .. need - 1`` (``ops.attention``);
* ``decode(ops, cos, sin, lens, kc, vc, n_head, eps)``: one token per row at its own position ``lens[row]`` (cos,
  sin: the whole tables [P, D]): ``ops.rope_attention`` (RoPE + cache write + each row's attention over its
  positions ``0 .. lens[row]``; one Triton launch on CUDA, ``rope_store`` then ``decode_attention`` in torch), no
  host sync (a CUDA graph captures it).

The tables and positions are made once per forward / step on each device (``Qwen2.rope_tables``), never per layer.
"""

from __future__ import annotations

from typing import Callable

import torch

from rwkv_chat.models.qwen2.layers import QwenOps


def prefill(ops: QwenOps, cos: torch.Tensor, sin: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, L: int,
            need: int, n_head: int, eps: float) -> Callable:
    """The attend of T = need - L new tokens per sequence after L cached ones (see the module docstring)."""
    cos, sin = cos[None], sin[None]                                              # [1, T, D]
    kv, d = kc.shape[1], kc.shape[3]

    def attend(qkv: torch.Tensor, p: dict) -> torch.Tensor:
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, n_head + 2 * kv, d).split((n_head, kv, kv), dim=2)     # [B, T, H|K, D]
        if "q_norm" in p:
            q, k = ops.qk_norm_rope(q, k, p["q_norm"], p["k_norm"], cos, sin, eps)
        else:
            q, k = ops.rope(q, k, cos, sin)
        kc[:, :, L:need].copy_(k.transpose(1, 2))
        vc[:, :, L:need].copy_(v.transpose(1, 2))
        o = ops.attention(q.transpose(1, 2), kc[:, :, :need], vc[:, :, :need], None)   # [B, H, T, D]
        return o.transpose(1, 2).reshape(B, T, n_head * d)

    return attend


def decode(ops: QwenOps, cos: torch.Tensor, sin: torch.Tensor, lens: torch.Tensor, kc: torch.Tensor,
           vc: torch.Tensor, n_head: int, eps: float) -> Callable:
    """The attend of one token per row at position ``lens[row]`` over slot buffers kc, vc [>= b, K, capacity, D]
    (see the module docstring)."""

    def attend(qkv: torch.Tensor, p: dict) -> torch.Tensor:
        b = qkv.shape[0]
        o = ops.rope_attention(qkv.view(b, -1), cos, sin, lens, kc, vc, n_head, p.get("q_norm"), p.get("k_norm"), eps)
        return o.view(b, 1, -1)

    return attend
