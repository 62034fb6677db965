"""``ops.norm_gemv``: its typed errors (on CPU, before the device), its torch reference against the composition it
replaces in a Qwen2 layer (``layers.add_rmsnorm`` + ``layers.linear`` / ``gated_mlp``) and the block shapes it
picks; on CUDA the Triton kernel against the reference. The kernel itself also runs in Triton's interpreter on the
CPU (``tests/gpu/interpret_prenorm.py``, through ``test_interpreted_kernels.py``)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rwkv_chat.models import ops
from rwkv_chat.models.ops import DeviceError, ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.ops.prenorm import MAX_ROWS, norm_gemv_reference, pick_blocks
from rwkv_chat.models.qwen2 import layers

K, N = 64, 40


def inputs(rows=2, dtype=torch.float16, device="cpu"):
    g = torch.Generator().manual_seed(rows)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    return dict(x=r(rows, K), weight=r(N, K) / 8, norm="rms", norm_weight=r(K) * 0.1 + 1, residual=r(rows, K),
                bias=r(N))


@pytest.mark.parametrize("change, error, tensor", [
    (dict(x=torch.randn(2, K, dtype=torch.float64)), UnsupportedDtypeError, "x"),
    (dict(weight=torch.randn(N, K, dtype=torch.bfloat16)), UnsupportedDtypeError, "weight"),
    (dict(weight=torch.randn(N, K + 1, dtype=torch.float16)), ShapeMismatchError, "weight"),
    (dict(x=torch.randn(MAX_ROWS + 1, K, dtype=torch.float16), residual=None), ShapeMismatchError, "x"),
    (dict(residual=torch.randn(3, K, dtype=torch.float16)), ShapeMismatchError, "residual"),
    (dict(norm_weight=torch.randn(K + 2, dtype=torch.float16)), ShapeMismatchError, "norm_weight"),
    (dict(norm_weight=torch.ones(K, dtype=torch.int32)), UnsupportedDtypeError, "norm_weight"),
    (dict(bias=torch.randn(N + 1, dtype=torch.float16)), ShapeMismatchError, "bias"),
    (dict(norm="batch"), UnsupportedDtypeError, "norm"),
    (dict(eps=0.0), UnsupportedDtypeError, "eps"),
    (dict(swiglu=True), ShapeMismatchError, "bias"),
    (dict(swiglu=True, bias=None, weight=torch.randn(N + 1, K, dtype=torch.float16)), ShapeMismatchError, "weight"),
])
def test_bad_inputs_raise_typed_errors_naming_the_tensor(change, error, tensor):
    kw = inputs()
    kw.update(change)
    for fn in (ops.norm_gemv, norm_gemv_reference):
        with pytest.raises(error) as e:
            fn(**kw)
        assert e.value.tensor == tensor


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the CPU DeviceError is not reachable")
def test_a_valid_call_on_cpu_is_a_device_error():
    with pytest.raises(DeviceError) as e:
        ops.norm_gemv(**inputs())
    assert e.value.tensor == "x" and e.value.actual == "cpu"


@pytest.mark.parametrize("rows", [1, 3])
def test_the_reference_equals_the_qwen2_layer_composition_it_replaces(rows):
    kw = inputs(rows)                                   # float16: the layer rounds between its ops, the op once
    x, w, lw, res, b = kw["x"], kw["weight"], kw["norm_weight"], kw["residual"], kw["bias"]
    y, h = norm_gemv_reference(**kw)
    hn, h_want = layers.add_rmsnorm(x, lw, 1e-6, res)
    torch.testing.assert_close(h, h_want, rtol=0, atol=0)
    mm = lambda a, m: (a.float() @ m.float()).half()                    # noqa: E731
    torch.testing.assert_close(y, layers.linear(hn, w.t(), b, mm), rtol=1e-2, atol=1e-2)
    gu = torch.cat([w, w.flip(0)])                                  # a packed gate|up [2N, K]
    y2, _ = norm_gemv_reference(x, gu, norm="rms", norm_weight=lw, residual=res, swiglu=True)
    torch.testing.assert_close(y2, layers.gated_mlp(hn, gu.t(), mm), rtol=1e-2, atol=1e-2)
    assert not torch.allclose(y2, layers.gated_mlp(x, gu.t(), mm), rtol=1e-2, atol=1e-2)   # the norm matters


def test_blocks_fill_the_device_and_bound_the_accumulator():
    for rows in range(1, MAX_ROWS + 1):
        for n, k in ((2048, 1536), (1536, 8960), (17920, 1536), (7, 40), (151936, 3584)):
            bn, bk = pick_blocks(rows, n, k, 132)
            assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0 and 16 <= bk <= 512
            assert (1 << (rows - 1).bit_length()) * bn * bk <= 4096
            assert bn == 1 or -(-n // bn) >= 2 * 132


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="the Triton kernel runs on CUDA only; no CUDA device (or no triton) here")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, norm, swiglu", [(1, "rms", False), (4, "layer", False), (3, None, True)])
def test_the_kernel_equals_the_reference_on_cuda(dtype, rows, norm, swiglu):
    kw = inputs(rows, dtype, "cuda")
    kw["norm"] = norm
    kw["norm_bias"] = torch.randn(K, device="cuda").to(dtype) if norm == "layer" else None
    if swiglu:
        kw.update(bias=None, weight=torch.cat([kw["weight"], kw["weight"].flip(0)]))
    y, h = ops.norm_gemv(**kw)
    y_ref, h_ref = norm_gemv_reference(**kw)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
