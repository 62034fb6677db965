"""The daemon's decode buckets and batched greedy sampling, on real tiny models (in process)."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_chat.daemon.runner import decode_buckets
from rwkv_chat.models import RWKV
from rwkv_chat.models.decode import DEFAULT_BUCKETS, BatchDecoder
from rwkv_chat.models.sampling import Sampler, SamplerArgs, SamplingError, sample_rows


@pytest.fixture(scope="module")
def model7(model_path):
    torch.set_num_threads(1)
    return RWKV(model=str(model_path("7")), strategy="cpu fp32", verbose=False)


def _logits_of(model, buckets, others: int, n: int = 6) -> torch.Tensor:
    """Logits [n, vocab] of one conversation fed tokens 1..n while ``others`` conversations share its steps."""
    dec = BatchDecoder(model, max_batch=16, buckets=buckets)
    h = dec.add(None)
    hs = [dec.add(None) for _ in range(others)]
    out = []
    for s in range(n):
        lg = dec.step({h: s + 1, **{o: (37 * (i + 1) + s) % model.vocab_size for i, o in enumerate(hs)}})
        out.append(lg[h].clone())
    return torch.stack(out)


def test_invariant_buckets_keep_a_conversation_bit_identical(model7):
    buckets = decode_buckets(model7, 16, True)
    assert buckets[-1] == 16 and set(buckets) <= set(DEFAULT_BUCKETS) | {16}
    assert buckets[0] == 1, "the tiny model's fused CPU step is row-count invariant: no floor expected"
    alone = _logits_of(model7, buckets, 0)
    for others in (1, 3, 7, 12):                 # buckets 2, 4, 8, 16
        assert torch.equal(_logits_of(model7, buckets, others), alone), others
    assert decode_buckets(model7, 16, False) == DEFAULT_BUCKETS


def test_sample_rows_equals_one_sampler_at_a_time():
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(256, generator=gen) for _ in range(5)]
    rows[2][17] = rows[2].max() + 1               # a sure maximum
    argsets = [SamplerArgs(temperature=0, alpha_frequency=0, alpha_presence=0),
               SamplerArgs(temperature=0, alpha_frequency=0, alpha_presence=0, token_stop=(17,)),
               SamplerArgs(temperature=0, alpha_frequency=0, alpha_presence=0),
               SamplerArgs(temperature=0),                           # penalties: the full path
               SamplerArgs(temperature=1.0, top_p=0.9, seed=5)]
    a = [Sampler(x) for x in argsets]
    b = [Sampler(x) for x in argsets]
    for step in range(4):
        want = [s.sample(r) for s, r in zip(a, rows)]
        got = sample_rows(b, rows)
        assert got == want, step
        for sa, sb in zip(a, b):
            assert torch.equal(sa.counts, sb.counts) and torch.equal(sa.present, sb.present)
        rows = [r.roll(step + 1) for r in rows]


def test_sample_rows_non_finite_row_takes_the_reference_rules():
    greedy = SamplerArgs(temperature=0, alpha_frequency=0, alpha_presence=0)
    nan_row = torch.zeros(256)
    nan_row[5] = math.nan
    nan_row[9] = 2.0                              # NaN is never sampled: the argmax of the rest
    dead = torch.full((256,), -math.inf)
    ok = torch.arange(256, dtype=torch.float32)
    got = sample_rows([Sampler(greedy) for _ in range(3)], [nan_row, dead, ok], return_errors=True)
    assert got[0] == 9 and isinstance(got[1], SamplingError) and got[2] == 255
    with pytest.raises(SamplingError):
        sample_rows([Sampler(greedy)], [dead])
