"""The decode step's torch forms (``layers.rope_store``, ``layers.decode_attention``) against the path they replace
(per-layer gathered cos/sin, ``rope``, two ``scatter_``, a masked SDPA) and a float64 loop; q/k/v and gate|up joined
at load equal the separate matrices; the Triton ops' validation on CPU."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_chat.models import formats, ops
from rwkv_chat.models.errors import DeviceError, ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats.i4 import concat_i4, quantize_i4
from rwkv_chat.models.qwen2 import layers


def _inputs(b=3, H=6, K=2, D=16, cap=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, (H + 2 * K) * D, generator=g)
    kc, vc = torch.randn(b + 1, K, cap, D, generator=g), torch.randn(b + 1, K, cap, D, generator=g)
    lens = torch.tensor([0, 17, cap - 1][:b])
    cos, sin = layers.rope_table(1e4, D, cap + 1)
    return qkv, kc, vc, lens, cos, sin, H


@pytest.mark.parametrize("norm", [False, True])
def test_rope_store_equals_rope_and_scatter(norm):
    qkv, kc, vc, lens, cos, sin, H = _inputs()
    b, K, D = qkv.shape[0], kc.shape[1], kc.shape[3]
    w = (torch.rand(D) + 0.5, torch.rand(D) + 0.5) if norm else (None, None)
    # the replaced path: cos/sin gathered per layer, q/k/v from three products, rope, two scatters
    q, k, v = qkv[:, :H * D], qkv[:, H * D:(H + K) * D], qkv[:, (H + K) * D:]
    c, s = cos[lens][:, None], sin[lens][:, None]
    q4, k4 = q.view(b, 1, H, D), k.view(b, 1, K, D)
    q_old, k_old = (layers.qk_norm_rope(q4, k4, *w, c, s, 1e-6) if norm else layers.rope(q4, k4, c, s))
    kc_old, vc_old = kc.clone(), vc.clone()
    index = lens.view(b, 1, 1, 1).expand(b, K, 1, D)
    kc_old[:b].scatter_(2, index, k_old.transpose(1, 2))
    vc_old[:b].scatter_(2, index, v.view(b, 1, K, D).transpose(1, 2))
    q_new = layers.rope_store(qkv, cos, sin, lens, kc, vc, H, *w, 1e-6)
    assert torch.equal(q_new, q_old[:, 0])
    assert torch.equal(kc, kc_old) and torch.equal(vc, vc_old)
    for r in range(b):                                     # only each row's own position was written
        others = [p for p in range(kc.shape[2]) if p != int(lens[r])]
        assert torch.equal(kc[r, :, others], _inputs()[1][r, :, others])


def test_decode_attention_equals_a_float64_loop_and_the_masked_sdpa():
    qkv, kc, vc, lens, cos, sin, H = _inputs()
    b, K, D = qkv.shape[0], kc.shape[1], kc.shape[3]
    q = qkv[:, :H * D].reshape(b, H, D)
    got = layers.decode_attention(q, kc, vc, lens)
    want = torch.empty(b, H, D, dtype=torch.float64)
    for r in range(b):
        n = int(lens[r]) + 1
        for h in range(H):
            kv = h // (H // K)
            scores = (kc[r, kv, :n].double() @ q[r, h].double()) / math.sqrt(D)
            want[r, h] = torch.softmax(scores, 0) @ vc[r, kv, :n].double()
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    mask = (torch.arange(kc.shape[2])[None, :] <= lens[:, None]).view(b, 1, 1, -1)
    old = layers.attention(q[:, :, None], kc[:b], vc[:b], mask)[:, :, 0]        # the decoder's former call
    assert torch.equal(got, old)


def test_linear_and_gated_mlp_of_joined_weights_equal_the_separate_products():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=g)
    wq, wk, wv = (torch.randn(24, n, generator=g) for n in (32, 8, 8))
    bias = torch.randn(48, generator=g)
    mm = formats.matmul_with(None)
    joined = layers.linear(x, torch.cat([wq, wk, wv], 1), bias, mm)
    apart = torch.cat([x @ wq, x @ wk, x @ wv], -1) + bias
    assert torch.allclose(joined, apart, atol=1e-5)
    assert torch.allclose(layers.linear(x, (wq, wk, wv), bias, mm), apart, atol=1e-6)
    gate, up = torch.randn(24, 40, generator=g), torch.randn(24, 40, generator=g)
    want = torch.nn.functional.silu(x @ gate) * (x @ up)
    assert torch.allclose(layers.gated_mlp(x, torch.cat([gate, up], 1), mm), want, atol=1e-5)
    assert torch.allclose(layers.gated_mlp(x, (gate, up), mm), want, atol=1e-6)


def test_per_column_formats_pack_a_joined_matrix_as_its_parts():
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(64, n, generator=g) for n in (32, 16, 16)]
    for quant in ("i4", "f8"):
        fmt = formats.get(quant)
        joined = fmt.pack(torch.cat(parts, 1), torch.float32, torch.device("cpu")).dequantize(torch.float32)
        apart = torch.cat([fmt.pack(p, torch.float32, torch.device("cpu")).dequantize(torch.float32) for p in parts], 1)
        assert torch.equal(joined, apart), quant
    q = [quantize_i4(p, 32) for p in parts]
    cat = concat_i4(q)
    assert cat is not None and tuple(cat.shape) == (64, 64)
    assert torch.equal(cat.dequantize(torch.float32), torch.cat([p.dequantize(torch.float32) for p in q], 1))
    held = concat_i4([p.with_layout(True) for p in q])          # as CUDA holds them: output-major, kept so
    assert held.output_major and torch.equal(held.dequantize(torch.float32), cat.dequantize(torch.float32))
    q[1].g_idx = torch.arange(64, dtype=torch.int32).flip(0) // 32            # another act-order: kept apart
    assert concat_i4(q) is None
    assert concat_i4([quantize_i4(torch.randn(64, 12, generator=g), 32), q[0]]) is None   # padded columns


def test_the_decode_ops_validate_on_cpu():
    qkv, kc, vc, lens, cos, sin, H = _inputs()
    half = [t.half() for t in (qkv, kc, vc, cos, sin)]
    with pytest.raises(DeviceError):
        ops.rope_store(half[0], half[3], half[4], lens, half[1], half[2], H)
    with pytest.raises(ShapeMismatchError) as e:
        ops.rope_store(half[0], half[3], half[4], lens, half[1], half[2], H + 1)
    assert e.value.tensor == "qkv"
    with pytest.raises(UnsupportedDtypeError):
        ops.rope_store(half[0], half[3], half[4], lens.float(), half[1], half[2], H)
    q = half[0][:, :H * 16].reshape(3, H, 16)
    with pytest.raises(DeviceError):
        ops.decode_attention(q, half[1], half[2], lens)
    with pytest.raises(UnsupportedDtypeError):
        ops.decode_attention(q.float(), kc, vc, lens)
    with pytest.raises(ShapeMismatchError) as e:
        ops.decode_attention(q[:, :5], half[1], half[2], lens)                 # 5 heads over 2 key/value heads
    assert e.value.tensor == "q"
    with pytest.raises(ShapeMismatchError) as e:
        ops.decode_attention(q, half[1], half[2], lens[:2])
    assert e.value.tensor == "lens"


def test_rope_attention_is_rope_store_then_decode_attention_and_validates_on_cpu():
    qkv, kc, vc, lens, cos, sin, H = _inputs()
    kc2, vc2 = kc.clone(), vc.clone()
    got = layers.rope_attention(qkv, cos, sin, lens, kc, vc, H)
    q = layers.rope_store(qkv, cos, sin, lens, kc2, vc2, H)
    assert torch.equal(got, layers.decode_attention(q, kc2, vc2, lens))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    half = [t.half() for t in (qkv, kc, vc, cos, sin)]
    with pytest.raises(DeviceError):
        ops.rope_attention(half[0], half[3], half[4], lens, half[1], half[2], H)
    with pytest.raises(UnsupportedDtypeError) as e:                       # fp32: the attention takes half dtypes
        ops.rope_attention(qkv, cos, sin, lens, kc, vc, H)
    assert e.value.tensor == "qkv"
    with pytest.raises(ShapeMismatchError) as e:
        ops.rope_attention(half[0], half[3], half[4], lens, half[1], half[2], H + 1)
    assert e.value.tensor == "qkv"
    width = (5 + 2 * 2) * 16
    with pytest.raises(ShapeMismatchError) as e:                           # 5 query heads over 2 key/value heads
        ops.rope_attention(torch.zeros(3, width, dtype=torch.float16), half[3], half[4], lens, half[1], half[2], 5)
    assert e.value.tensor == "num_heads"
