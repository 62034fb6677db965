"""The tensors the fused CUDA backend stacks for decode steps of many rows (``fused_cuda._stack_many``) and the
batched low-rank products over them (``fused_cuda.low_rank_many``), against the per-matrix products of
``models/rwkv/v7.py`` (ChatRWKV ``RWKV_x070_TMix_one``). Device-independent code, checked on the CPU; the
whole decode step on the GPU is ``tests/gpu/verify_fused.py``."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.backends import fused_cuda

C, DIMS = 64, {"w": 16, "a": 12, "v": 8, "g": 24}


def _layer(first: bool, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(3 + first)
    p = {f"att.x_{m}": torch.randn(C, generator=g, dtype=dtype) for m in "rwkvag"}
    p["ln1.weight"] = torch.ones(C, dtype=dtype)
    for m, d in DIMS.items():
        if m == "v" and first:
            continue
        p[f"att.{m}1"] = torch.randn(C, d, generator=g, dtype=dtype) * 0.3
        p[f"att.{m}2"] = torch.randn(d, C, generator=g, dtype=dtype) * 0.3
    for n in ("att.receptance.weight", "att.key.weight", "att.value.weight"):
        p[n] = torch.randn(C, C, generator=g, dtype=dtype).t().contiguous().t()   # output-major, as the backend holds
    return p


def test_the_lerp_order_makes_rkv_and_vwa_slices():
    assert fused_cuda.MANY_ORDER[0:3] == "rkv" and fused_cuda.MANY_ORDER[2:5] == "vwa"
    assert sorted(fused_cuda.MANY_ORDER) == sorted("rwkvag")
    p, f = _layer(False), {}
    fused_cuda._stack_many(p, f)
    for i, m in enumerate(fused_cuda.MANY_ORDER):
        assert torch.equal(f["mix6_many"][i], p[f"att.x_{m}"])


@pytest.mark.parametrize("first", [False, True])
def test_batched_low_rank_products_equal_the_per_matrix_ones(first):
    p, f = _layer(first), {}
    fused_cuda._stack_many(p, f)
    b = 5
    xs = {m: torch.randn(b, C, dtype=torch.float64) for m in "rwkvag"}
    mix = torch.stack([xs[m] for m in fused_cuda.MANY_ORDER])
    vl, wl, al = fused_cuda.low_rank_many(mix, f)
    torch.testing.assert_close(wl, torch.tanh(xs["w"] @ p["att.w1"]) @ p["att.w2"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(al, (xs["a"] @ p["att.a1"]) @ p["att.a2"], rtol=1e-12, atol=1e-12)
    if first:
        assert not vl.any()
    else:
        torch.testing.assert_close(vl, (xs["v"] @ p["att.v1"]) @ p["att.v2"], rtol=1e-12, atol=1e-12)


def test_rkv_become_views_of_one_stack_with_the_same_values():
    p, f = _layer(False, torch.float32), {}
    before = {n: p[n].clone() for n in fused_cuda._BIG[:3]}
    fused_cuda._stack_many(p, f)
    assert f["rkv"].shape == (3, C, C) and f["rkv"].is_contiguous()
    x = torch.randn(4, C)
    got = torch.bmm(x.expand(3, 4, C), f["rkv"].transpose(1, 2))
    for i, n in enumerate(fused_cuda._BIG[:3]):
        assert torch.equal(p[n], before[n])
        assert p[n].t().is_contiguous() and p[n].untyped_storage().data_ptr() == f["rkv"].untyped_storage().data_ptr()
        torch.testing.assert_close(got[i], x @ before[n], rtol=1e-5, atol=1e-5)


def test_mismatched_rkv_are_left_alone():
    p, f = _layer(False, torch.float32), {}
    p["att.value.weight"] = p["att.value.weight"].half()        # a dtype unlike the others: no stack
    fused_cuda._stack_many(p, f)
    assert "rkv" not in f
    p, f = _layer(False, torch.float32), {}
    p["ln1.weight"] = p["ln1.weight"].to("meta")     # the layer on another device than r/k/v (a streamed layer's
    fused_cuda._stack_many(p, f)                     # matrices stay in the streamer's host memory)
    assert "rkv" not in f and p["att.key.weight"].device.type == "cpu"


def test_int4_rkv_become_views_of_one_stack_that_mm4_stack_reads():
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.kernels import dispatch
    from rwkv_chat.models.ops import gemv

    p, f = _layer(False, torch.float32), {}
    for n in fused_cuda._BIG[:3]:
        p[n] = i4.quantize_i4(p[n].contiguous(), 32).with_layout(True)       # as CUDA holds them: output-major
    before = {n: p[n].dequantize(torch.float64) for n in fused_cuda._BIG[:3]}
    fused_cuda._stack_many(p, f)
    assert f.get("rkv_i4") and "rkv" not in f
    qs = [p[n] for n in fused_cuda._BIG[:3]]
    assert gemv.i4_stack_strides(qs) is not None and all(q.qweight.t().is_contiguous() for q in qs)
    for n in fused_cuda._BIG[:3]:
        assert torch.equal(p[n].dequantize(torch.float64), before[n])
    assert dispatch.mm4_stack(torch.randn(3, 8, C).half(), qs) is None      # the Triton kernel serves CUDA only
    p, f = _layer(False, torch.float32), {}
    p["att.key.weight"] = i4.quantize_i4(p["att.key.weight"].contiguous(), 32)
    fused_cuda._stack_many(p, f)                     # one int4 matrix among plain ones: neither stack
    assert "rkv" not in f and "rkv_i4" not in f


def test_i8_rkv_become_views_of_one_stack(monkeypatch):
    from rwkv_chat.models.formats import i8
    from rwkv_chat.models.kernels import gemmq

    g, K = torch.Generator().manual_seed(2), 128          # the uint8 tensor-core GEMM reads K % 128 == 0
    p, f = _layer(False, torch.float32), {}
    for n in fused_cuda._BIG[:3]:                          # fp16 scales, output-major: as CUDA holds them
        p[n] = i8.quantize_i8(torch.randn(K, K, generator=g), torch.float16, output_major=True)
    before = {n: p[n].dequantize(torch.float64) for n in fused_cuda._BIG[:3]}
    own = {n: p[n] for n in fused_cuda._BIG[:3]}
    monkeypatch.setattr(gemmq, "U8_STACK_ENABLED", False)      # switched off: nothing stacked
    fused_cuda._stack_many(p, f)
    assert "rkv_i8" not in f and all(p[n] is own[n] for n in fused_cuda._BIG[:3])
    monkeypatch.setattr(gemmq, "U8_STACK_ENABLED", True)
    fused_cuda._stack_many(p, f)
    assert f.get("rkv_i8") and "rkv" not in f and "rkv_i4" not in f
    qs = [p[n] for n in fused_cuda._BIG[:3]]
    base = qs[0].storage.data_ptr()
    assert [q.storage.data_ptr() - base for q in qs] == [0, K * K, 2 * K * K]       # back to back
    for n in fused_cuda._BIG[:3]:
        assert torch.equal(p[n].dequantize(torch.float64), before[n]) and p[n].output_major
    for make in (lambda w: i8.quantize_i8(w[:64, :64].contiguous(), torch.float16, output_major=True),   # K % 128
                 lambda w: i8.quantize_i8(w, torch.bfloat16, output_major=True)):     # scales the GEMM does not read
        p, f = _layer(False, torch.float32), {}
        for n in fused_cuda._BIG[:3]:
            p[n] = make(torch.randn(K, K, generator=g))
        fused_cuda._stack_many(p, f)
        assert "rkv_i8" not in f


def test_value_rows_off_cuda_is_the_plain_product():
    """The channel-mix value product of decode steps: the compiled row kernel serves CUDA tensors only
    (``dispatch.ffn_rows`` is None elsewhere, whatever the layout), and the backend then multiplies with its mm."""
    from rwkv_chat.models.kernels import dispatch

    g = torch.Generator().manual_seed(5)
    h = torch.relu(torch.randn(3, 96, generator=g)).square().half()
    w = torch.randn(96, 40, generator=g).half()
    assert dispatch.ffn_rows(h, w) is None
    assert dispatch.ffn_rows(h, w, skip_zeros=False) is None
    got = fused_cuda._value_rows(h, w, True, lambda a, b: (a.float() @ b.float()).half())
    assert torch.equal(got, (h.float() @ w.float()).half())


@pytest.mark.parametrize("wrong", [None, "none", "off"])
def test_the_i8_stack_probe_admits_only_a_product_that_agrees_with_torch(monkeypatch, wrong):
    """``_probe_rkv_stack(..., "rkv_i8")`` compares ``dispatch.mm8_stack`` with the per-matrix torch products at
    16, 24, 64 and 200 rows: a stand-in that agrees passes; one that does not serve, or is off by a little, is
    refused with why; the int4 key of the same layers is probed on its own."""
    from types import SimpleNamespace

    from rwkv_chat.models.formats import i8
    from rwkv_chat.models.kernels import dispatch

    g, K = torch.Generator().manual_seed(4), 128
    p = {"ln1.weight": torch.ones(K, dtype=torch.float16)}
    for n in fused_cuda._BIG[:3]:
        p[n] = i8.quantize_i8(torch.randn(K, K, generator=g), torch.float16, output_major=True)
    rows_seen = []

    def stand_in(x, qs):
        rows_seen.append(x.shape[1])
        if wrong == "none":
            return None
        y = torch.stack([i8.mm8_torch(x[k], q) for k, q in enumerate(qs)])
        return y * 1.05 if wrong == "off" and x.shape[1] == 64 else y

    monkeypatch.setattr(dispatch, "mm8_stack", stand_in)
    model, layers = SimpleNamespace(layers=[p]), [{"rkv_i8": True}]
    note = fused_cuda._probe_rkv_stack(model, layers, "rkv_i8")
    expected = {None: None, "none": "dispatch.mm8_stack does not serve these weights",
                "off": "dispatch.mm8_stack differs from the per-matrix products"}[wrong]
    assert note == expected
    assert rows_seen == {None: [16, 24, 64, 200], "none": [16], "off": [16, 24, 64]}[wrong]
    assert fused_cuda._probe_rkv_stack(model, layers, "rkv_i4") == "no CUDA layer with stacked int4 r/k/v"
