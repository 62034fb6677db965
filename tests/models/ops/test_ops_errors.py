"""The typed errors of ``rwkv_chat.models.ops``: every op raises the right one, with ``tensor``, ``expected`` and
``actual``, for each kind of bad input. Shapes and dtypes are validated before the device, so all of this runs on
CPU; a valid call on CPU tensors raises DeviceError."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rwkv_chat.models import ops
from rwkv_chat.models.ops import (DeviceError, NumericalOverflowError, ShapeMismatchError, UnsupportedDtypeError,
                                  _checks, _triton)

B, T, H, HKV, D = 2, 3, 4, 2, 8


def cos_sin(shape=(T, D), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)


def valid(dtype=torch.float16):
    """A valid set of inputs for every op (CPU tensors)."""
    cos, sin = cos_sin()
    return {
        "fused": dict(x=torch.randn(B, T, H * D, dtype=dtype), weight=torch.randn(H * D, dtype=dtype), cos=cos, sin=sin),
        "rmsnorm": dict(x=torch.randn(B, T, H * D, dtype=dtype), weight=torch.randn(H * D, dtype=dtype),
                        residual=torch.randn(B, T, H * D, dtype=dtype)),
        "rope": dict(q=torch.randn(B, T, H, D, dtype=dtype), k=torch.randn(B, T, HKV, D, dtype=dtype), cos=cos, sin=sin),
        "qk": dict(q=torch.randn(B, T, H, D, dtype=dtype), k=torch.randn(B, T, HKV, D, dtype=dtype),
                   q_weight=torch.randn(D, dtype=dtype), k_weight=torch.randn(D, dtype=dtype), cos=cos, sin=sin),
        "mlp": dict(x=torch.randn(5, 16, dtype=dtype), gate_weight=torch.randn(24, 16, dtype=dtype),
                    up_weight=torch.randn(24, 16, dtype=dtype)),
        "silu_mul": dict(gate_up=torch.randn(5, 48, dtype=dtype)),
    }


OPS = {"fused": ops.fused_rmsnorm_rope, "rmsnorm": ops.rmsnorm, "rope": ops.rope, "qk": ops.qk_norm_rope,
       "mlp": ops.fused_gated_mlp, "silu_mul": ops.silu_mul}


def call(op, **changes):
    kw = valid()[op]
    kw.update(changes)
    return OPS[op](**kw)


@pytest.mark.parametrize("op", list(OPS))
def test_a_valid_call_on_cpu_raises_device_error_naming_the_first_tensor(op):
    with pytest.raises(DeviceError) as e:
        call(op)
    first = next(iter(valid()[op]))
    assert (e.value.tensor, e.value.expected, e.value.actual) == (first, "cuda", "cpu")
    assert "CUDA" in str(e.value) and isinstance(e.value, RuntimeError)


@pytest.mark.parametrize("op, name", [(op, name) for op, kw in valid().items() for name in kw])
@pytest.mark.parametrize("bad", [torch.int32, torch.float64])
def test_int_and_fp64_inputs_raise_unsupported_dtype(op, name, bad):
    t = valid()[op][name]
    with pytest.raises(UnsupportedDtypeError) as e:
        call(op, **{name: t.to(bad)})
    assert e.value.tensor == name
    assert e.value.actual == str(bad).replace("torch.", "")
    assert "float16" in e.value.expected and "bfloat16" in e.value.expected
    assert isinstance(e.value, TypeError)


@pytest.mark.parametrize("op, name", [("fused", "x"), ("rope", "q"), ("mlp", "gate_weight"), ("silu_mul", "gate_up")])
def test_a_non_tensor_raises_unsupported_dtype(op, name):
    with pytest.raises(UnsupportedDtypeError) as e:
        call(op, **{name: [1.0, 2.0]})
    assert (e.value.tensor, e.value.expected, e.value.actual) == (name, "torch.Tensor", "list")


def test_the_gemm_takes_half_dtypes_only_and_one_dtype_for_all():
    kw = valid(torch.float32)["mlp"]
    with pytest.raises(UnsupportedDtypeError) as e:
        ops.fused_gated_mlp(**kw)
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("x", "float16 | bfloat16", "float32")
    with pytest.raises(UnsupportedDtypeError) as e:
        call("mlp", up_weight=valid()["mlp"]["up_weight"].bfloat16())
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("up_weight", "float16", "bfloat16")
    with pytest.raises(UnsupportedDtypeError) as e:
        call("rope", k=valid()["rope"]["k"].bfloat16())
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("k", "float16", "bfloat16")
    with pytest.raises(UnsupportedDtypeError) as e:
        call("rmsnorm", residual=valid()["rmsnorm"]["residual"].float())
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("residual", "float16", "float32")


SHAPES = [
    # op, changed tensor, its bad value, the tensor named, expected, actual
    ("fused", "weight", torch.randn(H * D + 1), "weight", (H * D,), (H * D + 1,)),
    ("fused", "cos", torch.randn(T + 1, D), "cos", (T, D), (T + 1, D)),
    ("fused", "cos", torch.randn(B + 1, T, D), "cos", (B, T, D), (B + 1, T, D)),
    ("fused", "sin", torch.randn(T, D + 2), "sin", (T, D), (T, D + 2)),
    ("fused", "x", torch.randn(B, T, H * D + 4), "weight", (H * D + 4,), (H * D,)),
    ("rmsnorm", "weight", torch.randn(7), "weight", (H * D,), (7,)),
    ("rmsnorm", "residual", torch.randn(B, T + 1, H * D).half(), "residual", (B, T, H * D), (B, T + 1, H * D)),
    ("rope", "k", torch.randn(B, T, HKV, D + 2).half(), "k", (B, T, None, D), (B, T, HKV, D + 2)),
    ("rope", "k", torch.randn(B, T + 1, HKV, D).half(), "k", (B, T, None, D), (B, T + 1, HKV, D)),
    ("rope", "cos", torch.randn(T, D // 2), "cos", (T, D), (T, D // 2)),
    ("rope", "q", torch.randn(B, T, H * D).half(), "k", (B, None, D * H), (B, T, HKV, D)),
    ("qk", "q_weight", torch.randn(D + 1).half(), "q_weight", (D,), (D + 1,)),
    ("qk", "k_weight", torch.randn(1, D).half(), "k_weight", (D,), (1, D)),
    ("mlp", "gate_weight", torch.randn(24, 17).half(), "gate_weight", (None, 16), (24, 17)),
    ("mlp", "up_weight", torch.randn(25, 16).half(), "up_weight", (24, 16), (25, 16)),
    ("mlp", "x", torch.randn(5, 15).half(), "gate_weight", (None, 15), (24, 16)),
]


@pytest.mark.parametrize("op, name, value, tensor, expected, actual", SHAPES)
def test_shape_mismatches_name_the_tensor_with_expected_and_actual(op, name, value, tensor, expected, actual):
    with pytest.raises(ShapeMismatchError) as e:
        call(op, **{name: value})
    assert (e.value.tensor, e.value.expected, e.value.actual) == (tensor, expected, actual)
    assert isinstance(e.value, ValueError) and tensor in str(e.value)


def test_head_dims_and_head_counts():
    with pytest.raises(ShapeMismatchError) as e:                        # odd head_dim
        call("rope", q=torch.randn(B, T, H, 7).half(), k=torch.randn(B, T, HKV, 7).half(), cos=torch.randn(T, 7),
             sin=torch.randn(T, 7))
    assert e.value.tensor == "cos" and e.value.actual == (T, 7)
    with pytest.raises(ShapeMismatchError) as e:                        # num_heads disagrees with the hidden size
        call("fused", num_heads=H + 1)
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("x", (B, T, (H + 1) * D), (B, T, H * D))
    with pytest.raises(ShapeMismatchError) as e:                        # hidden not a multiple of head_dim
        call("fused", x=torch.randn(B, T, H * D + 3).half(), weight=torch.randn(H * D + 3).half())
    assert e.value.tensor == "x" and e.value.actual == (B, T, H * D + 3)
    with pytest.raises(ShapeMismatchError) as e:
        call("silu_mul", gate_up=torch.randn(5, 47).half())
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("gate_up", "(..., 2I)", (5, 47))
    with pytest.raises(ShapeMismatchError) as e:
        call("fused", x=torch.tensor(1.0).half())
    assert e.value.tensor == "x" and e.value.actual == ()


def test_the_head_layout_and_broadcast_cos_pass_validation():
    """[B, T, H, D] inputs and [1, T, D] / [B, T, D] tables are valid: they reach the device check."""
    kw = valid()["fused"]
    for x, cos in ((kw["x"].view(B, T, H, D), kw["cos"]), (kw["x"], kw["cos"][None]),
                   (kw["x"], torch.randn(B, T, D))):
        with pytest.raises(DeviceError):
            ops.fused_rmsnorm_rope(x, kw["weight"], cos, cos.clone(), num_heads=H)
    with pytest.raises(DeviceError):
        ops.rmsnorm(kw["x"], kw["weight"])                              # no residual


def test_modules_validate_at_construction_and_raise_device_error_on_cpu():
    with pytest.raises(ShapeMismatchError) as e:
        ops.FusedRMSNormRoPE(30, 4)
    assert (e.value.tensor, e.value.actual) == ("head_dim", 4)
    with pytest.raises(ShapeMismatchError):
        ops.FusedRMSNormRoPE(21, 7)
    with pytest.raises(ValueError, match="activation"):
        ops.FusedGatedMLP(16, 24, "relu")
    with pytest.raises(ValueError, match="activation"):
        call("mlp", activation="swish")
    norm = ops.FusedRMSNormRoPE(H * D, D)
    assert norm.weight.shape == (H * D,) and norm.num_heads == H
    cos, sin = cos_sin()
    with pytest.raises(DeviceError):
        norm(torch.randn(B, T, H * D), cos, sin)
    mlp = ops.FusedGatedMLP(16, 24, dtype=torch.float16)
    assert set(mlp.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}
    assert mlp.up_proj.weight.shape == (24, 16) and mlp.down_proj.weight.shape == (16, 24)
    with pytest.raises(DeviceError) as e:
        mlp(torch.randn(3, 16, dtype=torch.float16))
    assert e.value.tensor == "x"


def test_check_finite_raises_numerical_overflow_with_the_count():
    t = torch.tensor([1.0, float("inf"), float("nan"), 2.0]).half()
    with pytest.raises(NumericalOverflowError) as e:
        _checks.check_finite(t, "output", "float16")
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("output", "finite", "2 non-finite of 4")
    assert isinstance(e.value, ArithmeticError)
    _checks.check_finite(torch.ones(3), "output")


def test_triton_unavailable_is_a_device_error_saying_what_works():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-CUDA message is not reachable (the no-Triton one is tested below)")
    assert not _triton.available()
    with pytest.raises(DeviceError) as e:
        _triton.kernels("rwkv_chat.models.ops._rmsnorm_rope_kernels", op="fused_rmsnorm_rope")
    assert "fused_rmsnorm_rope" in str(e.value) and "plain torch" in str(e.value)
    assert e.value.expected == "CUDA + triton"


def test_every_op_module_imports_and_validates_without_triton():
    """With triton absent (as under torch's CPU wheels), the package imports, validates, and reports DeviceError."""
    code = """
import sys; sys.modules["triton"] = None; sys.modules["triton.language"] = None
import torch
from rwkv_chat.models import ops
from rwkv_chat.models.ops import rmsnorm_rope, gated_mlp, _checks, _triton
assert not _triton.available()
try:
    _triton.require("rope")
except ops.DeviceError as e:
    print("require:", e.actual)
try:
    ops.fused_gated_mlp(torch.ones(2, 4, dtype=torch.int64), torch.ones(3, 4), torch.ones(3, 4))
except ops.UnsupportedDtypeError as e:
    print("dtype:", e.tensor)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == "dtype: x"
    assert lines[0].startswith("require: ") and ("CUDA" in lines[0] or "Triton" in lines[0])


def test_rope_out_pairs_are_validated():
    kw = valid()["rope"]
    q, k = kw["q"], kw["k"]
    with pytest.raises(ShapeMismatchError) as e:
        call("rope", out=torch.empty_like(q))
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("out", "(q_out, k_out)", "Tensor")
    with pytest.raises(ShapeMismatchError) as e:
        call("rope", out=(torch.empty_like(q), torch.empty(B, T, HKV + 1, D, dtype=k.dtype)))
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("k_out", (B, T, HKV, D), (B, T, HKV + 1, D))
    with pytest.raises(UnsupportedDtypeError) as e:
        call("qk", out=(torch.empty_like(q, dtype=torch.float32), torch.empty_like(k)))
    assert (e.value.tensor, e.value.expected, e.value.actual) == ("q_out", "float16", "float32")
    strided = torch.empty(B, T, HKV, 2 * D, dtype=k.dtype)[..., ::2]
    with pytest.raises(ShapeMismatchError) as e:
        call("rope", out=(torch.empty_like(q), strided))
    assert e.value.tensor == "k_out" and e.value.actual == tuple(strided.stride())
    cache = torch.empty(B, HKV, 16, D, dtype=k.dtype)                   # a KV cache view is a valid k_out
    with pytest.raises(DeviceError):
        call("rope", out=(torch.empty_like(q), cache.transpose(1, 2)[:, 4:4 + T]))
