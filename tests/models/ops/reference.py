"""Plain torch references (fp32) of the fused operators of ``rwkv_chat.models.ops``.

Formulas of Hugging Face ``transformers`` (``Qwen2RMSNorm``, ``Qwen2RotaryEmbedding``, ``apply_rotary_pos_emb``,
``Qwen2MLP``), written out here so that the tests compare against plain torch, every value in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ref_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 1e6) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin fp32 of shape positions.shape + (head_dim,): Hugging Face's default RoPE tables, computed in fp32
    as ``Qwen2RotaryEmbedding`` does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, H, D] (fp32), cos/sin [T, D] or [B, T, D] -> fp32."""
    c, s = cos.float().unsqueeze(-2), sin.float().unsqueeze(-2)
    return x.float() * c + rotate_half(x.float()) * s


def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, fp32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def ref_rmsnorm(x, weight, eps, residual=None):
    """(rmsnorm(h) * weight in fp32, h) with h = x + residual in x's dtype (a torch add), or x."""
    h = x if residual is None else x + residual
    return norm(h, weight, eps), h


def ref_rmsnorm_rope(x, weight, cos, sin, eps, num_heads):
    """x [..., T, H*D]: RMSNorm of the hidden row, then RoPE per head; fp32 [..., T, H*D]."""
    n = norm(x, weight, eps)
    d = n.shape[-1] // num_heads
    return apply_rope(n.view(*n.shape[:-1], num_heads, d), cos, sin).reshape(n.shape)


def ref_rope(q, k, cos, sin):
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def ref_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
    return apply_rope(norm(q, q_weight, eps), cos, sin), apply_rope(norm(k, k_weight, eps), cos, sin)


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}


def ref_gated_mlp(x, gate_weight, up_weight, activation="silu"):
    """act(x @ gate^T) * (x @ up^T), fp32 [..., I]."""
    xf = x.float()
    return ACTIVATIONS[activation](xf @ gate_weight.float().T) * (xf @ up_weight.float().T)


def ref_silu_mul(gate_up, activation="silu"):
    """gate_up [..., 2I] -> act(gate_up[..., :I]) * gate_up[..., I:], fp32."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return ACTIVATIONS[activation](g) * u
