"""Golden tests: our engine against the reference ``rwkv`` package on the five real tiny models.

Prompts are fixed and random (a fresh seed each run, printed on failure). fp32 logits agree within 1e-4;
greedy continuations agree token for token.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from rwkv_chat.models import RWKV

from .golden import cached_reference

VERSIONS = ["4", "5", "5.2", "6", "7"]
SEED = random.randrange(1 << 30)
FIXED = [list(b"Hello"), list(b"\nThe quick brown fox jumps over the lazy dog."), [0], list(b"\x00\xff\x10 a")]
GREEDY = 64


def _jobs():
    rng = random.Random(SEED)
    jobs = [{"prompt": p, "full_output": True, "greedy": GREEDY} for p in FIXED]
    for _ in range(4):
        n = rng.choice([1, 2, 7, 33, 100])
        jobs.append({"prompt": [rng.randrange(256) for _ in range(n)], "full_output": True, "greedy": 16})
    return jobs


JOBS = _jobs()


@pytest.fixture(scope="module", params=VERSIONS)
def pair(request, model_path):
    path = model_path(request.param)
    ref = cached_reference(str(path), "cpu fp32", request.param, json.dumps(JOBS))
    return request.param, RWKV(path, "cpu fp32"), ref


def test_version_detected(pair):
    version, model, _ = pair
    assert model.version == version


def test_logits_and_full_output(pair):
    version, model, ref = pair
    for job, r in zip(JOBS, ref):
        full, _ = model.forward(job["prompt"], None, full_output=True)
        last, _ = model.forward(job["prompt"], None)
        assert full.dtype == torch.float32 and full.shape == (len(job["prompt"]), model.vocab_size)
        err = (full - torch.tensor(r["full"])).abs().max().item()
        assert err < 1e-4, f"v{version} seed={SEED} prompt={job['prompt'][:10]}: full_output max err {err}"
        err = (last - torch.tensor(r["logits"])).abs().max().item()
        assert err < 1e-4, f"v{version} seed={SEED}: last logits max err {err}"


def test_greedy_continuation(pair):
    version, model, ref = pair
    for job, r in zip(JOBS, ref):
        logits, state = model.forward(job["prompt"], None)
        out = []
        for _ in range(job["greedy"]):
            tok = int(torch.argmax(logits))
            out.append(tok)
            logits, state = model.forward([tok], state)
        assert out == r["greedy"], f"v{version} seed={SEED} prompt={job['prompt'][:10]}"
