"""The Triton operators of ``rwkv_chat.models.ops`` against plain torch references (fp32, ``reference.py``) on fresh
random inputs over several shapes and dtypes; Hugging Face ``transformers``' Qwen2 modules where they exist.
Needs CUDA and Triton (skipped with the reason otherwise)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rwkv_chat.models import ops
from tests.models.ops.reference import (ref_cos_sin, ref_gated_mlp, ref_qk_norm_rope, ref_rmsnorm, ref_rmsnorm_rope,
                                        ref_rope, ref_silu_mul)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton ops run on CUDA only; no CUDA device here"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (CPU torch wheel)"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: (rtol, atol) of an output rounded to its dtype against the fp32 reference
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def close(out, ref, dtype, scale=1.0):
    assert out.dtype == dtype and out.shape == ref.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol * scale)


def tables(batch, t, d, per_sequence, gen):
    """cos/sin fp32: [T, D] at positions 0..T-1, or [B, T, D] at a random start per sequence (decode)."""
    if per_sequence:
        start = torch.randint(0, 4000, (batch, 1), generator=gen)
        pos = start + torch.arange(t)
    else:
        pos = torch.arange(t)
    cos, sin = ref_cos_sin(pos, d, 1e6)
    return cos.cuda(), sin.cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, h, d, per_sequence", [(1, 1, 14, 64, False), (2, 7, 12, 128, True),
                                                      (3, 5, 28, 128, False), (1, 33, 2, 64, True),
                                                      (4, 1, 3, 96, True)])
def test_fused_rmsnorm_rope(dtype, b, t, h, d, per_sequence):
    gen = torch.Generator().manual_seed(b * 1000 + t * 10 + h)
    x = torch.randn(b, t, h * d, generator=gen).to("cuda", dtype)
    w = (1 + 0.1 * torch.randn(h * d, generator=gen)).to("cuda", dtype)
    cos, sin = tables(b, t, d, per_sequence, gen)
    ref = ref_rmsnorm_rope(x, w, cos, sin, 1e-6, h)
    close(ops.fused_rmsnorm_rope(x, w, cos, sin, 1e-6), ref, dtype)
    close(ops.fused_rmsnorm_rope(x.view(b, t, h, d), w, cos, sin, 1e-6, num_heads=h), ref.view(b, t, h, d), dtype)
    module = ops.FusedRMSNormRoPE(h * d, d, 1e-6).to("cuda", dtype)
    with torch.no_grad():
        module.weight.copy_(w)
    close(module(x, cos.to(dtype), sin.to(dtype)), ref_rmsnorm_rope(x, w, cos.to(dtype), sin.to(dtype), 1e-6, h), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, hidden", [(1, 896), (7, 1536), (64, 3584), (5, 100)])
def test_rmsnorm_with_and_without_residual(dtype, rows, hidden):
    gen = torch.Generator().manual_seed(rows + hidden)
    x = torch.randn(rows, hidden, generator=gen).to("cuda", dtype)
    r = torch.randn(rows, hidden, generator=gen).to("cuda", dtype)
    w = torch.randn(hidden, generator=gen).to("cuda", dtype)
    normed, h = ops.rmsnorm(x, w, 1e-6, residual=r)
    ref, ref_h = ref_rmsnorm(x, w, 1e-6, r)
    assert torch.equal(h, ref_h)                        # the residual sum rounds as torch's add does
    close(normed, ref, dtype, scale=4)
    normed, same = ops.rmsnorm(x.view(1, rows, hidden), w, 1e-6)
    assert same.data_ptr() == x.data_ptr()
    close(normed, ref_rmsnorm(x.view(1, rows, hidden), w, 1e-6)[0], dtype, scale=4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, hq, hkv, d, per_sequence", [(1, 1, 14, 2, 64, False), (2, 9, 12, 2, 128, True),
                                                            (1, 17, 28, 4, 128, False), (5, 1, 28, 4, 128, True)])
def test_rope_of_q_and_k_views_of_a_fused_qkv_output(dtype, b, t, hq, hkv, d, per_sequence):
    gen = torch.Generator().manual_seed(b + t + hq)
    qkv = torch.randn(b, t, (hq + 2 * hkv) * d, generator=gen).to("cuda", dtype)
    q = qkv[..., :hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d:(hq + hkv) * d].view(b, t, hkv, d)
    cos, sin = tables(b, t, d, per_sequence, gen)
    qo, ko = ops.rope(q, k, cos, sin)
    rq, rk = ref_rope(q, k, cos, sin)
    close(qo, rq, dtype)
    close(ko, rk, dtype)
    if not per_sequence:
        qo, ko = ops.rope(q[0], k[0], cos, sin)         # [T, H, D]
        close(qo, rq[0], dtype)
        close(ko, rk[0], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rope_writes_into_a_kv_cache_view_and_in_place(dtype):
    gen = torch.Generator().manual_seed(77)
    b, t, hq, hkv, d, start = 3, 5, 12, 2, 128, 9
    q = torch.randn(b, t, hq, d, generator=gen).to("cuda", dtype)
    k = torch.randn(b, t, hkv, d, generator=gen).to("cuda", dtype)
    cos, sin = tables(b, t, d, True, gen)
    rq, rk = ref_rope(q, k, cos, sin)
    cache = torch.zeros(b, hkv, 32, d, device="cuda", dtype=dtype)   # [B, Hkv, Tmax, D]
    k_slot = cache.transpose(1, 2)[:, start:start + t]              # [B, T, Hkv, D] view
    q_out = torch.empty_like(q)
    got_q, got_k = ops.rope(q, k, cos, sin, out=(q_out, k_slot))
    assert got_q is q_out and got_k is k_slot
    close(q_out, rq, dtype)
    close(cache[:, :, start:start + t].transpose(1, 2), rk, dtype)
    assert cache[:, :, :start].abs().sum() == 0 and cache[:, :, start + t:].abs().sum() == 0
    q2, k2 = q.clone(), k.clone()
    qw, kw = (1 + 0.2 * torch.randn(2, d, generator=gen)).to("cuda", dtype)
    ops.qk_norm_rope(q2, k2, qw, kw, cos, sin, 1e-6, out=(q2, k2))     # in place
    wq, wk = ref_qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    close(q2, wq, dtype, scale=2)
    close(k2, wk, dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, t, hq, hkv, d", [(1, 1, 16, 8, 128), (2, 11, 32, 8, 128), (3, 4, 14, 2, 64)])
def test_qk_norm_rope(dtype, b, t, hq, hkv, d):
    gen = torch.Generator().manual_seed(b * t * hq)
    q = torch.randn(b, t, hq, d, generator=gen).to("cuda", dtype)
    k = torch.randn(b, t, hkv, d, generator=gen).to("cuda", dtype)
    qw, kw = (1 + 0.2 * torch.randn(2, d, generator=gen)).to("cuda", dtype)
    cos, sin = tables(b, t, d, True, gen)
    qo, ko = ops.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    rq, rk = ref_qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    close(qo, rq, dtype, scale=2)
    close(ko, rk, dtype, scale=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, hidden, inter", [(1, 896, 4864), (3, 64, 128), (16, 200, 333), (17, 1536, 512),
                                              (130, 896, 1000), (512, 512, 2048)])
def test_fused_gated_mlp(dtype, m, hidden, inter):
    gen = torch.Generator().manual_seed(m + hidden + inter)
    x = torch.randn(m, hidden, generator=gen).to("cuda", dtype)
    g = (torch.randn(inter, hidden, generator=gen) / hidden ** 0.5).to("cuda", dtype)
    u = (torch.randn(inter, hidden, generator=gen) / hidden ** 0.5).to("cuda", dtype)
    for act in (["silu", "gelu", "gelu_tanh"] if m == 3 else ["silu"]):
        close(ops.fused_gated_mlp(x, g, u, act), ref_gated_mlp(x, g, u, act), dtype, scale=2)
    close(ops.fused_gated_mlp(x.view(1, m, hidden), g, u), ref_gated_mlp(x, g, u).view(1, m, inter), dtype, scale=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gen = torch.Generator().manual_seed(5)
    for shape in ((1, 2 * 4864), (3, 7, 2 * 333), (64, 2 * 8960)):
        gu = (3 * torch.randn(shape, generator=gen)).to("cuda", dtype)
        for act in ("silu", "gelu"):
            close(ops.silu_mul(gu, act), ref_silu_mul(gu, act), dtype, scale=4)


def test_fused_gated_mlp_module_equals_transformers_qwen2_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
    cfg = transformers.Qwen2Config(hidden_size=256, intermediate_size=704, hidden_act="silu")
    torch.manual_seed(0)
    hf = Qwen2MLP(cfg).to("cuda", torch.bfloat16)
    ours = ops.FusedGatedMLP(256, 704).to("cuda", torch.bfloat16)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(9, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = hf.float()(x.float())
        got = ours(x)
    torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2)


def test_device_errors_and_overflow_on_cuda():
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    w = torch.randn(128, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ops.DeviceError) as e:
        ops.fused_gated_mlp(x, w, w.cpu())
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("up_weight", "cuda", "cpu")
    big = torch.full((4, 64), 60.0, device="cuda", dtype=torch.float16)
    out = ops.fused_gated_mlp(big, w.abs(), w.abs())                 # no check by default: inf comes back
    assert not torch.isfinite(out).all()
    with pytest.raises(ops.NumericalOverflowError) as e:
        ops.fused_gated_mlp(big, w.abs(), w.abs(), check_finite=True)
    assert e.value.tensor == "output" and e.value.expected == "finite"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", [False, True])
def test_rope_store_equals_the_torch_form(dtype, norm):
    from rwkv_chat.models.qwen2 import layers

    gen = torch.Generator().manual_seed(11)
    b, hq, hkv, d, cap = 3, 12, 2, 128, 700
    cos, sin = (t.to("cuda", dtype) for t in layers.rope_table(1e6, d, cap))
    lens = torch.tensor([0, 350, cap - 1], device="cuda")
    qkv = torch.randn(b, (hq + 2 * hkv) * d, generator=gen).to("cuda", dtype)
    kc, vc = (torch.randn(b + 1, hkv, cap, d, generator=gen).to("cuda", dtype) for _ in range(2))
    w = tuple(torch.rand(d, generator=gen).to("cuda", dtype) + 0.5 for _ in range(2)) if norm else (None, None)
    ours, ref = (kc.clone(), vc.clone()), (kc.float(), vc.float())
    q = ops.rope_store(qkv, cos, sin, lens, *ours, hq, *w)
    q_ref = layers.rope_store(qkv.float(), cos.float(), sin.float(), lens, *ref, hq,
                              *(t.float() if t is not None else None for t in w))
    close(q, q_ref, dtype, 4)
    close(ours[0], ref[0], dtype, 4)
    close(ours[1], ref[1], dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,hq,hkv,cap,splits", [(1, 12, 2, 256, None), (2, 28, 4, 4096, None), (5, 7, 1, 999, 3),
                                                  (3, 16, 8, 300, 1)])
def test_decode_attention_equals_the_masked_sdpa(dtype, b, hq, hkv, cap, splits):
    from rwkv_chat.models.qwen2 import layers

    gen = torch.Generator().manual_seed(12)
    d = 128
    q = torch.randn(b, hq, d, generator=gen).to("cuda", dtype)
    kc, vc = (torch.randn(b, hkv, cap, d, generator=gen).to("cuda", dtype) for _ in range(2))
    lens = torch.randint(0, cap, (b,), generator=gen).cuda()
    lens[0] = cap - 1
    out = ops.decode_attention(q, kc, vc, lens, splits=splits)
    close(out, layers.decode_attention(q.float(), kc.float(), vc.float(), lens), dtype, 2)
