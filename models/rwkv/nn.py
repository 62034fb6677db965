"""Small tensor helpers shared by the generation modules. Shapes: B batch, T tokens, C channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["time_shift", "layer_norm", "head_group_norm"]


def time_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """The previous token's features for each position. x: [B, T, C], prev: [B, C] -> [B, T, C]."""
    if x.shape[1] == 1:
        return prev.unsqueeze(1)
    return torch.cat((prev.unsqueeze(1), x[:, :-1]), dim=1)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim (eps 1e-5, as torch and the reference)."""
    return F.layer_norm(x, (x.shape[-1],), weight=weight, bias=bias)


def head_group_norm(y: torch.Tensor, n_head: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float = 64e-5) -> torch.Tensor:
    """GroupNorm with one group per head (the ``ln_x`` of v5–v7). y: [B, T, C] -> [B, T, C].

    eps = 64e-5 as in the reference's v5/v6/v7 paths.
    """
    B, T, C = y.shape
    return F.group_norm(y.reshape(B * T, C), num_groups=n_head, weight=weight, bias=bias, eps=eps).view(B, T, C)
