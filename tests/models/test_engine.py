"""Engine behaviour on the real tiny models: sequence vs one-by-one, batch vs single, state clone and
save/load, mixed-dtype and i8 strategies against the reference package, several generations in one process."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from rwkv_chat.models import RWKV, State, StateError, TokenError

from .golden import cached_reference

VERSIONS = ["4", "5", "5.2", "6", "7"]
PROMPT = list(b"\nIn a shocking finding, scientists discovered a herd of dragons.")


@pytest.fixture(scope="module", params=VERSIONS)
def model(request, model_path):
    return RWKV(model_path(request.param), "cpu fp32")


def test_sequence_equals_one_by_one(model):
    seq, s_seq = model.forward(PROMPT, None, full_output=True)
    state, rows = None, []
    for t in PROMPT:
        logits, state = model.forward([t], state)
        rows.append(logits)
    assert torch.allclose(seq, torch.stack(rows), atol=2e-5, rtol=1e-5)
    for a, b in zip(s_seq, state):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5)
    assert s_seq.token_count == state.token_count == len(PROMPT)


def test_chunked_sequence_equals_whole(model):
    whole, _ = model.forward(PROMPT, None)
    state = None
    for i in range(0, len(PROMPT), 7):
        logits, state = model.forward(PROMPT[i:i + 7], state)
    assert torch.allclose(whole, logits, atol=2e-5, rtol=1e-5)


def test_batch_equals_single(model):
    rng = random.Random(7)
    rows = [[rng.randrange(256) for _ in range(9)] for _ in range(3)]
    batched, bstate = model.forward_batch(rows, None)
    for b, row in enumerate(rows):
        single, sstate = model.forward(row, None)
        assert torch.allclose(batched[b], single, atol=2e-5, rtol=1e-5)
        for x, y in zip(bstate.unbind()[b], sstate):
            assert torch.allclose(x, y, atol=2e-5, rtol=1e-5)
    parts = [model.forward(r, None)[1] for r in rows]
    stacked = State.stack(parts)
    nxt, _ = model.forward_batch([[1], [2], [3]], stacked)
    for b in range(3):
        one, _ = model.forward([b + 1], parts[b])
        assert torch.allclose(nxt[b], one, atol=2e-5, rtol=1e-5)


def test_forward_does_not_modify_given_state_and_clone_is_independent(model):
    _, state = model.forward(PROMPT[:10], None)
    before = [t.clone() for t in state]
    copy = state.clone()
    a, s1 = model.forward(PROMPT[10:20], state)
    for x, y in zip(before, state):
        assert torch.equal(x, y)
    b, s2 = model.forward(PROMPT[10:20], copy)
    assert torch.equal(a, b)
    copy.layers[0][0].fill_(3.0)
    assert torch.equal(state.layers[0][0], before[0].unsqueeze(0))


def test_state_save_load_identical_continuation(model, tmp_path):
    _, state = model.forward(PROMPT, None)
    path = state.save(tmp_path / "s.safetensors", {"note": "hello"})
    loaded = model.load_state(path)
    assert loaded.token_count == len(PROMPT) and loaded.metadata["note"] == "hello"
    def greedy(st, n=40):
        logits, st = model.forward([10], st)
        out = []
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits, st = model.forward([out[-1]], st)
        return out
    assert greedy(state) == greedy(loaded)
    assert list(tmp_path.iterdir()) == [path]  # no temp files left behind


def test_reference_flat_state_layout(model):
    _, state = model.forward(PROMPT[:5], None)
    per_layer = 5 if model.version == "4" else 3
    assert len(state) == model.n_layer * per_layer
    assert state[0].shape == (model.n_embd,)


def test_state_of_another_model_is_refused(model_path, tmp_path):
    a = RWKV(model_path("5.2"), "cpu fp32")
    b = RWKV(model_path("6"), "cpu fp32")
    _, sa = a.forward([1, 2, 3], None)
    with pytest.raises(StateError, match="another model"):
        b.forward([4], sa)
    sa.save(tmp_path / "a.safetensors")
    with pytest.raises(StateError):
        b.load_state(tmp_path / "a.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(StateError):
        a.load_state(tmp_path / "bad.safetensors")


def test_a_state_file_with_a_bad_field_is_a_state_error_naming_file_and_field(model_path, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    a = RWKV(model_path("5.2"), "cpu fp32")
    _, state = a.forward([1, 2, 3], None)
    good = state.save(tmp_path / "good.safetensors")
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    cases = {"version": {k: v for k, v in meta.items() if k != "version"}, "token_count": {**meta, "token_count": "abc"},
             "names": {**meta, "names": "{"}, "n_layer": {**meta, "n_layer": "-1"}}
    for field, bad_meta in cases.items():
        path = tmp_path / f"bad-{field}.safetensors"
        save_file(tensors, str(path), metadata=bad_meta)
        with pytest.raises(StateError, match=re.escape(str(path)) + f".*'{field}'"):
            a.load_state(path)
    path = tmp_path / "missing-tensor.safetensors"
    save_file({k: t for k, t in tensors.items() if k != "layers.1.att_kv"}, str(path), metadata=meta)
    with pytest.raises(StateError, match="layers.1.att_kv"):
        a.load_state(path)


def test_several_generations_in_one_process(model_path):
    models = {v: RWKV(model_path(v), "cpu fp32") for v in VERSIONS}
    outs = {v: m.forward(PROMPT[:8], None)[0] for v, m in models.items()}
    # interleave: each still gives its own answer
    for v, m in reversed(list(models.items())):
        assert torch.equal(m.forward(PROMPT[:8], None)[0], outs[v])


@pytest.mark.parametrize("tokens", [[], [256], [-1], [1, 2, 99999], ["a"], [1.5]])
def test_bad_tokens(model, tokens):
    with pytest.raises(TokenError):
        model.forward(tokens, None)


# -- strategies against the reference package --------------------------------------------------------

JOBS = [{"prompt": PROMPT, "full_output": False, "greedy": 0}, {"prompt": list(b"Hi there"), "greedy": 0}]


@pytest.mark.parametrize("version", ["4", "5", "5.2", "6"])
@pytest.mark.parametrize("strategy,tol", [("cpu fp32 *2 -> cpu bf16", 0.25), ("cpu fp32i8", 2e-3),
                                          ("cpu bf16i8 *1 -> cpu fp32", 0.25)])
def test_strategy_matches_reference(model_path, version, strategy, tol):
    path = model_path(version)
    ref = cached_reference(str(path), strategy, version, json.dumps(JOBS))
    model = RWKV(path, strategy)
    for job, r in zip(JOBS, ref):
        logits, _ = model.forward(job["prompt"], None)
        expected = torch.tensor(r["logits"])
        err = (logits - expected).abs().max().item()
        assert err <= tol * max(1.0, expected.abs().max().item()), f"{strategy} v{version}: err {err}"


def _i8_bound(model_fp32: RWKV, model_i8: RWKV) -> float:
    """Largest per-element dequantization error over all quantized weights (the i8 scheme's bound)."""
    from rwkv_chat.models.formats.i8 import Int8Weight

    worst = 0.0
    for p8, p32 in zip(model_i8.layers, model_fp32.layers):
        for k, w in p8.items():
            if isinstance(w, Int8Weight):
                worst = max(worst, (w.dequantize(torch.float32) - p32[k]).abs().max().item())
    return worst


@pytest.mark.parametrize("version", VERSIONS)
def test_i8_within_error_bound(model_path, version):
    path = model_path(version)
    fp32, i8 = RWKV(path, "cpu fp32"), RWKV(path, "cpu fp32i8")
    from rwkv_chat.models.formats.i8 import Int8Weight

    for p8, p32 in zip(i8.layers, fp32.layers):
        for k, w in p8.items():
            if isinstance(w, Int8Weight):
                # each element is within one quantization step of its row/column range
                step = (w.rx.float() * 16) * (w.ry.float() * 16) / 256
                assert ((w.dequantize(torch.float32) - p32[k]).abs() <= step * 1.01 + 1e-6).all(), k
    assert _i8_bound(fp32, i8) > 0  # something was quantized
    a, _ = fp32.forward(PROMPT, None)
    b, _ = i8.forward(PROMPT, None)
    # logits stay close relative to their spread; the argmax distribution agrees in most positions
    assert (a - b).abs().max().item() < 0.1 * (a.max() - a.min()).item()


def test_mixed_bf16_v7_within_tolerance(model_path):
    path = model_path("7")
    a, _ = RWKV(path, "cpu fp32").forward(PROMPT, None)
    b, _ = RWKV(path, "cpu fp32 *2 -> cpu bf16").forward(PROMPT, None)
    c, _ = RWKV(path, "cpu bf16").forward(PROMPT, None)
    spread = (a.max() - a.min()).item()
    assert (a - b).abs().max().item() < 0.05 * spread
    assert (a - c).abs().max().item() < 0.05 * spread


def test_fp16_rescale_matches_reference(model_path):
    path = model_path("5.2")
    ref = cached_reference(str(path), "cpu fp16", "5.2", json.dumps(JOBS))
    model = RWKV(path, "cpu fp16")
    assert model.rescale_layer == 6
    logits, _ = model.forward(JOBS[0]["prompt"], None)
    assert (logits - torch.tensor(ref[0]["logits"])).abs().max().item() < 0.05


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (4, 6)])
def test_i8_degenerate_weights_stay_finite(shape):
    """Constant rows/columns (range 0) must not divide by zero (the reference yields NaN there)."""
    from rwkv_chat.models.formats.i8 import quantize_i8

    w = torch.full(shape, 0.25) if shape == (4, 6) else torch.randn(shape)
    q = quantize_i8(w, torch.float32)
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    assert (deq - w).abs().max().item() <= 1 / 256 + 1e-6
