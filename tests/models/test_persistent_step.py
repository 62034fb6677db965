"""The persistent decode step's host side (``models/backends/persistent_step.py``): its pointer table follows the
kernel's slot order (``csrc/fused/fused_launchers.h``), and it says why it does not serve a model. The kernel itself
runs on the GPU: ``tests/gpu/verify_fused.py`` (against the layer launches and the sequence path)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from rwkv_chat.models.backends import persistent_step as ps

HEADER = ps.__file__.rsplit("models", 1)[0] + "csrc/fused/fused_launchers.h"
#: the kernel's slot names (V7StepSlot) for each entry of SLOTS
ENUM_OF = {"att.receptance.weight": "Wr", "att.key.weight": "Wk", "att.value.weight": "Wv", "att.w1": "W1",
           "att.a1": "A1", "att.g1": "G1", "att.v1": "V1", "att.w2": "W2", "att.a2": "A2", "att.g2": "G2",
           "att.v2": "V2", "att.output.weight": "Wo", "ffn.key.weight": "Fk", "ffn.value.weight": "Fv",
           "ln1.weight": "Ln1W", "ln1.bias": "Ln1B", "ln2.weight": "Ln2W", "ln2.bias": "Ln2B", "mix6": "Mix6",
           "mixk": "MixK", "att.w0": "W0", "att.a0": "A0", "att.k_k": "Kk", "att.k_a": "Ka", "att.v0": "V0",
           "att.r_k": "Rk", "att.ln_x.weight": "LnxW", "att.ln_x.bias": "LnxB"}


def test_the_table_follows_the_kernels_slot_order_and_limits():
    src = open(HEADER).read()
    body = re.search(r"enum V7StepSlot : int \{([^}]*)\}", src).group(1)
    names = [n.strip() for n in body.split(",") if n.strip()]
    assert names[-1] == "kStepSlots"
    assert names[:-1] == ["kStep" + ENUM_OF[s] for s in ps.SLOTS]
    assert int(re.search(r"kStepMaxLayers = (\d+);", src).group(1)) == ps.MAX_LAYERS
    assert int(re.search(r"kStepMaxLow = (\d+);", src).group(1)) == ps.MAX_LOW


def _model(C=128, H=2, N=64, L=2, dims=(16, 16, 32, 8), dtype=torch.float16):
    """A stand-in with the shapes the backend holds (matrices [K, N] with an output-major transpose; its own
    low-rank matrices output-major)."""
    layers, own = [], []
    for i in range(L):
        p = {n: torch.zeros(C, C, dtype=dtype).t() for n in ps.SLOTS[:3] + ("att.output.weight",)}
        p["ffn.key.weight"] = torch.zeros(4 * C, C, dtype=dtype).t()
        p["ffn.value.weight"] = torch.zeros(C, 4 * C, dtype=dtype).t()
        for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.a0", "att.k_k", "att.k_a", "att.v0",
                  "att.r_k", "att.ln_x.weight", "att.ln_x.bias"):
            p[n] = torch.zeros(C, dtype=dtype)
        p["att.w0"] = torch.zeros(C)
        f = {"mix6": torch.zeros(6, C, dtype=dtype), "mixk": torch.zeros(1, C, dtype=dtype)}
        for m, d in zip("wagv", dims):
            if m == "v" and i == 0:
                continue
            f[f"att.{m}1"] = torch.zeros(d, C, dtype=dtype)
            f[f"att.{m}2"] = torch.zeros(C, d, dtype=dtype)
        layers.append(p)
        own.append(f)
    spec = SimpleNamespace(n_embd=C, n_head=H, head_size=N)
    return SimpleNamespace(spec=spec, n_layer=L, layers=layers, emb=torch.zeros(10, C, dtype=dtype)), own


def test_it_says_why_it_does_not_serve(monkeypatch):
    model, own = _model()
    if ps._op() is None:                       # a CPU build: the kernel is not there
        assert "built without v7_step" in ps._why_not(model, own, "gemv")
    monkeypatch.setattr(ps, "_op", lambda: object())
    assert "'sparse'" in ps._why_not(model, own, "sparse")
    assert "one CUDA device" in ps._why_not(model, own, "gemv")          # every tensor here is on the CPU
    m32, own32 = _model(C=64, H=2, N=32)
    assert "head size 32" in ps._why_not(m32, own32, "gemv")
    deep, own_deep = _model(L=ps.MAX_LAYERS + 1)
    assert f"1..{ps.MAX_LAYERS} layers" in ps._why_not(deep, own_deep, "gemv")


@pytest.mark.parametrize("L", [1, 3])
def test_low_rank_widths_come_from_the_first_two_layers(L):
    _, own = _model(L=L, dims=(16, 24, 32, 40))
    assert ps._dims(own[:2]) == [16, 24, 32, 40 if L > 1 else 8]
