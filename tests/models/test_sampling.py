"""Sampler against the reference ``rwkv.utils.PIPELINE`` (generate's penalty bookkeeping, sample_logits' cutoffs)."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from rwkv.utils import PIPELINE, PIPELINE_ARGS
from rwkv_chat.models.errors import ShapeMismatchError, StateError, TokenError
from rwkv_chat.models.text.sampling import Sampler, SamplerArgs, SamplingError, filtered_probs
from rwkv_chat.models.text.tokenizers import load_tokenizer

HYP = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def world():
    return load_tokenizer("world")


@pytest.fixture(scope="module")
def trie():
    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


def random_logits(n: int, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


# ---- arguments ----


def test_defaults_are_the_reference_pipeline_args():
    ref = PIPELINE_ARGS()
    args = SamplerArgs()
    for name in ("temperature", "top_p", "top_k", "alpha_frequency", "alpha_presence", "alpha_decay"):
        assert getattr(args, name) == getattr(ref, name), name
    assert list(args.token_ban) == ref.token_ban and list(args.token_stop) == ref.token_stop
    assert args.seed is None and args.max_tokens == 256
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.temperature = 2.0  # type: ignore[misc]
    assert SamplerArgs(token_ban=[1, 2]).token_ban == (1, 2)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"),
        ("top_p", 1.5), ("top_p", -0.01), ("top_k", -1), ("top_k", 2.5), ("top_k", True),
        ("alpha_frequency", -1.0), ("alpha_presence", float("inf")), ("alpha_decay", 1.01),
        ("token_ban", [1, -2]), ("token_stop", "0"), ("token_stop", 3), ("seed", -1), ("seed", 1.0),
        ("max_tokens", 0), ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("repetition_penalty", float("nan")),
    ],
)
def test_invalid_args_raise_value_errors_naming_the_field(field, value):
    with pytest.raises(SamplingError, match=field) as info:
        SamplerArgs(**{field: value})
    assert isinstance(info.value, ValueError)


# ---- greedy, seeds, state ----


@HYP
@given(n=st.integers(2, 3000), scale=st.floats(0.1, 10), seed=st.integers(0, 2**31))
def test_greedy_is_argmax(n, scale, seed):
    logits = random_logits(n, scale, seed)
    sampler = Sampler(SamplerArgs(temperature=0, alpha_frequency=0, alpha_presence=0))
    assert sampler.sample(logits) == int(torch.argmax(logits))
    assert sampler.sample(logits) == int(torch.argmax(logits))
    probs = filtered_probs(logits, SamplerArgs(temperature=0))
    assert probs[int(torch.argmax(logits))] == 1.0 and probs.sum() == 1.0


def _run(sampler: Sampler, steps: int, n: int = 1000) -> list[int]:
    return [sampler.sample(random_logits(n, 2.0, i)) for i in range(steps)]


def test_same_seed_same_tokens_and_global_rng_untouched(world):
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()
    args = SamplerArgs(seed=1234, temperature=1.3, top_p=0.95)
    a, b = _run(Sampler(args, None), 60), _run(Sampler(args, None), 60)
    assert a == b
    assert _run(Sampler(dataclasses.replace(args, seed=1235)), 60) != a
    assert len(set(a)) > 10  # it did sample, not argmax
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    # the World vocabulary: same seed, same tokens
    big = [random_logits(65536, 3.0, i) for i in range(5)]
    s1, s2 = Sampler(SamplerArgs(seed=7), world), Sampler(SamplerArgs(seed=7), world)
    assert [s1.sample(x) for x in big] == [s2.sample(x) for x in big]


def test_state_dict_round_trip_continues_identically():
    args = SamplerArgs(seed=99, temperature=0.9, alpha_frequency=0.5, alpha_presence=0.3)
    s = Sampler(args)
    _run(s, 30)
    saved = s.state_dict()
    after = [s.sample(random_logits(1000, 2.0, 100 + i)) for i in range(30)]
    assert saved["tokens"] and len(saved["tokens"]) == len(saved["counts"])

    r = Sampler(dataclasses.replace(args, seed=5))  # a different seed: the saved RNG state must win
    r.load_state_dict(saved)
    assert [r.sample(random_logits(1000, 2.0, 100 + i)) for i in range(30)] == after
    assert torch.equal(r.counts, s.counts) and torch.equal(r.present, s.present)

    with pytest.raises(StateError):
        Sampler(args, load_tokenizer("bytes")).load_state_dict(saved)  # vocabulary 256, state for 1000
    with pytest.raises(StateError):
        Sampler(args).load_state_dict({"format": 1})


@pytest.mark.parametrize("vocab", [64, 4096])
def test_counts_decay_like_the_reference_dict_whether_few_or_many_tokens_are_present(vocab):
    """The reference decays every recorded occurrence each token (``occurrence[n] *= alpha_decay``); the counts
    are decayed at the present ids while they are few and as a whole vector once many are present: the same
    float64 products either way, and the saved state carries them."""
    rng = np.random.default_rng(vocab)
    s = Sampler(SamplerArgs(alpha_decay=0.93))
    s._check_row(torch.zeros(vocab))
    occurrence: dict[int, float] = {}
    for _ in range(3 * vocab // 2):                         # crosses from few present ids to most of them
        token = int(rng.integers(0, vocab))
        s.record(token)
        for n in occurrence:
            occurrence[n] *= 0.93
        occurrence[token] = occurrence.get(token, 0.0) + 1.0
    ids = sorted(occurrence)
    assert len(ids) * 8 >= vocab, "the whole-vector path was reached"
    assert s.counts[ids].tolist() == [occurrence[n] for n in ids]
    assert int(s.present.sum()) == len(ids) and float(s.counts.sum()) == float(s.counts[ids].sum())
    r = Sampler(SamplerArgs(alpha_decay=0.93))
    r.load_state_dict(s.state_dict())
    r.record(ids[0])
    s.record(ids[0])
    assert torch.equal(r.counts, s.counts) and sorted(r._present_ids.array.tolist()) == ids


def test_penalty_entries_kept_between_steps_equal_fresh_ones_through_resets_loads_and_new_tokens():
    """``row_entries`` keeps the layout of the penalized ids on the sampler between calls; after every record (a
    repeated or a new token), observe, reset and load it gives what a fresh computation gives."""
    from rwkv_chat.models.text.device_sampling import row_entries
    rng = np.random.default_rng(4)
    s = Sampler(SamplerArgs(repetition_penalty=1.3, token_ban=(3, 3, 8), alpha_decay=0.9))
    other = Sampler(SamplerArgs(repetition_penalty=1.3, token_ban=(3, 3, 8)))
    for t in (s, other):
        t._check_row(torch.zeros(500))
    for t in rng.integers(0, 500, 40).tolist():
        other.record(t)

    def check():
        got = row_entries(s)
        s._entries = None
        want = row_entries(s)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])

    for step in range(300):
        op = step % 37
        if op == 11:
            s.reset()                              # the same lists, emptied: their stamps move on
        elif op == 23:
            s.load_state_dict(other.state_dict())  # new lists
        elif op == 30:
            s.observe(rng.integers(0, 500, 5).tolist())
        else:
            s.record(int(rng.integers(0, 60 if step % 2 else 500)))   # repeats and new tokens
        check()
    s = Sampler(SamplerArgs())                     # presence / frequency penalties only
    s._check_row(torch.zeros(500))
    for t in range(10):
        s.record(t)
    check()
    s.reset()                                      # emptied and refilled to as many ids, no call between
    for t in range(400, 410):
        s.record(t)
    check()


# ---- repetition penalty (Hugging Face's) ----


@pytest.mark.parametrize("penalty", [1.05, 1.3, 0.8])
def test_repetition_penalty_matches_transformers_on_the_context_and_generated_tokens(penalty):
    """The prompt's tokens (observe) and each generated one are penalized as transformers'
    RepetitionPenaltyLogitsProcessor penalizes the ids of input_ids; greedy draws follow its argmax."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    hf = RepetitionPenaltyLogitsProcessor(penalty)
    prompt = [3, 17, 17, 250, 999, 3]
    s = Sampler(SamplerArgs(temperature=0, alpha_frequency=0, alpha_presence=0, repetition_penalty=penalty))
    assert not s.plain_greedy
    ids = list(prompt)
    for step in range(12):
        logits = random_logits(1000, 3.0, step)
        if step == 0:
            s.penalize(logits)                  # the vocabulary, then the context
            s.observe(prompt)
        want = hf(torch.tensor([ids]), logits.clone().unsqueeze(0))[0]
        torch.testing.assert_close(s.penalize(logits), want, rtol=0, atol=0)
        token = s.sample(logits)
        assert token == int(torch.argmax(want))
        ids.append(token)


def test_repetition_penalty_state_carries_the_context_and_old_states_still_load():
    args = SamplerArgs(seed=3, temperature=0.8, repetition_penalty=1.2)
    s = Sampler(args)
    s.penalize(random_logits(1000, 1.0, 0))
    s.observe([5, 6, 7])
    _run(s, 10)
    saved = s.state_dict()
    assert {5, 6, 7} <= set(saved["seen"]) and set(saved["tokens"]) <= set(saved["seen"])
    r = Sampler(args)
    r.load_state_dict(saved)
    assert torch.equal(r.seen, s.seen)
    old = {k: v for k, v in saved.items() if k != "seen"}       # a state written before the penalty existed
    o = Sampler(args)
    o.load_state_dict(old)
    assert torch.equal(o.seen, o.present)
    with pytest.raises(StateError):
        Sampler(args).load_state_dict({**saved, "seen": [1, 2000]})
    with pytest.raises(StateError):
        Sampler(args).load_state_dict({**saved, "seen": ["x"]})
    with pytest.raises(TokenError):
        s.observe([1000])


def test_ban_stop_and_shapes():
    logits = random_logits(500, 2.0, 0)
    top = int(torch.argmax(logits))
    s = Sampler(SamplerArgs(temperature=0, token_ban=(top,), token_stop=(7,)))
    assert s.sample(logits) != top
    logits[7] = 100.0
    assert s.sample(logits) == 7 and s.is_stop(7) and not s.is_stop(top)
    assert 7 not in s.state_dict()["tokens"]  # a stop token is not recorded (reference: break first)
    with pytest.raises(ShapeMismatchError):
        s.sample(torch.zeros(501))
    with pytest.raises(ShapeMismatchError):
        s.sample(torch.zeros(2, 500))
    with pytest.raises(SamplingError, match="banned"):
        Sampler(SamplerArgs(token_ban=tuple(range(4)))).sample(torch.zeros(4))


# ---- the reference's penalty bookkeeping, through the real PIPELINE.generate ----


class FakeModel:
    """``forward`` returns fixed logits that depend on the last token (so greedy choices vary); every fifth call
    favours the whitespace/digit tokens, so their weight-0 counting is exercised."""

    def __init__(self, candidates: list[int], boosted: list[int], seed: int, vocab: int = 65536) -> None:
        g = torch.Generator().manual_seed(seed)
        self.base = torch.full((vocab,), -20.0)
        self.base[candidates] = torch.randn(len(candidates), generator=g) * 0.5
        self.shift = torch.zeros(7, vocab)
        self.shift[:, candidates] = torch.randn(7, len(candidates), generator=g) * 0.3
        self.base[boosted] -= 0.5  # rarely chosen on their own (a weight-0 token, once chosen, tends to stick)
        self.boost = torch.zeros(vocab)
        self.boost[boosted] = 1.5
        self.calls = 0

    def forward(self, tokens, state):
        self.calls += 1
        out = self.base + self.shift[tokens[-1] % 7]  # a fresh tensor: the reference edits it in place
        return (out + self.boost if self.calls % 5 == 0 else out), state


SETTINGS = [
    dict(alpha_frequency=0.2, alpha_presence=0.2, alpha_decay=0.996),
    dict(alpha_frequency=0.5, alpha_presence=0.0, alpha_decay=0.9),
    dict(alpha_frequency=0.0, alpha_presence=0.7, alpha_decay=1.0),
    dict(alpha_frequency=1.0, alpha_presence=0.1, alpha_decay=0.5),
    dict(alpha_frequency=0.3, alpha_presence=0.3, alpha_decay=0.996, token_ban=[33], token_stop=[0]),
]


@pytest.mark.parametrize("cfg,seed", [(cfg, i) for i, cfg in enumerate(SETTINGS)])
def test_penalties_match_reference_generate(world, trie, cfg, seed):
    words = [" ", "\t", "0", "1", "12", "00", " 1", "  ", "\n", "the", " the", ".", ",", "中", " cat", "🎉"]
    candidates = sorted({t for w in words for t in trie.encode(w) if trie.decode([t]) != "\ufffd"} | {0})
    boosted = [t for t in candidates if trie.decode([t]) in " \t0123456789"]
    model = FakeModel(candidates, boosted, seed)
    steps = 60

    ref_logits: list[torch.Tensor] = []
    ref_tokens: list[int] = []
    pipeline = PIPELINE.__new__(PIPELINE)
    pipeline.model, pipeline.tokenizer = model, trie
    original = pipeline.sample_logits

    def spy(logits, **kw):
        ref_logits.append(logits.clone())
        ref_tokens.append(original(logits, **kw))
        return ref_tokens[-1]

    pipeline.sample_logits = spy
    ref_args = PIPELINE_ARGS(temperature=0, top_p=0.85, **cfg)
    text = pipeline.generate("Hello", token_count=steps, args=ref_args)

    model = FakeModel(candidates, boosted, seed)
    ours = Sampler(SamplerArgs(temperature=0, **{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}),
                   world)
    tokens: list[int] = []
    moved = 0
    logits, _ = model.forward(world.encode("Hello"), None)
    for step in range(steps):
        assert torch.equal(ours.penalize(logits), ref_logits[step]), step  # exact: same float32 penalties
        token = ours.sample(logits)
        assert token == ref_tokens[step], step
        moved += token != int(torch.argmax(logits))
        if ours.is_stop(token):
            break
        tokens.append(token)
        logits, _ = model.forward([token], None)
    assert len(ref_tokens) == len(tokens) + (1 if len(tokens) < steps else 0)
    assert world.decode(tokens) == text
    assert moved >= 3  # the penalties changed the greedy choice: the comparison tests the bookkeeping
    assert set(tokens) & set(boosted), "the weight-0 path is exercised"


# ---- top-p / top-k / temperature against the reference's sample_logits ----


def reference_probs(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    captured = {}

    def choice(a, p):
        captured["p"] = np.array(p, copy=True)
        return int(np.argmax(p))

    mp = pytest.MonkeyPatch()
    mp.setattr(np.random, "choice", choice)
    try:
        PIPELINE.sample_logits(None, logits.clone(), temperature=temperature, top_p=top_p, top_k=top_k)
    finally:
        mp.undo()
    return captured["p"]


@HYP
@given(
    n=st.integers(2, 600),
    scale=st.floats(0.2, 4.0),
    seed=st.integers(0, 2**31),
    top_p=st.one_of(st.just(0.0), st.just(0.85), st.floats(0.0, 0.99)),
    top_k=st.one_of(st.just(0), st.integers(1, 700)),
    temperature=st.one_of(st.just(1.0), st.floats(0.4, 2.5)),
)
def test_filtered_probs_match_reference(n, scale, seed, top_p, top_k, temperature):
    logits = random_logits(n, scale, seed)
    sorted_probs = np.sort(torch.softmax(logits, -1).numpy())[::-1]
    assume(np.cumsum(sorted_probs)[-1] >= np.float32(top_p))  # the documented deviation is tested apart
    ref = reference_probs(logits, temperature, top_p, top_k)
    ours = filtered_probs(logits, SamplerArgs(temperature=temperature, top_p=top_p, top_k=top_k)).numpy()
    assert np.array_equal(ours > 0, ref > 0)
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=1e-7)


def test_filtered_probs_greedy_matches_reference():
    for seed in range(20):
        logits = random_logits(300, 2.0, seed)
        ref = reference_probs(logits, 0, 0.85, 0)
        ours = filtered_probs(logits, SamplerArgs(temperature=0)).numpy()
        assert np.array_equal(ours, ref.astype(np.float32))


def test_top_p_one_keeps_every_token():
    # the reference falls back to the single likeliest token when the float32 running sum stays below top_p
    for seed in range(30):
        logits = random_logits(5000, 1.0, seed)
        assert int((filtered_probs(logits, SamplerArgs(top_p=1.0)) > 0).sum()) == 5000


def test_sampling_follows_filtered_probs():
    logits = random_logits(50, 1.0, 3)
    args = SamplerArgs(seed=0, top_p=0.7, top_k=10, temperature=0.8, alpha_frequency=0, alpha_presence=0)
    probs = filtered_probs(logits, args)
    s = Sampler(args)
    counts = torch.bincount(torch.tensor([s.sample(logits) for _ in range(4000)]), minlength=50).double()
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    assert torch.allclose(counts / 4000, probs.double(), atol=0.03)


@pytest.mark.parametrize("args", [dict(top_p=0.85), dict(top_p=0.3, temperature=0.7), dict(top_p=0.8, top_k=20),
                                  dict(top_p=1.0, top_k=5, temperature=1.3), dict(top_p=0.95, top_k=300),
                                  dict(temperature=0, alpha_presence=0.5)])
def test_the_kept_token_draw_takes_the_tokens_of_the_full_path(args):
    """``Sampler.sample`` draws from the kept tokens only (``_draw_kept``); with the same seed it takes the tokens
    the full path (``filtered_probs`` over the vocabulary) takes, over peaked and flat logits, with ties at the
    top-k cut and penalties changing the logits as the draws go."""
    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(3000, generator=g) * scale for scale in (0.5, 3.0, 8.0) for _ in range(40)]
    tie = torch.randn(3000, generator=g) * 4
    tie[tie.topk(30).indices[15:25]] = tie.max() - 1        # ten equal logits across a cut at 20
    rows.append(tie)
    cfg = SamplerArgs(seed=11, alpha_frequency=0.2, alpha_presence=0.1, repetition_penalty=1.1).updated(args)
    fast, full = Sampler(cfg), Sampler(cfg)
    full._draw_kept = lambda x: None
    decided, draw_kept = [], fast._draw_kept

    def spy(x):
        token = draw_kept(x)
        decided.append(token is not None)
        return token
    fast._draw_kept = spy
    for i, row in enumerate(rows):
        assert fast.sample(row) == full.sample(row), i
    assert sum(decided) >= len(rows) // 2                   # the kept-token path decided most draws


@HYP
@given(seed=st.integers(0, 2**31), vocab=st.sampled_from([40, 256, 3000]), scale=st.floats(0.1, 9.0),
       top_p=st.one_of(st.just(0.85), st.just(1.0), st.floats(0.0, 1.0)), top_k=st.one_of(st.just(0), st.integers(1, 300)),
       temperature=st.one_of(st.just(1.0), st.floats(0.3, 2.5)), ties=st.booleans())
def test_windows_decided_together_keep_and_draw_what_each_row_alone_does(seed, vocab, scale, top_p, top_k,
                                                                         temperature, ties):
    """``window_kept`` over a batch decides the rows and keeps the tokens ``_top_p_head`` (first window only) and
    the top-k cut keep row by row; ``kept_draws`` over a batch gives each row the token it gets alone, which is the
    token ``Sampler._draw_probs`` draws with the same generator."""
    from rwkv_chat.models.text.draws import kept_draws, window_kept
    from rwkv_chat.models.text.sampling import WINDOW, _top_p_head
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(5):
        x = torch.randn(vocab, generator=g) * scale * (r + 1) / 3
        if ties:
            x[x.topk(min(30, vocab)).indices[min(5, vocab - 1):]] = x.max() - 1
        rows.append(torch.softmax(x, -1))
    w = min(WINDOW, vocab)
    firsts = [torch.sort(p, descending=True) if vocab <= w else torch.topk(p, w, sorted=True) for p in rows]
    head = np.stack([f[0].numpy() for f in firsts])
    ids = np.stack([f[1].numpy() for f in firsts])
    n_kept, decided = window_kept(head, ids, [top_p] * 5, [top_k] * 5, vocab)
    for r, p in enumerate(rows):
        cutoff, kept, values = _top_p_head(p, top_p, top_k, (firsts[r][0], firsts[r][1]), grow=False)
        if kept is not None and 0 < top_k < kept.numel():
            kept = None if values[top_k - 1] == values[top_k] else kept[:top_k]
        assert bool(decided[r]) == (kept is not None), r
        if kept is not None:
            assert int(n_kept[r]) == kept.numel() and ids[r, :n_kept[r]].tolist() == kept.tolist()
    rows_d = np.flatnonzero(decided)
    if rows_d.size:
        u = torch.rand(rows_d.size, dtype=torch.float64, generator=g).numpy()
        together = kept_draws(head[rows_d], ids[rows_d], n_kept[rows_d], [temperature] * rows_d.size, u)
        for i, r in enumerate(rows_d):
            alone = kept_draws(head[r:r + 1, :n_kept[r]], ids[r:r + 1, :n_kept[r]], n_kept[r:r + 1], [temperature],
                               u[i:i + 1])
            assert together[i] == alone[0]
            s = Sampler(SamplerArgs(top_p=top_p, top_k=top_k, temperature=temperature, seed=seed + int(r)))
            want_u = torch.Generator().manual_seed(seed + int(r))
            s2 = kept_draws(head[r:r + 1], ids[r:r + 1], n_kept[r:r + 1], [temperature],
                            [float(torch.rand((), dtype=torch.float64, generator=want_u))])[0]
            assert s._draw_probs(rows[r], (firsts[r][0], firsts[r][1]), grow=False) == s2


def test_a_top_k_beyond_64_bits_is_no_limit_on_the_batched_path(caplog):
    """A top_k larger than any vocabulary (beyond int64 too) keeps every token on the batched window draw as on the
    host path, without the batched path failing over to the host."""
    from rwkv_chat.models.text.batch_sampling import sample_rows
    g = torch.Generator().manual_seed(2)
    rows = [torch.randn(3000, generator=g) * 6 for _ in range(3)]
    batched = [Sampler(SamplerArgs(seed=i, top_k=2**70)) for i in range(3)]
    alone = [Sampler(SamplerArgs(seed=i, top_k=2**70)) for i in range(3)]
    with caplog.at_level("WARNING"):
        got = sample_rows(batched, rows)
    assert got == [s.sample(r) for s, r in zip(alone, rows)] and not caplog.records


@pytest.mark.parametrize("vocab", [2000, 256, 100])
def test_rows_sampled_together_take_the_tokens_of_each_alone(vocab):
    """``sample_rows`` over a batch (one copy, penalties as indexed updates over the batch, one softmax, one sorted
    window for the rows, or the whole rows sorted at a vocabulary that small) gives every sampler the token and the
    counts ``Sampler.sample`` gives it alone, over steps, with greedy, penalized, banned and sampled rows, a row of
    NaN, a row of -inf with a NaN, and a tie at a top-k cut."""
    from rwkv_chat.models.text.batch_sampling import sample_rows

    g = torch.Generator().manual_seed(8)
    args = [dict(temperature=0), dict(temperature=0, alpha_presence=0.4), dict(top_p=0.5), dict(top_p=0.9, top_k=7),
            dict(top_p=1.0, top_k=40, temperature=0.6), dict(top_p=0.999, repetition_penalty=1.2), dict(top_p=1.0),
            dict(top_p=0.7, token_ban=(3, 5, 3), repetition_penalty=0.8, alpha_presence=0)]
    make = lambda: [Sampler(SamplerArgs(seed=i, alpha_frequency=0.3, **a)) for i, a in enumerate(args)]  # noqa: E731
    batched, alone = make(), make()
    for s in batched + alone:
        s._allocate(vocab)
        s.observe([1, 2, 7, 2])
    for step in range(12):
        rows = [torch.randn(vocab, generator=g) * (1 + 3 * (i % 3)) for i in range(len(args))]
        if step == 3:
            rows[2][5] = float("nan")
        if step == 5:
            rows[3][:] = -math.inf
            rows[3][9] = float("nan")
        if step == 7:
            rows[3][rows[3].topk(12).indices[5:9]] = rows[3].max() - 0.5
        got = sample_rows(batched, rows, return_errors=True)
        want = []
        for s, r in zip(alone, rows):
            try:
                want.append(s.sample(r))
            except Exception as e:  # noqa: BLE001
                want.append(e)
        assert [type(t) if isinstance(t, Exception) else t for t in got] == \
            [type(t) if isinstance(t, Exception) else t for t in want], step
        for a, b in zip(batched, alone):
            assert torch.equal(a.counts, b.counts) and torch.equal(a.seen, b.seen)


def test_a_row_drawn_alone_on_the_batched_path_takes_the_tokens_of_the_host_path():
    """One row through the batched path (as an accelerator's row goes: ``_sample_group`` with a group of one) takes
    the host path's tokens and counts, and its indexed penalties give the host path's logits bit for bit."""
    from rwkv_chat.models.text.batch_sampling import _penalize, _sample_group

    g = torch.Generator().manual_seed(21)
    cfg = SamplerArgs(seed=4, top_p=0.8, top_k=50, temperature=0.9, alpha_frequency=0.3, alpha_presence=0.2,
                      repetition_penalty=1.3, token_ban=(0, 9))
    one, host = Sampler(cfg), Sampler(cfg)
    for s in (one, host):
        s._allocate(5000)
        s.observe(range(0, 5000, 37))
    for step in range(30):
        row = torch.randn(5000, generator=g) * (1 + step % 4)
        x = row.unsqueeze(0).clone()
        _penalize(x, [one])
        assert torch.equal(x[0], host.penalize(row)), step
        out = [None]
        _sample_group([one], [row], [0], out)
        assert out[0] == host.sample(row), step
        assert torch.equal(one.counts, host.counts) and torch.equal(one.present, host.present)


def test_whole_rows_drawn_on_the_rows_device_take_the_host_paths_tokens():
    """Rows whose first sorted window does not reach the cutoff (flat logits) are drawn over the whole vocabulary on
    the rows' device (``device_sampling.whole_rows_tokens``, as an accelerator's rows are): sorted there, the
    running sum's cutoff, the top-k cut, the temperature, the inverse CDF with the sampler's own uniform number.
    With the same seeds and state the host path takes the same tokens, but for a draw a running sum added in
    another order moves (torch's CPU cumsum accumulates in float64, the reference's in float32)."""
    from rwkv_chat.models.text import device_sampling
    from rwkv_chat.models.text.batch_sampling import _sample_group

    whole = []
    real = device_sampling.whole_rows_tokens

    def spy(probs, params):
        whole.append(probs.shape[0])
        return real(probs, params)

    g = torch.Generator().manual_seed(3)
    settings_ = [dict(top_p=0.85), dict(top_p=0.3, temperature=0.7), dict(top_p=1.0, top_k=40, temperature=1.3),
                 dict(top_p=0.95, top_k=2000), dict(top_p=0.6, repetition_penalty=1.2), dict(top_p=1.0)]
    agree = total = 0
    device_sampling.whole_rows_tokens = spy
    try:
        for vocab in (3000, 65536):
            for cfg in settings_:
                device_like = [Sampler(SamplerArgs(seed=i, **cfg)) for i in range(4)]
                host = [Sampler(SamplerArgs(seed=i, **cfg)) for i in range(4)]
                for step in range(10):
                    rows = [torch.randn(vocab, generator=g) * (0.3 + 0.5 * i) for i in range(4)]
                    got = [None] * 4
                    _sample_group(device_like, rows, list(range(4)), got, whole_rows_here=True)
                    want = [s._sample_host(r) for s, r in zip(host, rows)]
                    agree += sum(a == b for a, b in zip(got, want))
                    total += 4
                    for a, b in zip(device_like, host):
                        a.load_state_dict(b.state_dict())
    finally:
        device_sampling.whole_rows_tokens = real
    assert sum(whole) >= total // 2                      # most rows took the whole-row path
    assert agree >= 0.98 * total, (agree, total)


class _Replay:
    """A stand-in for a captured CUDA graph on the CPU: each replay runs the body again and writes its outputs into
    the tensors the capture returned (as a graph's replay writes its static outputs)."""

    def __init__(self, body, out, corrupt=False):
        self.body, self.out, self.corrupt = body, out, corrupt

    def replay(self):
        new = self.body()
        for static, fresh in zip(*(t if isinstance(t, tuple) else (t,) for t in (self.out, new))):
            static.copy_(fresh)
        if self.corrupt:
            (self.out[0] if isinstance(self.out, tuple) else self.out).view(-1)[0] += 1


def _stand_in_graphs(monkeypatch, corrupt=False):
    from rwkv_chat.models.text import device_sampling as ds

    def capture(body, device, pool):
        out = body()
        return _Replay(body, out, corrupt), out
    monkeypatch.setattr(ds, "_capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    return ds.SamplingGraphs(torch.device("cpu"), 256, limit=2)


def test_the_sampling_graphs_serve_what_the_eager_passes_give(monkeypatch):
    """``SamplingGraphs`` (CUDA graphs of the sampling passes), run with a stand-in for the captured graph on the
    CPU: its static rows, padded entries, scratch index, rows bucket and whole-row parameters give the tokens and
    counts of the host path over steps whose penalty entries grow past the first capacity (new graphs), with bans,
    greedy and flat rows, and a batch smaller than its bucket; old shapes are dropped past the limit."""
    from rwkv_chat.models.text.batch_sampling import _sample_group

    graphs = _stand_in_graphs(monkeypatch)
    g = torch.Generator().manual_seed(13)
    cfgs = [dict(top_p=0.85, token_ban=(0,)), dict(temperature=0, alpha_presence=0.5),
            dict(top_p=0.6, top_k=30, token_ban=(2, 4)), dict(top_p=0.9, repetition_penalty=1.3, temperature=0.8)]
    fast = [Sampler(SamplerArgs(seed=i, **c)) for i, c in enumerate(cfgs)]
    host = [Sampler(SamplerArgs(seed=i, **c)) for i, c in enumerate(cfgs)]
    agree = total = 0
    for step in range(40):
        rows = [torch.randn(3000, generator=g) * (0.5 + 3 * ((i + step) % 3)) for i in range(len(cfgs))]
        rows[0][0] = 50.0                                # banned: never drawn
        got = [None] * len(cfgs)
        _sample_group(fast, rows, list(range(len(cfgs))), got, whole_rows_here=True, graphs=graphs)
        want = [s._sample_host(r) for s, r in zip(host, rows)]
        agree += sum(a == b for a, b in zip(got, want))
        total += len(cfgs)
        for a, b in zip(fast, host):
            a.load_state_dict(b.state_dict())
        if step == 10:                                   # a prompt's tokens: the entries outgrow 64 a row
            for smp in fast + host:
                smp.observe(range(500, 600))
        if step == 20:                                   # three rows in a bucket of four
            fast, host, cfgs = fast[:3], host[:3], cfgs[:3]
    assert agree >= 0.98 * total, (agree, total)
    assert len(graphs.graphs) <= 2 and not graphs.eager
    assert max(key[2] for key in graphs.graphs) > 64     # the entries outgrew the first capacity


def test_a_sampling_graph_that_differs_from_the_eager_passes_is_not_used(monkeypatch):
    """A graph whose first replay differs from the eager passes on the same inputs is dropped and its shape runs
    eagerly from then on (``first`` returns None)."""
    graphs = _stand_in_graphs(monkeypatch, corrupt=True)
    s = Sampler(SamplerArgs(seed=0))
    s._allocate(3000)
    row = torch.randn(3000)
    from rwkv_chat.models.text import device_sampling as ds
    assert graphs.first([row], [ds.row_entries(s)]) is None
    assert graphs.eager and not graphs.graphs
    assert graphs.first([row], [ds.row_entries(s)]) is None


def test_a_sampling_graph_sends_new_entries_and_clears_old_ones(monkeypatch):
    """The entries staged for a graph follow the rows: a penalized row's entries reach the pass, and a later row
    without any (after a reset, or another sampler in the same shape) gets none of them: its first pass equals the
    eager one on its own logits; the pinned staging tensors are reused, not reallocated."""
    from rwkv_chat.models.text import device_sampling as ds

    graphs = _stand_in_graphs(monkeypatch)
    s = Sampler(SamplerArgs(seed=0, alpha_presence=2.0, alpha_frequency=0.0))
    s._allocate(3000)
    row = torch.randn(3000, generator=torch.Generator().manual_seed(5)) * 3
    for token in (int(torch.argmax(row)), 7, 9):
        s._take(token, 3000)                       # drawn tokens: the presence penalty's
    plain = ds.first_pass(row[None].clone(), 256)[0]
    penalized_row = row.clone()
    ds.apply_entries(penalized_row, *(torch.from_numpy(a) for a in ds.row_entries(s)))
    penalized = ds.first_pass(penalized_row[None], 256)[0]
    assert not torch.equal(plain, penalized)
    for entries, want in (([None], plain), ([ds.row_entries(s)], penalized), ([None], plain), ([None], plain),
                          ([ds.row_entries(s)], penalized)):
        e, host = graphs.first([row], entries)
        assert torch.equal(host, want)
    (g,) = graphs.graphs.values()
    assert g.padding_only is False and g.ids_h.numel() == g.cap


def test_ties_at_the_top_k_cut_and_top_p_one_draw_alike_on_both_paths():
    """At a tie at the top-k cut both paths keep the lowest token ids, and top_p 1 keeps every token on both
    (whatever a float32 running sum does: on peaked rows it reaches 1 before the smallest tokens, which a
    temperature above 1 would make likely): the whole-row path and the host path draw the same tokens."""
    from rwkv_chat.models.text.batch_sampling import _sample_group

    g = torch.Generator().manual_seed(17)
    cfgs = [dict(top_p=1.0, top_k=10), dict(top_p=0.95, top_k=50, temperature=1.5), dict(top_p=1.0, temperature=2.0),
            dict(top_p=1.0, temperature=3.0, alpha_presence=0.3)]
    for vocab, make in ((1000, lambda: torch.randint(0, 3, (1000,), generator=g).float() * 0.5),
                        (65536, lambda: torch.randn(65536, generator=g) * 5)):
        whole = [Sampler(SamplerArgs(seed=i, **c)) for i, c in enumerate(cfgs)]
        host = [Sampler(SamplerArgs(seed=i, **c)) for i, c in enumerate(cfgs)]
        for step in range(8):
            rows = [make() for _ in cfgs]
            got = [None] * len(cfgs)
            _sample_group(whole, rows, list(range(len(cfgs))), got, whole_rows_here=True)
            assert got == [s._sample_host(r) for s, r in zip(host, rows)], (vocab, step)


def test_top_p_one_keeps_every_token_of_a_peaked_row_and_a_vocabulary_of_one_samples():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(16)) * 8
    running = np.cumsum(np.sort(torch.softmax(logits, -1).numpy())[::-1])        # float32, as the reference's
    assert np.argmax(running >= np.float32(1)) < 999          # reaches 1 before the smallest tokens
    assert int((filtered_probs(logits, SamplerArgs(top_p=1.0, temperature=2.0)) > 0).sum()) == 1000
    assert Sampler(SamplerArgs(seed=0)).sample(torch.tensor([0.5])) == 0


def test_logits_a_penalty_makes_infinite_share_the_probability():
    """A repetition penalty so small that it divides the context's positive logits to +inf (float32) leaves those
    tokens, and only them, to be drawn (the softmax's limit), on the host and on the batched path."""
    from rwkv_chat.models.text.batch_sampling import sample_rows

    cfg = SamplerArgs(seed=3, repetition_penalty=1e-300, alpha_frequency=0, alpha_presence=0)
    row = torch.linspace(-1, 1, 300)
    for draw in (lambda s: s.sample(row), lambda s: sample_rows([s, Sampler(cfg)], [row, row])[0]):
        s = Sampler(cfg)
        s._allocate(300)
        s.observe([250, 260, 10])                     # 10 has a negative logit: multiplied, stays finite
        got = {draw(s) for _ in range(60)}
        assert got <= {250, 260} and len(got) == 2, got
