"""The compiled parts of a batched decode step (``decode.BatchDecoder``): the per-layer step on static state
buffers, the head, and the products RWKV-7's compiled step uses.

``layer_step`` and ``head_step`` are what the decoder hands to ``torch.compile`` (one per layer call, never
the whole layer loop, which stays ``RWKV.run_layers``). Shapes: b rows, C channels.
"""

from __future__ import annotations

from typing import Callable

import torch

from rwkv_chat.models import formats
from rwkv_chat.models.formats.i8 import Int8Weight
from rwkv_chat.models.rwkv.generations import Context
from rwkv_chat.models.rwkv.nn import layer_norm

#: rows at most for which a product is written as a broadcast-and-sum (fused by torch.compile)
FUSED_ROWS = 4


def fused_matmul(big: str = "cublas", formats_kernels: dict | None = None) -> Callable:
    """A ``matmul`` for compiled RWKV-7 decode steps: ``x @ W`` (``Ops.matmul`` contract: x [..., N], W [N, M]
    float or ``Int8Weight``; result in ``output_dtype`` or x's dtype).

    For few rows (<= FUSED_ROWS) the small low-rank products, and i8 weights, are written as a
    broadcast-and-sum that ``torch.compile`` fuses with their producers into one reduction kernel, reading
    the uint8 weight once (the i8 identity ``x·((w+½)·ry·rx + my + mx) = rx·Σ(x·ry)(w+½) + x·my + mx·Σx``,
    from the reference's ``mm8_one``). ``big="fused"`` does the same for the large float matrices;
    ``"cublas"`` leaves those to cuBLAS. fp32 accumulation throughout. Weights of the other formats (i4, f8)
    go to ``formats.matmul_with(formats_kernels)`` (their compiled products where given, else torch).
    """
    product = formats.matmul_with(formats_kernels)

    def mm(x: torch.Tensor, w, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if isinstance(w, Int8Weight):
            if rows > FUSED_ROWS:
                y = x @ w.dequantize(x.dtype)
            else:
                xf = x.float()
                xr = xf * w.ry.view(-1).float()
                acc = (xr.unsqueeze(-1) * (w.w.float() + 0.5)).sum(-2)               # [..., M]
                y = (acc * w.rx.float() + (xf * w.my.view(-1).float()).sum(-1, keepdim=True)
                     + xf.sum(-1, keepdim=True) * w.mx.float()).to(x.dtype)
        elif not isinstance(w, torch.Tensor):     # another weight format (i4, f8): its own product
            y = product(x, w)
        elif rows <= FUSED_ROWS and (big == "fused" or w.shape[1] <= 512 or w.shape[0] <= 512):
            y = (x.float().unsqueeze(-1) * w.float()).sum(-2).to(x.dtype)
        else:
            y = x @ w
        return y if output_dtype is None or y.dtype == output_dtype else y.to(output_dtype)

    return mm


def layer_step(block, spec, x, bufs, p, v_first, tokens, ops):
    """One layer on static state buffers (updated in place). x: [b, 1, C] -> (x, v_first)."""
    ctx = Context(spec, ops, v_first=v_first, tokens=tokens)
    x, new = block(x, bufs, p, ctx)
    for buf, t in zip(bufs, new):
        buf.copy_(t)
    return x, ctx.v_first


def compile_limits():
    """Room for one compiled layer step per (bucket, first layer or not) while this decoder compiles
    (dynamo's default recompile limit of 8 would silently fall back to eager)."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    return cfg.patch(**{name: 64})


def head_step(x, ln_w, ln_b, hw, mm):
    """ln_out and the head. x: [b, 1, C] -> logits float32 [b, vocab]."""
    return mm(layer_norm(x, ln_w, ln_b), hw).float()[:, 0]
