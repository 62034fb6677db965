"""``fused_ln_qkv_gptq`` for 1..4 rows hands weights held output-major to the compiled LayerNorm/RMSNorm + int4 GEMV
(``kernels.dispatch.norm_gemv_i4``) and regroups its [rows, N] result as the op returns it ([3, B, S, W], or q, k, v
for grouped-query widths). Checked on the CPU with that GEMV replaced by its torch form (the kernel itself:
``tests/gpu/verify_kernels.py --family gemvq``)."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.formats import i4
from rwkv_chat.models.kernels import dispatch
from rwkv_chat.models.ops import gptq


def _torch_norm_gemv(calls):
    def norm_gemv_i4(x, qweight, qzeros, scales, group, w, b, eps, rms):
        calls.append(tuple(x.shape))
        q = i4.Int4Weight(qweight, qzeros, scales, None, group, output_major=True)
        return i4.mm4_torch(gptq.norm_rows(x, w, b, eps, rms), q)
    return norm_gemv_i4


@pytest.mark.parametrize("B, S", [(1, 1), (1, 3), (2, 2)])
@pytest.mark.parametrize("widths", [None, (64, 32, 32)])
@pytest.mark.parametrize("rms", [False, True])
def test_rows_are_regrouped_as_the_reference_returns_them(monkeypatch, B, S, widths, rms):
    calls = []
    monkeypatch.setattr(gptq, "check_cuda", lambda tensors: None)
    monkeypatch.setattr(dispatch, "norm_gemv_i4", _torch_norm_gemv(calls))
    g = torch.Generator().manual_seed(5)
    H, N = 128, sum(widths) if widths else 3 * 48
    q = i4.quantize_i4(torch.randn(H, N, generator=g) * 0.1, 64).with_layout(True)
    x = torch.randn(B, S, H, generator=g).half()
    lw, lb = (torch.rand(H, generator=g) + 0.5).half(), torch.randn(H, generator=g).half()
    args = (x, q.qweight, q.qzeros, q.scales, lw, None if rms else lb, q.group_size, 1e-5)
    got = gptq.fused_ln_qkv_gptq(*args, widths=widths, rms=rms)
    want = gptq.fused_ln_qkv_gptq_reference(*args, widths=widths, rms=rms)
    assert calls == [(B * S, H)]
    for a, b in zip(got if widths else [got], want if widths else [want]):
        assert a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-3, atol=2e-3)


def test_g_idx_and_block_sweeps_keep_the_triton_form(monkeypatch):
    """Weights with g_idx (act order) and explicit block shapes (sweeps) never reach the compiled GEMV (the GPTQ
    layout, [K/8, N] contiguous, is refused by ``norm_gemv_i4`` itself: ``qweight.t()`` is not contiguous)."""
    calls = []
    monkeypatch.setattr(gptq, "check_cuda", lambda tensors: None)
    monkeypatch.setattr(dispatch, "norm_gemv_i4", _torch_norm_gemv(calls))
    monkeypatch.setattr(gptq, "triton_kernels", lambda *a: (_ for _ in ()).throw(RuntimeError("triton form")))
    g = torch.Generator().manual_seed(6)
    H = 128
    q = i4.quantize_i4(torch.randn(H, 96, generator=g) * 0.1, 64).with_layout(True)
    x = torch.randn(1, 1, H, generator=g).half()
    lw = (torch.rand(H, generator=g) + 0.5).half()
    gi = (torch.arange(H, dtype=torch.int32) // 64)
    with pytest.raises(RuntimeError, match="triton form"):
        gptq.fused_ln_qkv_gptq(x, q.qweight, q.qzeros, q.scales, lw, None, 64, 1e-5, g_idx=gi)
    with pytest.raises(RuntimeError, match="triton form"):
        gptq.fused_ln_qkv_gptq(x, q.qweight, q.qzeros, q.scales, lw, None, 64, 1e-5, blocks=(16, 128))
    assert calls == []
