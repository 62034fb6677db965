"""The f8 format (e4m3 values, per-channel scales, the exact CPU emulation) and the typed errors of the quantized
operators (``quantize_fp8``, ``fp8_gemm``, ``FP8Linear``, ``fused_ln_qkv_gptq``, the GEMVs) for bad input."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import formats, kernels
from rwkv_chat.models.errors import DeviceError, NumericalOverflowError, ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats import f8, i4
from rwkv_chat.models.ops import FP8Linear, fp8_gemm, fused_ln_qkv_gptq, quantize_fp8
from rwkv_chat.models.ops.gemv import f8_gemv, i4_gemv
from rwkv_chat.models.ops.gptq import fused_ln_qkv_gptq_reference


def e4m3_grid() -> torch.Tensor:
    """Every finite e4m3fn value, from its bit patterns (sign, 4 exponent bits with bias 7, 3 mantissa bits)."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue                                   # NaN
            v = (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals += [v, -v]
    return torch.tensor(sorted(set(vals)), dtype=torch.float64)


def test_f8_values_are_true_e4m3_and_dequantize_exactly():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 48, generator=g) * 0.2
    q = f8.quantize_f8(w)
    assert q.w8.dtype == torch.float8_e4m3fn and q.w8.shape == (48, 96) and q.scale.shape == (48,)
    grid = e4m3_grid()
    codes = q.w8.double().flatten()
    assert bool(torch.isin(codes, grid).all())                      # e4m3 values, not a linear uint8 code
    assert float(codes.abs().max()) == 448.0                        # each column's largest weight maps to 448
    d = q.dequantize(torch.float64)
    assert torch.equal(d, (q.w8.float() * q.scale.unsqueeze(1)).double().t())      # e4m3 -> fp32 exact, one product
    # nearest e4m3 value: relative error at most 2^-4 (3 mantissa bits) for normal values
    assert float(((d - w.double()).abs() / w.double().abs().clamp(min=1e-3)).max()) <= 2.0 ** -4 + 1e-9
    x = torch.randn(4, 96, generator=g)
    assert torch.equal(f8.mmf8_torch(x, q), x @ q.dequantize(torch.float32))   # the exact emulation
    ref = x.double() @ q.dequantize(torch.float64)
    assert ((kernels.mmf8(x, q).double() - ref).norm() / ref.norm()).item() <= 1e-6   # compiled or emulated
    assert formats.nbytes(q) == 96 * 48 + 48 * 4


def test_f8_input_major_layout_holds_the_same_weight():
    """``with_layout(True)``: w8 the transposed view of a contiguous [K, N] (each input's weights contiguous, the
    layout the fused backend gives channel-mix value matrices), the same values, product and saved parts; back to
    output-major with ``with_layout(False)``."""
    from rwkv_chat.models.formats import serialize

    g = torch.Generator().manual_seed(5)
    q = f8.quantize_f8(torch.randn(64, 48, generator=g))
    r = q.with_layout(True)
    assert not q.input_major and r.input_major and r.w8.t().is_contiguous() and not r.w8.is_contiguous()
    assert r.with_layout(True) is r and q.with_layout(False) is q
    assert torch.equal(r.w8.view(torch.uint8), q.w8.view(torch.uint8)) and r.shape == q.shape
    assert torch.equal(r.dequantize(), q.dequantize())
    x = torch.randn(3, 64, generator=g)
    assert torch.equal(kernels.mmf8(x, r), kernels.mmf8(x, q))
    back = r.with_layout(False)
    assert back.w8.is_contiguous() and torch.equal(back.w8.view(torch.uint8), q.w8.view(torch.uint8))
    (s1, p1, _), (s2, p2, _) = serialize.parts(q), serialize.parts(r)
    assert s1 == s2 == "f8" and all(torch.equal(p1[k], p2[k]) for k in p1)


def test_f8_device_support():
    assert f8.capability_reason(torch.device("cpu")) is None
    assert "i8 or i4" in f8.capability_reason(torch.device("mps"))


def test_quantize_fp8_and_its_errors():
    x = torch.randn(5, 32)
    q, s = quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1) and s.dtype == torch.float32
    assert torch.allclose(q.float() * s, x, rtol=2 ** -4, atol=1e-6)
    qt, st = quantize_fp8(x, granularity="tensor")
    assert st.dim() == 0 and float(qt.float().abs().max()) == 448.0
    with pytest.raises(UnsupportedDtypeError) as e:
        quantize_fp8(torch.ones(4, dtype=torch.int32))
    assert e.value.tensor == "x" and e.value.actual == "int32"
    with pytest.raises(ShapeMismatchError):
        quantize_fp8(torch.tensor(1.0))
    with pytest.raises(ShapeMismatchError):
        quantize_fp8(x, torch.ones(3, 1))
    with pytest.raises(ShapeMismatchError):
        quantize_fp8(x, granularity="column")
    with pytest.raises(UnsupportedDtypeError):
        quantize_fp8(x, torch.ones(5, 1, dtype=torch.float16))
    with pytest.raises(NumericalOverflowError) as e:
        quantize_fp8(x * 1000, torch.ones(()))               # beyond ±448: refused, never saturated silently
    assert e.value.tensor == "x" and e.value.actual > 448
    with pytest.raises(NumericalOverflowError):
        quantize_fp8(torch.tensor([1.0, float("inf")]))
    with pytest.raises(NumericalOverflowError):
        quantize_fp8(x, torch.zeros(()))


def test_fp8_gemm_and_its_errors():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(8, 32, generator=g), torch.randn(32, 48, generator=g)
    qa, sa = quantize_fp8(a)
    qb, sb = quantize_fp8(b.t().contiguous())                # per output column
    want = (qa.double() * sa.double()) @ (qb.double() * sb.double()).t()
    y = fp8_gemm(qa, qb.t(), sa, sb.t(), output_dtype=torch.float32)
    assert y.shape == (8, 48) and y.dtype == torch.float32
    assert torch.allclose(y.double(), want, rtol=1e-4, atol=1e-4)
    assert torch.allclose(fp8_gemm(a, b, output_dtype=torch.float32).double(), want, rtol=1e-4, atol=1e-4)
    assert fp8_gemm(a, b).dtype == torch.float16
    with pytest.raises(UnsupportedDtypeError):
        fp8_gemm(a.to(torch.int32), b)
    with pytest.raises(UnsupportedDtypeError):
        fp8_gemm(a, b, output_dtype=torch.int8)
    with pytest.raises(UnsupportedDtypeError):
        fp8_gemm(a, b, a_scale=torch.ones(()))               # a scale for a float operand
    with pytest.raises(ShapeMismatchError):
        fp8_gemm(a, b[:16])
    with pytest.raises(ShapeMismatchError) as e:
        fp8_gemm(torch.randn(8, 24), torch.randn(24, 48))     # K not a multiple of 16
    assert e.value.actual == (24, 48)
    with pytest.raises(ShapeMismatchError):
        fp8_gemm(qa, qb.t(), torch.ones(3, 1), sb.t())
    with pytest.raises(DeviceError):
        fp8_gemm(a, b.to("meta"))
    with pytest.raises(NumericalOverflowError):
        fp8_gemm(a * float("nan"), b)


def test_fp8_linear_and_its_errors():
    lin = torch.nn.Linear(32, 48, bias=True)
    m = FP8Linear.from_linear(lin)
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight.shape == (48, 32) and m.weight_scale.shape == (48,)
    x = torch.randn(3, 7, 32)
    deq = m.weight.float() * m.weight_scale.unsqueeze(1)
    assert torch.allclose(m(x), x @ deq.t() + lin.bias.detach(), atol=1e-5)
    with torch.no_grad():
        assert ((m(x) - lin(x)).norm() / lin(x).norm()).item() < 0.05
    assert FP8Linear(16, 32)(torch.randn(2, 16)).shape == (2, 32)
    with pytest.raises(ShapeMismatchError):
        FP8Linear(30, 48)
    with pytest.raises(ShapeMismatchError):
        m(torch.randn(3, 31))
    with pytest.raises(UnsupportedDtypeError):
        m(torch.ones(3, 32, dtype=torch.int64))
    with pytest.raises(DeviceError):
        m(torch.randn(3, 32, device="meta"))
    with pytest.raises(UnsupportedDtypeError, match="half"):
        m.half()(torch.randn(3, 32))


def _gptq_args(H=64, widths=(64, 64, 64), group=32, dtype=torch.float16):
    g = torch.Generator().manual_seed(5)
    q = i4.quantize_i4(torch.randn(H, sum(widths), generator=g), group)
    return (torch.randn(2, 3, H, generator=g).to(dtype), q.qweight, q.qzeros, q.scales,
            torch.rand(H, generator=g).to(dtype) + 0.5, torch.randn(H, generator=g).to(dtype), group, 1e-5), q


def test_fused_ln_qkv_gptq_reference_and_errors():
    args, q = _gptq_args(dtype=torch.float32)
    args = (args[0], *args[1:])
    x, *_ = args
    out = fused_ln_qkv_gptq_reference(x.half(), *args[1:4], args[4].half(), args[5].half(), *args[6:])
    assert out.shape == (3, 2, 3, 64) and out.dtype == torch.float16
    xn = torch.nn.functional.layer_norm(x, (64,), args[4], args[5], 1e-5)
    want = (xn @ q.dequantize(torch.float32)).view(2, 3, 3, 64).permute(2, 0, 1, 3)
    assert torch.allclose(out.float(), want, rtol=2e-2, atol=2e-2)
    gq, _ = _gptq_args(widths=(64, 32, 32))
    qkv = fused_ln_qkv_gptq_reference(*gq, widths=(64, 32, 32), rms=True)
    assert [t.shape for t in qkv] == [(2, 3, 64), (2, 3, 32), (2, 3, 32)]
    good, _ = _gptq_args()
    with pytest.raises(DeviceError) as e:                        # CPU tensors: the Triton op runs on CUDA
        fused_ln_qkv_gptq(*good)
    assert e.value.tensor == "input" and e.value.expected == "cuda"
    bad = {
        UnsupportedDtypeError: [(0, good[0].float()), (1, good[1].to(torch.int64)), (2, good[2].float()),
                                (3, good[3].to(torch.int32)), (4, good[4].double()), (7, 1)],
        ShapeMismatchError: [(0, good[0][0]), (1, good[1][:4]), (2, good[2][:, :1]), (3, good[3][:1]),
                             (4, good[4][:8]), (5, good[5][:8]), (6, 24), (0, torch.randn(2, 3, 60).half())],
    }
    for err, cases in bad.items():
        for i, value in cases:
            a = list(good)
            a[i] = value
            with pytest.raises(err):
                fused_ln_qkv_gptq(*a)
            with pytest.raises(err):
                fused_ln_qkv_gptq_reference(*a)
    with pytest.raises(ShapeMismatchError):
        fused_ln_qkv_gptq(*good, widths=(64, 64, 32))
    with pytest.raises(ShapeMismatchError):
        fused_ln_qkv_gptq(*_gptq_args(widths=(64, 32, 32))[0])    # unequal widths need widths=


def test_gemv_errors_on_cpu():
    q4 = i4.quantize_i4(torch.randn(64, 32))
    q8 = f8.quantize_f8(torch.randn(64, 32))
    for fn, q in ((i4_gemv, q4), (f8_gemv, q8)):
        with pytest.raises(UnsupportedDtypeError):
            fn(torch.randn(2, 64), q)                       # fp32: the GEMVs take fp16/bf16
        with pytest.raises(ShapeMismatchError):
            fn(torch.randn(2, 60).half(), q)
        with pytest.raises(ShapeMismatchError):
            fn(torch.randn(300, 64).half(), q)              # more rows than the kernels serve
        with pytest.raises(DeviceError):
            fn(torch.randn(2, 64).half(), q)
