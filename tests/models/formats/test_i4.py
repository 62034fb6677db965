"""The i4 format: nibble packing, the GPTQ layout and zero convention against a plain reference, quantization
error bounds, odd shapes, and the typed errors."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import formats, kernels
from rwkv_chat.models.errors import ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats import i4


def gptq_pack_reference(w_int: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor):
    """AutoGPTQ's ``QuantLinear.pack`` written out element by element (v1 zeros: stored ``z - 1``).

    w_int int [K, N] 0..15, zeros int [G, N] 0..15, scales [G, N] -> (qweight, qzeros, scales)."""
    K, N = w_int.shape
    qweight = [[0] * N for _ in range(K // 8)]
    for row in range(K // 8):
        for j in range(8):
            for col in range(N):
                qweight[row][col] |= int(w_int[row * 8 + j, col]) << (4 * j)
    G = zeros.shape[0]
    qzeros = [[0] * (N // 8) for _ in range(G)]
    for g in range(G):
        for col in range(N):
            qzeros[g][col // 8] |= ((int(zeros[g, col]) - 1) & 15) << (4 * (col % 8))

    def as_int32(rows):
        t = torch.tensor(rows, dtype=torch.int64)
        return torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)

    return as_int32(qweight), as_int32(qzeros), scales.half()


def dequant_reference(w_int, zeros, scales, g_idx):
    """w[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n], element by element in float64."""
    K, N = w_int.shape
    out = torch.empty(K, N, dtype=torch.float64)
    for k in range(K):
        g = int(g_idx[k])
        out[k] = (w_int[k].double() - zeros[g].double()) * scales[g].half().double()
    return out


@pytest.mark.parametrize("shape", [(8, 8), (64, 24), (136, 40), (16, 256)])
def test_pack_unpack_round_trip(shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, shape, generator=g, dtype=torch.int32)
    assert torch.equal(i4.unpack_rows(i4.pack_rows(q)), q)
    assert torch.equal(i4.unpack_cols(i4.pack_cols(q)), q)
    packed = i4.pack_rows(q)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0] // 8, shape[1])
    assert int(packed[0, 0]) & 15 == int(q[0, 0])          # low nibble first


def test_gptq_tensor_made_by_the_reference_formula_loads_to_the_same_matrix():
    g = torch.Generator().manual_seed(1)
    K, N, group = 64, 16, 16
    w_int = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.randint(0, 16, (K // group, N), generator=g)
    zeros[0, :3] = 0                                       # stored as -1 (nibble 15): must read back as 0
    scales = torch.rand(K // group, N, generator=g) * 0.05 + 0.01
    qweight, qzeros, sc = gptq_pack_reference(w_int, zeros, scales)
    want = dequant_reference(w_int, zeros, scales, torch.arange(K) // group)
    q = i4.from_gptq(qweight, qzeros, sc)
    assert q.group_size == group and q.g_idx is None
    assert torch.equal(q.dequantize(torch.float32).double(), want.float().double())
    # act-order: a permuted g_idx is kept and honoured
    perm = torch.randperm(K, generator=g)
    g_idx = (perm // group).to(torch.int32)
    qa = i4.from_gptq(qweight, qzeros, sc, g_idx)
    assert qa.g_idx is not None
    assert torch.equal(qa.dequantize(torch.float32).double(), dequant_reference(w_int, zeros, scales, g_idx).float().double())
    x = torch.randn(3, K, generator=g)
    assert torch.allclose(kernels.mm4(x, qa), x @ qa.dequantize(torch.float32))


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (100, 37), (12, 5), (384, 96)])
def test_quantization_error_is_within_half_a_step(shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g)
    q = i4.quantize_i4(w)
    K, N = shape
    kp = -(-K // 8) * 8
    assert q.shape == shape and kp % q.group_size == 0
    assert q.group_size == (128 if kp % 128 == 0 else max(d for d in range(1, 129) if kp % d == 0))
    d = q.dequantize(torch.float32)
    assert d.shape == shape
    # every weight within half a step of its group's grid, unless the chosen range clipped it (q at 0 or 15)
    step = q.scales.float()[q.groups()[:K]][:, :N]
    codes = i4.unpack_rows(q.qweight)[:K, :N]
    near = (w - d).abs() <= step * 0.5 + 1e-6
    assert bool((near | (codes == 0) | (codes == 15)).all())
    assert near.float().mean() > 0.95
    assert ((d - w).norm() / w.norm()).item() < 0.15
    # the stored tensors are the GPTQ layout: reloading them through from_gptq gives the same matrix
    again = i4.from_gptq(q.qweight, q.qzeros, q.scales, shape=shape)
    assert torch.equal(again.dequantize(torch.float32), d)


def test_format_registration_and_sizes():
    fmt = formats.get("i4")
    assert isinstance(fmt, formats.WeightFormat) and fmt.kernel == "mm4"
    w = torch.randn(256, 128)
    q = fmt.pack(w, torch.float32, torch.device("cpu"))
    assert formats.format_of(q) is fmt
    assert formats.nbytes(q) == 256 * 128 // 2 + 2 * 128 * 2 + 2 * 16 * 4      # nibbles, fp16 scales, zeros
    x = torch.randn(5, 256, dtype=torch.float64)
    y = fmt.matmul(x.float(), q, output_dtype=torch.float64)
    assert y.dtype == torch.float64 and torch.allclose(y, (x @ q.dequantize(torch.float64)), rtol=1e-4, atol=1e-4)


def test_typed_errors():
    with pytest.raises(ShapeMismatchError):
        i4.quantize_i4(torch.randn(4, 4, 4))
    with pytest.raises(UnsupportedDtypeError):
        i4.quantize_i4(torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ShapeMismatchError):
        i4.quantize_i4(torch.randn(64, 8), group_size=48)
    q = i4.quantize_i4(torch.randn(64, 16))
    with pytest.raises(UnsupportedDtypeError) as e:
        i4.from_gptq(q.qweight, q.qzeros, q.scales, bits=3)
    assert e.value.expected == 4 and e.value.actual == 3
    with pytest.raises(UnsupportedDtypeError):
        i4.from_gptq(q.qweight.to(torch.int64), q.qzeros, q.scales)
    with pytest.raises(ShapeMismatchError):
        i4.from_gptq(q.qweight, q.qzeros[:, :1], q.scales)
    with pytest.raises(ShapeMismatchError):
        i4.from_gptq(q.qweight, q.qzeros, q.scales, g_idx=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ShapeMismatchError):
        kernels.mm4(torch.randn(2, 63), q)


def test_gptq_checkpoint_linear_and_config():
    g = torch.Generator().manual_seed(6)
    K, N, group = 64, 24, 32
    w_int = torch.randint(0, 16, (K, N), generator=g)
    zeros = torch.randint(1, 16, (K // group, N), generator=g)
    scales = torch.rand(K // group, N, generator=g) * 0.05 + 0.01
    qweight, qzeros, sc = gptq_pack_reference(w_int, zeros, scales)
    want = dequant_reference(w_int, zeros, scales, torch.arange(K) // group).float()
    tensors = {"l.qweight": qweight, "l.qzeros": qzeros, "l.scales": sc,
               "l.g_idx": (torch.arange(K) // group).to(torch.int32)}
    cfg = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False}
    q = i4.gptq_linear(tensors, "l", cfg)
    assert i4.gptq_group_size(cfg) == group and torch.equal(q.dequantize(torch.float32), want)
    # GPTQModel's v2 zeros (stored as z, not z - 1) give the same matrix
    v2 = dict(tensors, **{"l.qzeros": i4.pack_cols(zeros.to(torch.int32))})
    q2 = i4.gptq_linear(v2, "l", dict(cfg, checkpoint_format="gptq_v2"))
    assert torch.equal(q2.dequantize(torch.float32), want)
    from rwkv_chat.models.errors import CheckpointError

    with pytest.raises(CheckpointError):
        i4.gptq_linear(tensors, "other", cfg)
    for field, value in (("bits", 8), ("quant_method", "awq"), ("checkpoint_format", "marlin")):
        with pytest.raises(UnsupportedDtypeError) as e:
            i4.gptq_group_size(dict(cfg, **{field: value}))
        assert e.value.actual == value
