"""The plain torch references of the ops (``reference.py``) equal Hugging Face ``transformers``' Qwen2 / Qwen3
modules (CPU, fp32), so that the ops, checked against the references on CUDA, follow the conventions of the
models they serve (rotate_half RoPE, RMSNorm, SwiGLU)."""

from __future__ import annotations

import pytest
import torch

from tests.models.ops.reference import (ref_cos_sin, ref_gated_mlp, ref_qk_norm_rope, ref_rmsnorm, ref_rmsnorm_rope,
                                        ref_rope)

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2 import modeling_qwen2 as qwen2  # noqa: E402
from transformers.models.qwen3 import modeling_qwen3 as qwen3  # noqa: E402

B, T, HQ, HKV, D = 2, 5, 6, 2, 16


def config(**kw):
    return transformers.Qwen2Config(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV,
                                    intermediate_size=72, rope_theta=1e6, rms_norm_eps=1e-6, **kw)


def hf_tables(positions):
    return qwen2.Qwen2RotaryEmbedding(config())(torch.zeros(1, dtype=torch.float32), positions)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cos_sin_tables_equal_qwen2_rotary_embedding():
    positions = torch.tensor([[0, 1, 7, 4095, 30000], [3, 4, 5, 6, 131071]])
    cos, sin = ref_cos_sin(positions, D, 1e6)
    want_cos, want_sin = hf_tables(positions)
    close(cos, want_cos)
    close(sin, want_sin)


def test_rope_equals_apply_rotary_pos_emb():
    torch.manual_seed(0)
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, T, HKV, D)
    positions = torch.arange(T) + torch.tensor([[0], [100]])
    cos, sin = hf_tables(positions)                                   # [B, T, D]
    want_q, want_k = qwen2.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
    got_q, got_k = ref_rope(q, k, cos, sin)
    close(got_q, want_q)
    close(got_k, want_k)
    got_q, _ = ref_rope(q, k, cos[0], sin[0])                         # one [T, D] table for the batch
    close(got_q[1], qwen2.apply_rotary_pos_emb(q, k, cos[:1], sin[:1], unsqueeze_dim=2)[0][1])


def test_rmsnorm_and_rmsnorm_rope_equal_qwen2_rmsnorm_then_rope():
    torch.manual_seed(1)
    norm = qwen2.Qwen2RMSNorm(HQ * D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(HQ * D))
    x, r = torch.randn(B, T, HQ * D), torch.randn(B, T, HQ * D)
    got, h = ref_rmsnorm(x, norm.weight, 1e-6, r)
    close(h, x + r)
    close(got, norm(x + r))
    cos, sin = hf_tables(torch.arange(T)[None])
    want = qwen2.apply_rotary_pos_emb(norm(x).view(B, T, HQ, D), torch.zeros(1, 1, 1, D), cos, sin, unsqueeze_dim=2)[0]
    close(ref_rmsnorm_rope(x, norm.weight, cos[0], sin[0], 1e-6, HQ), want.reshape(B, T, HQ * D))


def test_qk_norm_rope_equals_qwen3_norms_then_rope():
    torch.manual_seed(2)
    q_norm, k_norm = qwen3.Qwen3RMSNorm(D, eps=1e-6), qwen3.Qwen3RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.copy_(1 + 0.2 * torch.randn(D))
        k_norm.weight.copy_(1 + 0.2 * torch.randn(D))
    q, k = torch.randn(B, T, HQ, D), torch.randn(B, T, HKV, D)
    cos, sin = hf_tables(torch.arange(T)[None] + 9)
    want_q, want_k = qwen3.apply_rotary_pos_emb(q_norm(q), k_norm(k), cos, sin, unsqueeze_dim=2)
    got_q, got_k = ref_qk_norm_rope(q, k, q_norm.weight, k_norm.weight, cos[0], sin[0], 1e-6)
    close(got_q, want_q)
    close(got_k, want_k)


@pytest.mark.parametrize("activation, hf_act", [("silu", "silu"), ("gelu", "gelu"), ("gelu_tanh", "gelu_pytorch_tanh")])
def test_gated_mlp_equals_qwen2_mlp(activation, hf_act):
    torch.manual_seed(3)
    mlp = qwen2.Qwen2MLP(config(hidden_act=hf_act))
    x = torch.randn(7, HQ * D)
    with torch.no_grad():
        want = mlp(x)
        got = ref_gated_mlp(x, mlp.gate_proj.weight, mlp.up_proj.weight, activation) @ mlp.down_proj.weight.T
    close(got, want)
