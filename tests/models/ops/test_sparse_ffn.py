"""``ops.sparse_ffn`` (the channel-mix value product that skips the zero rows of h) on CPU: the Triton kernel in
Triton's interpreter (``tests/gpu/interpret_sparse_ffn.py``, a separate process), the torch reference and the
zero-row helpers against float64 / direct counts, and the typed errors of bad inputs (validated before the
device, so they run without CUDA)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_chat.models.ops import DeviceError, ShapeMismatchError, UnsupportedDtypeError, sparse_ffn

SCRIPT = Path(__file__).resolve().parents[2] / "gpu" / "interpret_sparse_ffn.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (CPU torch wheel)")
def test_the_kernel_in_triton_interpreter_sparse_equals_dense_and_the_reference():
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "all cases pass"
    assert sum("sparse == dense True" in line for line in lines) == 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_is_the_float32_product_rounded_once(dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.relu(torch.randn(3, 70, generator=g)).square().to(dtype)
    w = torch.randn(70, 33, generator=g).to(dtype)
    want = (h.double() @ w.double())
    got = sparse_ffn.ffn_value_reference(h, w)
    assert got.dtype == dtype and got.shape == (3, 33)
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)
    full = sparse_ffn.ffn_value_reference(h, w, torch.float32)
    assert full.dtype == torch.float32 and torch.allclose(full.double(), want, rtol=1e-5, atol=1e-5)


def test_zero_rows_are_the_columns_of_h_zero_in_every_row():
    h = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0, 0.0]], dtype=torch.float16)
    assert sparse_ffn.zero_rows(h).tolist() == [True, False, True, False, False]
    assert sparse_ffn.zero_row_fraction(h) == pytest.approx(2 / 5)
    assert sparse_ffn.zero_row_fraction(torch.zeros(4, 8, dtype=torch.bfloat16)) == 1.0


def test_split_covers_f_in_block_multiples():
    for F, C, sms in [(16384, 4096, 132), (8192, 2048, 132), (37, 19, 4), (300, 260, 1), (16, 8, 1000)]:
        n, per = sparse_ffn.split(F, C, sms)
        assert per % sparse_ffn.BLOCK_F == 0 and n * per >= F and (n - 1) * per < F


def h_w(dtype=torch.float16, M=2, F=24, C=8):
    return torch.randn(M, F).to(dtype), torch.randn(F, C).to(dtype)


@pytest.mark.parametrize("change, tensor, error", [
    (dict(h=torch.randn(2, 24)), "h", UnsupportedDtypeError),                         # float32 h
    (dict(w=torch.randn(24, 8)), "w", UnsupportedDtypeError),                         # float32 w
    (dict(w=torch.randn(24, 8).bfloat16()), "w", UnsupportedDtypeError),              # dtypes differ
    (dict(h=torch.ones(2, 24, dtype=torch.int64)), "h", UnsupportedDtypeError),
    (dict(h=[1.0, 2.0]), "h", UnsupportedDtypeError),                                  # not a tensor
    (dict(h=torch.randn(5, 24).half()), "h", ShapeMismatchError),                     # more than 4 rows
    (dict(h=torch.randn(0, 24).half()), "h", ShapeMismatchError),                     # no row
    (dict(h=torch.randn(24).half()), "h", ShapeMismatchError),                        # 1-D
    (dict(w=torch.randn(23, 8).half()), "w", ShapeMismatchError),                     # F differs
    (dict(w=torch.randn(8, 24).half().t()), "w", ShapeMismatchError),                 # output-major view
    (dict(out_dtype=torch.bfloat16), "out_dtype", UnsupportedDtypeError),
])
def test_bad_inputs_raise_typed_errors_naming_the_tensor(change, tensor, error):
    h, w = h_w()
    kw = {"h": h, "w": w, **change}
    with pytest.raises(error) as e:
        sparse_ffn.ffn_value(**kw)
    assert e.value.tensor == tensor and e.value.expected is not None and e.value.actual is not None


def test_a_valid_call_on_cpu_raises_device_error():
    h, w = h_w(torch.bfloat16, M=4)
    with pytest.raises(DeviceError) as e:
        sparse_ffn.ffn_value(h, w, skip_zeros=False, out_dtype=torch.float32)
    assert e.value.tensor == "h" and e.value.expected == "cuda"


def test_reference_rejects_shapes_that_do_not_chain():
    with pytest.raises(ShapeMismatchError):
        sparse_ffn.ffn_value_reference(torch.randn(2, 24).half(), torch.randn(8, 24).half())


def test_the_fused_backend_names_its_value_product_modes_and_rejects_others():
    from rwkv_chat.models.backends import fused_cuda
    from rwkv_chat.models.errors import StrategyError

    assert fused_cuda.FFN_MODES == ("sparse", "dense", "gemv")
    with pytest.raises(StrategyError, match="ffn"):
        fused_cuda.FusedCuda(None, None, ffn="rows")
