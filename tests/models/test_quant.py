"""The i8 weight layouts (``Int8Weight.output_major``): same values, same products, conversions both ways,
the engine's placement, and the typed errors of malformed layouts."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import kernels
from rwkv_chat.models.formats import i8 as quant
from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.formats.i8 import Int8Weight, quantize_i8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layout_round_trip_keeps_every_value(dtype):
    g = torch.Generator().manual_seed(1)
    q = quantize_i8(torch.randn(96, 40, generator=g), dtype)
    assert not q.output_major and q.w.is_contiguous() and q.storage.shape == (96, 40)
    o = q.with_layout(True)
    assert o.output_major and o.shape == q.shape == (96, 40)
    assert o.storage.shape == (40, 96) and o.storage.is_contiguous() and o.w.t().is_contiguous()
    assert torch.equal(o.w, q.w)
    assert torch.equal(o.dequantize(), q.dequantize())
    assert o.nbytes() == q.nbytes()
    back = o.with_layout(False)
    assert not back.output_major and back.w.is_contiguous() and torch.equal(back.w, q.w)
    assert q.with_layout(False) is q and o.with_layout(True) is o
    # contiguous() keeps the layout (it must not turn the transposed view into an [N, M] copy)
    c = o.contiguous()
    assert c.output_major and c.w.stride() == o.w.stride()


def test_to_picks_the_layout_of_the_target_device():
    q = quantize_i8(torch.randn(64, 48), torch.float32)
    assert not quant.prefers_output_major("cpu") and quant.prefers_output_major("cuda:0")
    assert not quantize_i8(torch.randn(8, 16), torch.float32).output_major   # quantized on the CPU
    o = q.to("cpu", output_major=True)
    assert o.output_major and torch.equal(o.w, q.w)
    # back onto the CPU without an explicit layout: the CPU kernels' input-major layout
    cpu = o.to("cpu")
    assert not cpu.output_major and cpu.w.is_contiguous() and torch.equal(cpu.w, q.w)
    for t_old, t_new in zip((q.mx, q.rx, q.my, q.ry), (cpu.mx, cpu.rx, cpu.my, cpu.ry)):
        assert torch.equal(t_old, t_new)


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_products_agree_for_both_layouts(rows):
    g = torch.Generator().manual_seed(rows)
    q = quantize_i8(torch.randn(128, 80, generator=g) * 0.1, torch.float32)
    o = q.with_layout(True)
    x = torch.randn(rows, 128, generator=g)
    ref = x.double() @ q.dequantize(torch.float64)
    assert _rel(quant.mm8_torch(x, q), ref) <= 1e-6
    assert _rel(quant.mm8_torch(x, o), ref) <= 1e-6
    # the dispatch: the CPU kernel for input-major, the torch path for output-major; one contract
    kernels.ensure_built("cpu")
    out = torch.full((rows, 80), float("nan"))
    assert _rel(kernels.mm8(x, o, out=out), ref) <= 1e-5 and torch.isfinite(out).all()
    assert _rel(kernels.mm8(x, q), ref) <= 1e-5


def test_malformed_output_major_weight_is_a_typed_error():
    q = quantize_i8(torch.randn(32, 16), torch.float32)
    with pytest.raises(ShapeMismatchError):
        Int8Weight(q.w, q.mx, q.rx, q.my, q.ry, output_major=True)   # an [N, M]-contiguous w is not [M, N]^T
    bad = Int8Weight(q.w.t().contiguous().t(), q.mx, q.rx, q.my, q.ry, output_major=True)
    bad.w = q.w     # changed after construction: the kernel checks catch it
    with pytest.raises(ShapeMismatchError):
        kernels.mm8(torch.randn(2, 32), bad)


def test_cpu_placement_keeps_input_major_weights(model_path):
    """The engine on the CPU: every i8 matrix (head included) input-major, as the CPU kernels read it."""
    from rwkv_chat.models import RWKV

    model = RWKV(model_path("7"), "cpu fp32i8")
    ws = [w for layer in model.layers for w in layer.values() if isinstance(w, Int8Weight)]
    assert ws and all(not w.output_major and w.w.is_contiguous() for w in ws)
    assert isinstance(model.head, Int8Weight) and not model.head.output_major
