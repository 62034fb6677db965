"""Chunked WKV (prefill) against the sequential recurrences, and the model's prefill against the
reference package."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkv_chat.models import RWKV
from rwkv_chat.models.rwkv import chunked as prefill, wkv

RUNNER = Path(__file__).with_name("reference_runner.py")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _seq7_f64(r, w, k, v, a, b, s):
    """The RWKV-7 recurrence in float64 (``wkv7_torch``'s formula)."""
    r, w, k, v, a, b, s = (x.double() for x in (r, w, k, v, a, b, s))
    y = torch.empty_like(r)
    for t in range(r.shape[1]):
        s = (s * w[:, t].unsqueeze(-2) + (s @ a[:, t].unsqueeze(-1)) @ b[:, t].unsqueeze(-2)
             + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2))
        y[:, t] = (s @ r[:, t].unsqueeze(-1)).squeeze(-1)
    return y, s


def _inputs7(B, T, H, N, gen):
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1)
    gate = torch.rand(B, T, H, N, generator=gen)
    # RWKV-7's decay range: exp(-e^{-1/2} sigmoid(.)), here over the whole range of the sigmoid
    w = torch.exp(-0.606531 * torch.sigmoid(4 * torch.randn(B, T, H, N, generator=gen)))
    s = torch.randn(B, H, N, N, generator=gen)
    return r, w, k, v, -kk, kk * gate, s


@pytest.mark.parametrize("T,chunk", [(1, 16), (5, 16), (64, 16), (100, 32), (130, 64)])
def test_wkv7_chunked_matches_sequential(T, chunk):
    gen = torch.Generator().manual_seed(T * 7 + chunk)
    args = _inputs7(2, T, 3, 64, gen)
    y_ref, s_ref = _seq7_f64(*args)
    y_seq, s_seq = wkv.wkv7_torch(*args)
    y, s = prefill.wkv7_chunked(*args, chunk=chunk)
    assert y.dtype == torch.float32 and y.shape == args[0].shape
    # the chunked form is as close to float64 as the sequential float32 one, and within 1e-5 of it
    assert rel(y, y_ref) < 1e-5 and rel(s, s_ref) < 1e-5
    assert rel(y, y_seq) < 1e-5 and rel(s, s_seq) < 1e-5
    assert not torch.equal(args[-1], s)  # the state moved (and the input state was not modified)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("T,chunk", [(3, 16), (37, 16), (100, 32)])
def test_wkv5_chunked_matches_sequential(per_token, T, chunk):
    gen = torch.Generator().manual_seed(T + chunk + per_token)
    B, H, N = 2, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    # strong and weak decays, including ones that underflow to 0 within a chunk
    shape = (B, T, H, N) if per_token else (H, N)
    w = torch.exp(-torch.exp(3 * torch.randn(*shape, generator=gen)))
    u = torch.randn(H, N, generator=gen)
    s = torch.randn(B, H, N, N, generator=gen)
    y_ref, s_ref = wkv.wkv5_torch(r.double(), k.double(), v.double(), w.double(), u.double(), s.double())
    y, s2 = prefill.wkv5_chunked(r, k, v, w, u, s, chunk=chunk)
    assert rel(y, y_ref) < 1e-5 and rel(s2, s_ref) < 1e-5


def test_wkv7_one_matches_sequential():
    gen = torch.Generator().manual_seed(3)
    args = _inputs7(3, 1, 2, 64, gen)
    y0, s0 = wkv.wkv7_torch(*args)
    y1, s1 = wkv.wkv7_one(*args)
    assert rel(y1, y0) < 1e-6 and rel(s1, s0) < 1e-6


def _reference(model: Path, prompt: list[int], v7: bool) -> list[list[float]]:
    req = {"model": str(model), "strategy": "cpu fp32", "v7": v7,
           "jobs": [{"prompt": prompt, "full_output": True, "greedy": 0}]}
    out = subprocess.run([sys.executable, str(RUNNER)], input=json.dumps(req), capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout)[0]["full"]


@pytest.mark.parametrize("version", ["7", "6", "5.2"])
def test_chunked_prefill_matches_reference(model_path, version):
    """A 70-token prompt runs through the chunked WKV (T > 1); every position's logits match rwkv 0.8.32."""
    path = model_path(version)
    prompt = list(b"RWKV prefill runs in chunks of tokens; the logits must not change at all!!")
    ref = torch.tensor(_reference(path, prompt, version == "7"))
    model = RWKV(path, "cpu fp32")
    full, _ = model.forward(prompt, None, full_output=True)
    assert full.shape == ref.shape
    assert float((full - ref).abs().max() / ref.abs().max()) < 1e-5
    # and the sequence path equals feeding the tokens one by one
    state, last = None, None
    for t in prompt:
        last, state = model.forward([t], state)
    assert float((full[-1] - last).abs().max() / last.abs().max()) < 1e-5
