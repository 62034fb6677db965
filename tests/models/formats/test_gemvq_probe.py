"""The compiled int4 / fp8 GEMVs serve a device only after agreeing with the torch products there
(``dispatch.gemvq_sound``): the probe's logic on the CPU with the compiled ops replaced by stand-ins — a correct
one (the torch products written into the output), a wrong one, one that raises, one that ignores relu², one
that skips the norm."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.formats import f8, i4
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
