"""The daemon's decode buckets (``[daemon] batch_invariant``) and batched greedy sampling, on real tiny models
(in process), and the setting's round trip through the config file."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_chat.daemon.config import Config, ConfigError, load_config, save_config
from rwkv_chat.daemon.host import batch_invariance, decode_buckets
from rwkv_chat.models import RWKV
from rwkv_chat.models.rwkv.decode import DEFAULT_BUCKETS, BatchDecoder
from rwkv_chat.models.text.batch_sampling import sample_rows
from rwkv_chat.models.text.sampling import Sampler, SamplerArgs, SamplingError


@pytest.fixture(scope="module")
def models(model_path):
    torch.set_num_threads(1)
    return {v: RWKV(model=str(model_path(v)), strategy="cpu fp32", verbose=False) for v in ("4", "7")}


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


@pytest.mark.parametrize("version", ["4", "7"])
@pytest.mark.parametrize("setting", [True, "auto"])
def test_invariant_buckets_keep_a_conversation_bit_identical(models, version, setting):
    model = models[version]
    buckets = decode_buckets(model, 16, setting)
    assert buckets[-1] == 16 and set(buckets) <= set(DEFAULT_BUCKETS)
    # the fused CPU step computes the small matrices of these models by hand loops at every decode row count
    assert buckets == (1, 2, 4, 8, 16), buckets
    alone = _logits_of(model, buckets, 0)
    for others in (1, 3, 7, 12):                 # buckets 2, 4, 8, 16
        assert torch.equal(_logits_of(model, buckets, others), alone), others


def _skew_steps_of(rows: int, monkeypatch) -> None:
    """Make every decode step at ``rows`` rows give logits 1e-3 off (a bucket whose kernels round differently)."""
    forward = BatchDecoder._forward

    def skewed(self, b):
        out = forward(self, b)
        return out + 1e-3 if b == rows else out

    monkeypatch.setattr(BatchDecoder, "_forward", skewed)


def test_measured_buckets_drop_a_bucket_that_differs(models, monkeypatch):
    """A bucket whose rows differ from the max_batch bucket's is left out (a step made to differ at 2 rows)."""
    model = models["7"]
    _skew_steps_of(2, monkeypatch)
    assert decode_buckets(model, 16, True) == (1, 4, 8, 16)
    assert decode_buckets(model, 16, "auto") == (1, 4, 8, 16)      # a lone conversation still steps 1 row


def test_auto_drops_invariance_that_pads_a_lone_conversation(models, monkeypatch):
    """With a floor above 1 row (1-row steps differ), true keeps the floor, auto takes the default buckets."""
    model = models["7"]
    _skew_steps_of(1, monkeypatch)
    assert decode_buckets(model, 16, True) == (2, 4, 8, 16)
    assert decode_buckets(model, 16, "auto") is None                # None: the engine's default buckets


def test_not_invariant_takes_the_default_buckets(models):
    assert decode_buckets(models["7"], 16, False) is None           # None: the engine's default buckets
    assert models["7"].decoder(16, None).buckets == BatchDecoder(models["7"], 16, DEFAULT_BUCKETS).buckets


def test_batch_invariance_setting_by_device():
    assert batch_invariance("auto", {"cpu"}) is True
    assert batch_invariance("auto", {"cuda"}) is False
    assert batch_invariance("auto", {"cuda", "cpu"}) is False       # a split strategy has an accelerator
    assert batch_invariance("auto", {"mps"}) is False
    for devices in ({"cpu"}, {"cuda"}):
        assert batch_invariance(True, devices) is True
        assert batch_invariance(False, devices) is False
    with pytest.raises(ConfigError):
        batch_invariance("yes", {"cpu"})


def test_config_accepts_bool_or_auto(tmp_path):
    path = tmp_path / "config.toml"
    assert Config().daemon.batch_invariant == "auto"
    for value in (True, False, "auto"):
        cfg = Config()
        cfg.daemon.batch_invariant = value
        save_config(cfg, path)
        assert load_config(path).daemon.batch_invariant == value
    for bad in ('"always"', "1"):
        path.write_text(f"[daemon]\nbatch_invariant = {bad}\n")
        with pytest.raises(ConfigError, match="batch_invariant"):
            load_config(path)


def _check_rows(argsets, rows, steps=4):
    a = [Sampler(x) for x in argsets]
    b = [Sampler(x) for x in argsets]
    for step in range(steps):
        want = [s.sample(r) for s, r in zip(a, rows)]
        got = sample_rows(b, rows)
        assert got == want, step
        for sa, sb in zip(a, b):
            assert torch.equal(sa.counts, sb.counts) and torch.equal(sa.present, sb.present)
            if sa.args.seed is not None:          # a drawn row advanced both RNGs alike
                assert torch.equal(sa.generator.get_state(), sb.generator.get_state())
        rows = [r.roll(step + 1) for r in rows]


def test_sample_rows_equals_one_sampler_at_a_time():
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randn(256, generator=gen) for _ in range(6)]
    rows[2][17] = rows[2].max() + 1               # a sure maximum
    plain = dict(temperature=0, alpha_frequency=0, alpha_presence=0)
    argsets = [SamplerArgs(**plain),
               SamplerArgs(**plain, token_stop=(17,)),
               SamplerArgs(**plain),
               SamplerArgs(temperature=0),                           # penalties: the full path
               SamplerArgs(temperature=1.0, top_p=0.9, seed=5),      # drawn: the full path
               SamplerArgs(**plain, token_ban=(3,))]                 # a ban: the full path
    _check_rows(argsets, rows)
    # rows of one batched step (views of one [B, vocab] tensor), as the decoder returns them
    _check_rows(argsets, list(torch.stack(rows)))


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
