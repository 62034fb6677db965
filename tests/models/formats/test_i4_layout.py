"""The output-major layout of i4 weights (``Int4Weight.output_major``, the layout CUDA holds and the compiled GEMV
of ``csrc/gemvq`` reads), on the CPU: conversions both ways are exact, every reader (dequantize, serialize,
rescale, the products) gives the GPTQ layout's results, streamed weights are kept in the device's layout, the
dispatch falls back to the torch product where the compiled family is not built, and the int4 decode
arithmetic of the CUDA kernel (``csrc/gemvq/gemvq_cuda.cu``, header) is exact."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import formats, kernels
from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.formats import i4, serialize
from rwkv_chat.models.kernels import dispatch
from rwkv_chat.models.ops import gemv

SHAPES = [(256, 24, None), (200, 72, None), (64, 40, 32), (512, 16, 128)]


def _weight(K, N, group, seed=0, g_idx=False):
    g = torch.Generator().manual_seed(seed)
    q = i4.quantize_i4(torch.randn(K, N, generator=g) * 0.1, group)
    if g_idx:
        perm = torch.randperm(q.qweight.shape[0] * 8, generator=g)
        q = i4.Int4Weight(q.qweight, q.qzeros, q.scales, (perm // q.group_size).to(torch.int32), q.group_size,
                          q.shape)
    return q


@pytest.mark.parametrize("K,N,group", SHAPES)
@pytest.mark.parametrize("g_idx", [False, True])
def test_output_major_round_trip_keeps_every_value(K, N, group, g_idx):
    q = _weight(K, N, group, g_idx=g_idx)
    om = q.with_layout(True)
    assert om.output_major and om.storage.is_contiguous() and om.storage.shape == (q.qweight.shape[1],
                                                                                     q.qweight.shape[0])
    assert torch.equal(om.qweight, q.qweight) and om.shape == q.shape and om.nbytes() == q.nbytes()
    assert torch.equal(om.storage, q.qweight.t())
    assert torch.equal(om.dequantize(torch.float32), q.dequantize(torch.float32))
    back = om.with_layout(False)
    assert not back.output_major and back.qweight.is_contiguous() and torch.equal(back.qweight, q.qweight)
    for same in (om.contiguous(), om.to("cpu", output_major=True), om._map(lambda t: t.clone())):
        assert same.output_major and same.storage.is_contiguous() and torch.equal(same.qweight, q.qweight)
    assert not om.to("cpu").output_major                       # the CPU's own layout (GPTQ) by default
    assert om.with_layout(True) is om


@pytest.mark.parametrize("K,N,group", SHAPES)
def test_serialize_writes_the_gptq_layout_from_either_layout(K, N, group):
    q = _weight(K, N, group, seed=3)
    suffix, p, info = serialize.parts(q)
    suffix_om, p_om, info_om = serialize.parts(q.with_layout(True))
    assert suffix == suffix_om == "i4" and info == info_om and set(p) == set(p_om)
    for name in p:
        assert p_om[name].is_contiguous() and torch.equal(p_om[name], p[name]), name
    back = serialize.assemble("i4", p_om, info_om)
    assert not back.output_major and torch.equal(back.dequantize(torch.float32), q.dequantize(torch.float32))
    r = serialize.rescaled(q.with_layout(True), 4.0)
    assert r.output_major
    assert torch.equal(r.dequantize(torch.float32), serialize.rescaled(q, 4.0).dequantize(torch.float32))


def test_output_major_needs_a_transposed_view():
    q = _weight(64, 40, 32)
    with pytest.raises(ShapeMismatchError):
        i4.Int4Weight(q.qweight, q.qzeros, q.scales, None, q.group_size, q.shape, output_major=True)


def test_streamed_weight_is_kept_in_the_layout_of_its_device():
    w = torch.randn(256, 48) * 0.1
    host_for_cuda = formats.get("i4").pack(w, torch.float16, torch.device("cuda"), stream=True)
    host_for_cpu = formats.get("i4").pack(w, torch.float16, torch.device("cpu"), stream=True)
    assert host_for_cuda.device.type == "cpu" and host_for_cuda.output_major and host_for_cuda.storage.is_contiguous()
    assert not host_for_cpu.output_major
    assert torch.equal(host_for_cuda.dequantize(torch.float32), host_for_cpu.dequantize(torch.float32))


@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_of_either_layout_agree_on_the_cpu(rows, dtype):
    """The GPTQ layout through the compiled CPU product where it is built (``csrc/gemvq/gemvq_cpu.cpp``), the
    output-major layout (CUDA's) through the torch product: the same values to rounding, either way."""
    from rwkv_chat.models.kernels import dispatch

    q = _weight(256, 40, 64, seed=5)
    om = q.with_layout(True)
    x = torch.randn(2, rows, 256).to(dtype)
    assert not kernels.available("cuda", "gemvq")              # no CUDA build here
    exact = x.double() @ q.dequantize(torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert not dispatch._i4_cpu_serves(x, om)                  # output-major on the CPU: the torch product
    for w in (q, om):
        got = kernels.mm4(x, w)
        assert got.shape == (2, rows, 40) and got.dtype == dtype
        if not dispatch._i4_cpu_serves(x, w):
            assert torch.equal(got, i4.mm4_torch(x, w))       # the torch product served it
        assert torch.equal(formats.get("i4").matmul(x, w), i4.mm4_torch(x, w))
        assert ((got.double() - exact).norm() / exact.norm()).item() < tol


def test_gemvq_reads_only_output_major_weights_it_can_serve():
    q = _weight(256, 40, 64)
    assert dispatch.gemvq_i4_ok(q.with_layout(True)) and not dispatch.gemvq_i4_ok(q)
    assert not dispatch.gemvq_i4_ok(_weight(256, 40, 64, g_idx=True).with_layout(True))    # g_idx: Triton / torch
    assert not dispatch.gemvq_i4_ok(_weight(200, 40, 40).with_layout(True))               # K % 32 != 0
    assert not dispatch.gemvq_i4_ok(_weight(64, 40, 16).with_layout(True))                # group % 32 != 0


def _as_float(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int64).bitwise_and(0xFFFFFFFF).to(torch.int32).view(torch.float32)


def _decode(v: torch.Tensor, z: torch.Tensor):
    """The kernel's int4 decode of int32 words v (any shape) with zero points z (same shape): [..., 8] float32
    values (q_e - z) * 16^p(e), and the prescale 16^-p(e) of x for each value e."""
    u = v.to(torch.int64) & 0xFFFFFFFF
    out = []
    for e in range(8):
        src, p = (u, e) if e < 5 else (u >> 16, e - 4)
        val = _as_float((src & (0xF << (4 * p))) | 0x4B000000)
        cz = _as_float(0x4B000000 | (z.to(torch.int64) << (4 * p)))
        out.append(val - cz)
    pre = torch.tensor([16.0 ** -(e if e < 5 else e - 4) for e in range(8)], dtype=torch.float32)
    return torch.stack(out, -1), pre


def test_kernel_int4_decode_is_exact_for_every_nibble_and_zero_point():
    # every value 0..15 at every place of a word, against every zero point 0..15
    q = torch.arange(16).view(16, 1, 1).expand(16, 16, 8)
    z = torch.arange(16).view(1, 16, 1).expand(16, 16, 8)
    shifts = torch.arange(8) * 4
    words = (q[..., 0:1] << shifts).sum(-1)                     # all eight nibbles equal to q
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    f, pre = _decode(words, z[..., 0])
    want = (q - z).to(torch.float32) * (1.0 / pre)
    assert torch.equal(f, want)
    assert torch.equal(f * pre, (q - z).to(torch.float32))       # x * 16^-p * (q - z) 16^p == x (q - z)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_int4_arithmetic_matches_the_reference(dtype):
    """The GEMV's sum as the kernel forms it: per 32-value chunk (one group) the fp32 sum of the prescaled x
    times the decoded values, times the group's scale, added over chunks in fp32."""
    K, N, group, rows = 512, 24, 128, 3
    q = _weight(K, N, group, seed=9).with_layout(True)
    x = (torch.randn(rows, K) * 2).to(dtype)
    words = q.storage                                          # [N, K/8]
    zeros = (i4.unpack_cols(q.qzeros) + 1) & 15                # [G, N]
    word_group = torch.arange(K // 8) * 8 // group             # [K/8]
    f, pre = _decode(words, zeros.t()[:, word_group])          # [N, K/8, 8]
    xs = x.float().view(rows, K // 8, 8) * pre                 # prescaled as staged
    prod = torch.einsum("rwe,nwe->rnw", xs, f)                 # fp32 sums per word
    chunk = prod.view(rows, N, K // 32, 4).sum(-1)             # per 32-value chunk
    sc = q.scales.float().t()[:, torch.arange(K // 32) * 32 // group]      # [N, K/32]
    y = (chunk * sc).sum(-1)
    ref = x.double() @ q.dequantize(torch.float64)
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-6


def test_grouped_gemv_is_not_served_on_the_cpu_and_checks_its_inputs():
    q = _weight(256, 40, 64).with_layout(True)
    x = torch.randn(2, 256)
    assert dispatch.gemvq_group([x, x], [q, q]) is None        # no CUDA build: the caller multiplies one by one
    assert dispatch.gemvq_group([x], [torch.randn(256, 40)]) is None
    with pytest.raises(ShapeMismatchError):
        dispatch.gemvq_group([torch.randn(2, 128)], [q])


@pytest.mark.parametrize("output_major", [False, True])
def test_a_stack_holds_the_same_weights_as_views_of_one_allocation_per_tensor(output_major):
    parts = [i4.quantize_i4(torch.randn(256, 72) * 0.05).with_layout(output_major) for _ in range(3)]
    stacked = i4.stack_i4(parts)
    for q, s in zip(parts, stacked):
        assert s.output_major == output_major and s.shape == q.shape and s.group_size == q.group_size
        assert torch.equal(s.dequantize(torch.float64), q.dequantize(torch.float64))
        if output_major:
            assert s.qweight.t().is_contiguous()      # still what the compiled GEMV reads
    strides = gemv.i4_stack_strides(stacked)
    assert strides == (stacked[0].qweight.numel(), stacked[0].qzeros.numel(), stacked[0].scales.numel())
    assert gemv.i4_stack_strides(parts) is None            # separate allocations are not one stack
    assert gemv.i4_stack_strides(stacked[:1]) is None
    assert gemv.i4_stack_strides([stacked[0], stacked[2], stacked[1]]) is None     # out of order


def test_weights_that_differ_do_not_stack():
    a = i4.quantize_i4(torch.randn(256, 64))
    assert i4.stack_i4([a, i4.quantize_i4(torch.randn(256, 72))]) is None                       # shape
    assert i4.stack_i4([a, a.with_layout(True)]) is None                                      # layout
    assert i4.stack_i4([a, i4.quantize_i4(torch.randn(256, 64), group_size=64)]) is None         # group
    perm = torch.randperm(256).to(torch.int32) // a.group_size
    assert i4.stack_i4([a, i4.Int4Weight(a.qweight, a.qzeros, a.scales, perm, a.group_size, a.shape)]) is None   # g_idx


def test_a_stack_needs_two_weights_and_mm4_stack_declines_what_it_cannot_run():
    a = i4.quantize_i4(torch.randn(256, 64))
    assert i4.stack_i4([]) is None and i4.stack_i4([a]) is None
    assert gemv.i4_stack_strides([]) is None
    qs = i4.stack_i4([a, a, a])
    x = torch.randn(3, 5, 256).half()
    assert dispatch.mm4_stack(x, qs) is None                       # not CUDA: the caller multiplies one by one
    assert dispatch.mm4_stack(x, []) is None
    assert dispatch.mm4_stack(x, [a, a, "not a weight"]) is None
