"""Fused operators for transformer families, written in Triton (compiled at first use on CUDA).

Public API (the operator library of the design documents)::

    from rwkv_chat.models.ops import fused_rmsnorm_rope, FusedRMSNormRoPE, fused_gated_mlp, FusedGatedMLP
    from rwkv_chat.models.ops import rmsnorm, rope, qk_norm_rope, silu_mul   # the fusions of Qwen2's dataflow
    from rwkv_chat.models.ops import quantize_fp8, fp8_gemm, FP8Linear, fused_ln_qkv_gptq
    from rwkv_chat.models.ops import rope_store, decode_attention, rope_attention   # a decode step's attention
    from rwkv_chat.models.ops import ffn_value          # RWKV channel-mix value product, zero rows of h skipped
    from rwkv_chat.models.ops import norm_gemv          # residual add + norm + a decode step's GEMV, one launch

The fusions of a Qwen2 / Qwen3 decoder layer (x: [B, T, hidden] bf16/fp16 on CUDA; cos, sin: [T, D] or [B, T, D])::

    h, residual = rmsnorm(x, input_layernorm_w, eps, residual)          # residual add + RMSNorm, one launch
    qkv = h @ w_qkv.T + b_qkv                                           # one cuBLAS GEMM; q, k, v are views of it
    q, k = rope(q, k, cos, sin, out=(q_buf, k_cache_slot))              # Qwen3: qk_norm_rope(q, k, q_w, k_w, ...)
    ...attention...
    h, residual = rmsnorm(attn_out, post_attention_layernorm_w, eps, residual)
    y = fused_gated_mlp(h, w_gate, w_up) @ w_down.T                     # or silu_mul(h @ w_gate_up.T) @ w_down.T

A decode step (one token per row, row r at position lens[r]; caches [b, K, capacity, D])::

    q = rope_store(qkv, cos_table, sin_table, lens, k_cache, v_cache, H)   # RoPE + cache write, one launch
    o = decode_attention(q, k_cache, v_cache, lens)                      # GQA flash-decoding, no mask
    o = rope_attention(qkv, cos_table, sin_table, lens, k_cache, v_cache, H)   # both in one launch

and its projections at 1..4 rows, each with the norm before it in the same launch::

    qkv, residual = norm_gemv(x, w_qkv, norm="rms", norm_weight=ln1, residual=residual, bias=b_qkv)
    g, residual = norm_gemv(o_proj_out, w_gate_up, norm="rms", norm_weight=ln2, residual=residual, swiglu=True)
    y, _ = norm_gemv(g, w_down)

Every op checks its inputs before launching and raises the typed errors re-exported here
(``DeviceError``, ``ShapeMismatchError``, ``UnsupportedDtypeError``, ``NumericalOverflowError``, each with
``tensor``, ``expected`` and ``actual``); without CUDA (or without Triton) an op raises ``DeviceError``.
Names load lazily, so importing this package costs nothing until an op is used.
"""

from __future__ import annotations

from rwkv_chat.models.errors import (DeviceError, NumericalOverflowError, ShapeMismatchError,  # noqa: F401
                                     UnsupportedDtypeError)

_LAZY = {
    "fused_rmsnorm_rope": "rwkv_chat.models.ops.rmsnorm_rope",
    "FusedRMSNormRoPE": "rwkv_chat.models.ops.rmsnorm_rope",
    "fused_gated_mlp": "rwkv_chat.models.ops.gated_mlp",
    "FusedGatedMLP": "rwkv_chat.models.ops.gated_mlp",
    "rmsnorm": "rwkv_chat.models.ops.rmsnorm_rope",
    "rope": "rwkv_chat.models.ops.rmsnorm_rope",
    "qk_norm_rope": "rwkv_chat.models.ops.rmsnorm_rope",
    "silu_mul": "rwkv_chat.models.ops.gated_mlp",
    "quantize_fp8": "rwkv_chat.models.ops.fp8",
    "fp8_gemm": "rwkv_chat.models.ops.fp8",
    "FP8Linear": "rwkv_chat.models.ops.fp8",
    "fused_ln_qkv_gptq": "rwkv_chat.models.ops.gptq",
    "rope_store": "rwkv_chat.models.ops.decode",
    "decode_attention": "rwkv_chat.models.ops.decode",
    "rope_attention": "rwkv_chat.models.ops.decode",
    "ffn_value": "rwkv_chat.models.ops.sparse_ffn",
    "norm_gemv": "rwkv_chat.models.ops.prenorm",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DeviceError", "NumericalOverflowError", "ShapeMismatchError", "UnsupportedDtypeError", *_LAZY]
