"""The Triton operators of ``rwkv_chat.models.ops`` behind ``QwenOps`` (CUDA, fp16/bf16 layers).

``fused_ops(base, device, dtype)`` returns ``(ops, note)``: ``base`` with ``rmsnorm`` (``ops.rmsnorm``), ``rope``
(``ops.rope``: q and k in one launch), ``qk_norm_rope`` (``ops.qk_norm_rope``: Qwen3's per-head norm + RoPE) and
``gated_mlp`` (``ops.fused_gated_mlp``: SwiGLU on fp16/bf16 tensor cores, reading the gate/up weights in
nn.Linear layout) replaced where each op runs: every op is tried once on small inputs of the model's dtype and
checked against the torch form; an op that fails (no Triton, a compile error, a wrong result) keeps the torch
form, and ``note`` says which ops serve and why others do not. Attention stays with
``scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rwkv_chat.models.qwen2 import layers


def _rmsnorm(fused):
    def rmsnorm(x, weight, eps):
        return fused(x, weight, eps)[0]
    return rmsnorm


def _table(t: torch.Tensor) -> torch.Tensor:
    """The model's cos/sin [1, T, D] (shared by the batch) as the ops take it, [T, D]; [B, T, D] unchanged."""
    return t[0] if t.shape[0] == 1 else t


def _rope(fused):
    def rope(q, k, cos, sin):
        return fused(q, k, _table(cos), _table(sin))
    return rope


def _qk_norm_rope(fused):
    def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
        return fused(q, k, q_weight, k_weight, _table(cos), _table(sin), eps)
    return qk_norm_rope


def _gated(fused, fallback):
    def gated_mlp(x, gate, up, matmul):
        if isinstance(gate, torch.Tensor) and isinstance(up, torch.Tensor) and gate.t().is_contiguous() \
                and up.t().is_contiguous() and x.dtype in (torch.float16, torch.bfloat16):
            return fused(x, gate.t(), up.t())
        return fallback(x, gate, up, matmul)
    return gated_mlp


def _probe(name: str, fn, ref, args) -> str | None:
    """None when ``fn(*args)`` runs and agrees with ``ref(*args)`` to half-precision rounding, else the reason."""
    try:
        got, want = fn(*args), ref(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            if g.shape != w.shape or not torch.allclose(g.float(), w.float(), atol=3e-2, rtol=3e-2):
                return f"{name}: differs from the torch form"
    except Exception as e:  # noqa: BLE001 — the torch form serves; the note says why
        return f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def fused_ops(base: layers.QwenOps, device: torch.device, dtype: torch.dtype) -> tuple[layers.QwenOps, str]:
    """``base`` with the Triton ops that run on ``device`` in ``dtype`` (see the module docstring)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return base, "torch ops (the Triton ops serve fp16/bf16 on CUDA)"
    try:
        from rwkv_chat.models import ops as triton_ops

        chosen = {"rmsnorm": _rmsnorm(triton_ops.rmsnorm), "rope": _rope(triton_ops.rope),
                  "qk_norm_rope": _qk_norm_rope(triton_ops.qk_norm_rope),
                  "gated_mlp": _gated(triton_ops.fused_gated_mlp, base.gated_mlp)}
    except (ImportError, AttributeError) as e:
        return base, f"torch ops (Triton ops unavailable: {e})"
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    B, T, H, K, D, C, F = 2, 3, 4, 2, 64, 256, 512
    cos, sin = (t.to(device, dtype)[None] for t in layers.rope_table(1e4, D, T))         # [1, T, D]
    w = rnd(C) * 0.1 + 1
    probes = {"rmsnorm": (layers.rmsnorm, (rnd(B, T, C), w, 1e-6)),
              "rope": (layers.rope, (rnd(B, T, H, D), rnd(B, T, K, D), cos, sin)),
              "qk_norm_rope": (layers.qk_norm_rope, (rnd(B, T, H, D), rnd(B, T, K, D), rnd(D) * 0.1 + 1,
                                                     rnd(D) * 0.1 + 1, cos, sin, 1e-6)),
              "gated_mlp": (layers.gated_mlp, (rnd(B, T, C) * 0.1, (rnd(F, C) * 0.05).t(), (rnd(F, C) * 0.05).t(),
                                               lambda x, w: x @ w))}
    serving, problems = [], []
    for name, (ref, args) in probes.items():
        reason = _probe(name, chosen[name], ref, args)
        if reason is None:
            serving.append(name)
        else:
            problems.append(reason)
            del chosen[name]
    note = f"Triton {', '.join(serving) or 'none'}" + (f" (torch for {'; '.join(problems)})" if problems else "")
    return replace(base, **chosen), note


