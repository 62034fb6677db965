"""``fused_gated_mlp`` at 1..4 rows of SwiGLU times the compiled grouped GEMV (``kernels.dispatch.gated_gemv``) against
its Triton kernel at the first call of a (device, dtype, M bucket, I, H), keeps the faster for the process, and never
asks the compiled GEMV for other activations, more rows, or while it is not loaded. Checked on the CPU with both
kernels replaced by torch forms that record their calls (the kernels themselves: ``tests/gpu/verify_ops.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkv_chat.models.kernels import dispatch
from rwkv_chat.models.ops import gated_mlp
from tests.models.ops.reference import ref_gated_mlp


@pytest.fixture
def calls(monkeypatch):
    """Both kernels as torch forms; returns the log of (kernel, rows) calls and the timing decisions asked for."""
    log = {"compiled": [], "triton": [], "timed": []}
    monkeypatch.setattr(gated_mlp, "_COMPILED_FASTER", {})
    monkeypatch.setattr(gated_mlp._checks, "check_cuda", lambda tensors: None)
    monkeypatch.setattr(gated_mlp._triton, "kernels", lambda module, op: object())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)

    def compiled(x, gate, up):
        log["compiled"].append(x.shape[0])
        if log.get("unloaded"):
            return None
        return (F.silu(x.float() @ gate.float().t()) * (x.float() @ up.float().t())).to(x.dtype)

    def launch(kern, a, wg, wu, out, code):
        log["triton"].append(a.shape[0])
        act = {0: F.silu, 1: F.gelu, 2: lambda t: F.gelu(t, approximate="tanh")}[code]
        out.copy_(act(a.float() @ wg.float().t()) * (a.float() @ wu.float().t()))

    monkeypatch.setattr(dispatch, "gated_gemv", compiled)
    monkeypatch.setattr(gated_mlp, "_launch", launch)
    return log


def _inputs(m, h=64, i=96, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, h, generator=g).to(dtype), (torch.randn(i, h, generator=g) * h ** -0.5).to(dtype),
            (torch.randn(i, h, generator=g) * h ** -0.5).to(dtype))


@pytest.mark.parametrize("compiled_faster", [True, False])
def test_the_first_call_of_a_shape_times_both_and_later_calls_take_the_faster(monkeypatch, calls, compiled_faster):
    monkeypatch.setattr(gated_mlp, "_compiled_faster",
                        lambda kern, a, wg, wu, y: calls["timed"].append(a.shape[0]) or compiled_faster)
    x, g, u = _inputs(1)
    for _ in range(3):
        y = gated_mlp.fused_gated_mlp(x, g, u)
        torch.testing.assert_close(y.float(), ref_gated_mlp(x, g, u).float(), rtol=1.6e-2, atol=1.6e-2)
    assert calls["timed"] == [1]                                # one decision per key
    if compiled_faster:
        assert calls["compiled"] == [1, 1, 1] and calls["triton"] == []
    else:                                                       # asked once (to time it), then never again
        assert calls["compiled"] == [1] and calls["triton"] == [1, 1, 1]
    x3, _, _ = _inputs(3)                                       # 3 rows: another M bucket (4), another decision
    gated_mlp.fused_gated_mlp(x3, g, u)
    assert calls["timed"] == [1, 3]


@pytest.mark.parametrize("m, activation", [(5, "silu"), (16, "silu"), (1, "gelu"), (2, "gelu_tanh")])
def test_other_activations_and_more_than_four_rows_stay_on_the_triton_kernel(calls, m, activation):
    x, g, u = _inputs(m)
    y = gated_mlp.fused_gated_mlp(x, g, u, activation)
    torch.testing.assert_close(y.float(), ref_gated_mlp(x, g, u, activation).float(), rtol=1.6e-2, atol=1.6e-2)
    assert calls["compiled"] == [] and calls["triton"] == [m]


def test_without_the_compiled_kernels_nothing_is_decided(monkeypatch, calls):
    """Not loaded yet (a build still running): the Triton kernel serves and the shape is timed once they load."""
    monkeypatch.setattr(gated_mlp, "_compiled_faster", lambda *a: calls["timed"].append(1) or True)
    calls["unloaded"] = True
    x, g, u = _inputs(2)
    gated_mlp.fused_gated_mlp(x, g, u)
    assert calls["triton"] == [2] and calls["timed"] == [] and gated_mlp._COMPILED_FASTER == {}
    calls["unloaded"] = False
    gated_mlp.fused_gated_mlp(x, g, u)
    assert calls["timed"] == [1] and calls["triton"] == [2]
