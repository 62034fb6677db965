"""The compiled int4 / fp8 / uint8 GEMVs serve a device only after agreeing with the torch products there
(``dispatch.gemvq_sound``, ``gemvq_u8_sound``): the probe's logic on the CPU with the compiled ops replaced by
stand-ins — a correct one (the torch products written into the output), a wrong one, one that raises, one that
ignores relu², one that skips the norm, one that drops the part of x staged in later tiles."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.formats import f8, i4, i8
from rwkv_chat.models.kernels import dispatch
from rwkv_chat.models.ops.gptq import norm_rows


def _ops(wrong: bool = False, broken: bool = False, no_act: bool = False, no_norm: bool = False):
    def i4_op(x, storage, qzeros, scales, group, y):
        if broken:
            raise RuntimeError("no kernel image is available for execution on the device")
        q = i4.Int4Weight(storage.t(), qzeros, scales, None, group, output_major=True)
        y.copy_(i4.mm4_torch(x, q) * (1.5 if wrong else 1.0))

    def i4_multi(xs, storages, qzeros, scales, groups, acts, ys):
        for x, st, z, sc, g, a, y in zip(xs, storages, qzeros, scales, groups, acts, ys):
            i4_op(torch.relu(x).square() if a == 3 and not no_act else x, st, z, sc, g, y)

    def i4_norm(x, storage, qzeros, scales, group, w, b, eps, rms, y):
        i4_op(x if no_norm else norm_rows(x, w, b, eps, rms), storage, qzeros, scales, group, y)

    def f8_op(x, w8, scale, y):
        y.copy_(f8.mmf8_torch(x, f8.Float8Weight(w8.view(torch.float8_e4m3fn), scale)))

    def f8_multi(xs, w8s, scales, acts, ys):
        for x, w8, sc, a, y in zip(xs, w8s, scales, acts, ys):
            f8_op(torch.relu(x).square() if a == 3 else x, w8, sc, y)

    table = {"gemvq_i4": i4_op, "gemvq_i4_multi": i4_multi, "gemvq_i4_norm": i4_norm, "gemvq_f8": f8_op,
             "gemvq_f8_multi": f8_multi}
    return lambda dev, family: table[family]


@pytest.fixture()
def cpu_held_output_major(monkeypatch):
    """Weights held output-major on the CPU too (as CUDA holds them), the probe's record emptied after the test."""
    real_to = i4.Int4Weight.to
    monkeypatch.setattr(i4.Int4Weight, "to", lambda self, device=None, **kw: real_to(self, device, output_major=True))
    yield
    dispatch.GEMVQ_PROBES.clear()
    dispatch.GEMVQ_NORM_PROBES.clear()


@pytest.mark.parametrize("case, sound", [({}, True), ({"wrong": True}, False), ({"broken": True}, False),
                                         ({"no_act": True}, False)])
def test_the_probe_admits_only_kernels_that_agree_with_torch(monkeypatch, cpu_held_output_major, case, sound):
    monkeypatch.setattr(dispatch, "_op", _ops(**case))
    dev = torch.device("cpu")
    assert dispatch.gemvq_sound(dev) is sound
    why = dispatch.GEMVQ_PROBES[dev]
    assert (why is None) is sound
    if case.get("wrong"):
        assert "gemvq_i4 differs from the torch product" in why
    if case.get("no_act"):
        assert "gemvq_i4_multi relu² differs from the torch product" in why
    if case.get("broken"):
        assert why.startswith("RuntimeError: no kernel image")
    monkeypatch.setattr(dispatch, "_op", None)          # decided once per device: no second probe
    assert dispatch.gemvq_sound(dev) is sound


@pytest.mark.parametrize("no_norm", [False, True])
def test_the_norm_probe_is_its_own(monkeypatch, cpu_held_output_major, no_norm):
    """A GEMV that skips the norm keeps norm_gemv_i4 off, and only it: the other compiled GEMVs still serve."""
    monkeypatch.setattr(dispatch, "_op", _ops(no_norm=no_norm))
    dev = torch.device("cpu")
    assert dispatch.gemvq_norm_sound(dev) is not no_norm
    assert dispatch.gemvq_sound(dev)
    why = dispatch.GEMVQ_NORM_PROBES[dev]
    assert (why is None) is not no_norm
    if no_norm:
        assert "gemvq_i4_norm (LayerNorm) differs from the torch product" in why


def _u8_ops(wrong: bool = False, no_act: bool = False, tiles: bool = True):
    """A stand-in for ``gemvq_u8_multi``: the torch product (times 1.5 with ``wrong``, relu² ignored with
    ``no_act``, x past its first 1024 columns ignored where a row is staged in tiles, without ``tiles``)."""
    def u8_multi(xs, ws, mxs, rxs, mys, rys, acts, ys):
        for x, w, mx, rx, my, ry, a, y in zip(xs, ws, mxs, rxs, mys, rys, acts, ys):
            q = i8.Int8Weight(w.t(), mx, rx, my, ry, output_major=True)
            x = torch.relu(x).square() if a == 3 and not no_act else x
            if not tiles and x.numel() * x.element_size() > 64 * 1024:
                x = torch.cat([x[:, :1024], torch.zeros_like(x[:, 1024:])], 1)
            y.copy_(i8.mm8_torch(x, q) * (1.5 if wrong else 1.0))
    return lambda dev, family: {"gemvq_u8_multi": u8_multi}[family]


@pytest.mark.parametrize("case, why", [({}, None), ({"wrong": True}, "gemvq_u8_multi differs"),
                                       ({"no_act": True}, "gemvq_u8_multi relu² differs"),
                                       ({"tiles": False}, "gemvq_u8 (K in tiles) differs")])
def test_the_u8_probe_admits_only_a_kernel_that_agrees_with_torch(monkeypatch, case, why):
    """The i8 GEMV has its own probe: every case it runs must agree with ``i8.mm8_torch``; once decided, a device is
    not probed again, and the int4 / fp8 probe is not decided by it."""
    monkeypatch.setattr(dispatch, "_op", _u8_ops(**case))
    dev = torch.device("cpu")
    try:
        assert dispatch.gemvq_u8_sound(dev) is (why is None)
        got = dispatch.GEMVQ_U8_PROBES[dev]
        assert got is None if why is None else got.startswith(why), got
        monkeypatch.setattr(dispatch, "_op", None)
        assert dispatch.gemvq_u8_sound(dev) is (why is None)
        assert dev not in dispatch.GEMVQ_PROBES
    finally:
        dispatch.GEMVQ_U8_PROBES.clear()


def test_the_u8_gemv_reads_half_activations_only():
    """float32 i8 products stay on csrc/mm8's GEMV (the uint8 form's row sums cancel beyond float32's tolerance where
    x is all positive); fp16 / bf16 ones are the uint8 GEMV's where the weight's layout and scales fit."""
    w = torch.randn(64, 24) * 0.1
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = i8.quantize_i8(w, dtype, output_major=True)
        assert dispatch.gemvq_u8_ok(q, torch.zeros(1, 64, dtype=dtype)) is (dtype != torch.float32)
    q = i8.quantize_i8(w, torch.float16, output_major=False)
    assert not dispatch.gemvq_u8_ok(q, torch.zeros(1, 64, dtype=torch.float16))      # input-major: the CPU layout
    q = i8.quantize_i8(w, torch.float16, output_major=True)
    assert not dispatch.gemvq_u8_ok(q, torch.zeros(1, 64, dtype=torch.bfloat16))     # scales in another dtype


@pytest.mark.parametrize("dtype, probed", [(torch.float16, True), (torch.bfloat16, True), (torch.float32, False)])
def test_the_load_probes_the_u8_gemv_for_half_i8_stages_only(monkeypatch, dtype, probed):
    """``probe_weight_kernels`` runs the uint8 GEMV's probe where a CUDA stage is fp16 / bf16 i8 (float32 i8 stays on
    the mm8 GEMV, so nothing is probed or reported for it), and the uint8 tensor-core GEMM's for fp16 only."""
    from types import SimpleNamespace

    from rwkv_chat.models.strategy import Stage

    asked = []
    monkeypatch.setattr(dispatch, "available", lambda dev, family: True)
    monkeypatch.setattr(dispatch, "_triton_ok", lambda: False)
    monkeypatch.setattr(dispatch, "gemvq_u8_sound", lambda dev: asked.append(dev) or True)
    gemm_asked = []
    monkeypatch.setattr(dispatch, "gemmq_u8_sound", lambda dev: gemm_asked.append(dev) or False)
    model = SimpleNamespace(plan=SimpleNamespace(stages=[Stage("cuda", dtype, "i8")]),
                            devices=[torch.device("cuda", 0)], kernels={})
    dispatch.probe_weight_kernels(model)
    assert (asked == [torch.device("cuda", 0)]) is probed
    assert (model.kernels.get("cuda", {}).get("gemvq u8 probe") == "ok") is probed
    fp16 = dtype == torch.float16
    assert (gemm_asked == [torch.device("cuda", 0)]) is fp16
    assert (model.kernels.get("cuda", {}).get("gemmq u8 probe") == "not probed") is fp16     # refused: reported
