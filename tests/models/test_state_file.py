"""The state file format both State and KVState use (models/state_file.py): round trips and the StateError of
every kind of bad file, naming the file and the field."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rwkv_chat.models.errors import StateError
from rwkv_chat.models.qwen2.cache import KVState
from rwkv_chat.models.state import State
from rwkv_chat.models.state_file import open_state_file


def _rwkv_state() -> State:
    g = torch.Generator().manual_seed(0)
    layers = [(torch.randn(2, 8, generator=g), torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 8, generator=g))
              for _ in range(3)]
    return State("7", "fp-rwkv", ("att_x", "att_kv", "ffn_x"), layers, 5, {"note": "hi"})


def _kv_state() -> KVState:
    g = torch.Generator().manual_seed(1)
    layers = [tuple(torch.randn(1, 2, 5, 4, generator=g).to(torch.bfloat16) for _ in range(2)) for _ in range(2)]
    return KVState("2", "fp-qwen", ("k", "v"), layers, 5, {"note": "x"}, tokens=torch.arange(5).view(1, 5) + 7)


def _contents(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def test_both_states_come_back_as_saved(tmp_path):
    st, kv = _rwkv_state(), _kv_state()
    a, b = State.load(st.save(tmp_path / "a.safetensors")), KVState.load(kv.save(tmp_path / "b.safetensors"))
    for want, got in ((st, a), (kv, b)):
        assert (got.version, got.fingerprint, got.names, got.token_count, got.metadata) == \
               (want.version, want.fingerprint, want.names, want.token_count, want.metadata)
        for lw, lg in zip(want.layers, got.layers, strict=True):
            for tw, tg in zip(lw, lg, strict=True):
                assert tg.dtype == tw.dtype and torch.equal(tg, tw)
    assert torch.equal(b.tokens, kv.tokens)
    generic = State.load(tmp_path / "b.safetensors")          # a KV cache file reads as a plain State too
    assert type(generic) is State and generic.names == ("k", "v") and generic.metadata == {**kv.metadata,
                                                                                          "kind": "kv-cache",
                                                                                          "dtype": "bfloat16"}


def test_a_state_file_of_another_kind_is_refused_by_name(tmp_path):
    path = _rwkv_state().save(tmp_path / "rwkv.safetensors")
    with pytest.raises(StateError, match=re.escape(f"{path} is not a KV cache state file "
                                                   "(format 'rwkv-chat-state/1', kind None)")):
        KVState.load(path)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something/2"})
    with pytest.raises(StateError, match=re.escape(f"{other} is not an rwkv-chat state file (format 'something/2')")):
        State.load(other)
    with pytest.raises(StateError, match="state file not found"):
        State.load(tmp_path / "none.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(StateError, match="cannot read state file"):
        KVState.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("damage, field", [
    (lambda m, t: ({k: v for k, v in m.items() if k != "fingerprint"}, t), "fingerprint"),
    (lambda m, t: ({**m, "batch": "two"}, t), "batch"),
    (lambda m, t: ({**m, "dtype": "float64"}, t), "dtype"),
    (lambda m, t: (m, {k: v for k, v in t.items() if k != "tokens"}), "tokens"),
    (lambda m, t: (m, {**t, "tokens": t["tokens"].to(torch.int32)}), "tokens"),
    (lambda m, t: (m, {k: v for k, v in t.items() if k != "layers.1.v"}), "layers.1.v"),
    (lambda m, t: (m, {**t, "layers.0.k": t["layers.0.k"].float()}), "layers.0.k"),
])
def test_a_bad_kv_cache_file_is_a_state_error_naming_file_and_field(tmp_path, damage, field):
    meta, tensors = _contents(_kv_state().save(tmp_path / "good.safetensors"))
    meta, tensors = damage(meta, tensors)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(StateError, match=re.escape(str(path)) + f".*'{re.escape(field)}'"):
        KVState.load(path)


def test_errors_of_the_reading_block_name_the_file(tmp_path):
    path = _rwkv_state().save(tmp_path / "a.safetensors")
    with pytest.raises(StateError, match=re.escape(f"state file {path}: no good")):
        with open_state_file(path):
            raise StateError("no good")
    with pytest.raises(StateError, match=re.escape(f"cannot read state file {path}: boom")):
        with open_state_file(path):
            raise RuntimeError("boom")
    with open_state_file(path) as sf:
        assert (sf.version, sf.fingerprint, sf.n_layer, sf.batch, sf.token_count) == ("7", "fp-rwkv", 3, 2, 5)
        assert sf.user() == {"note": "hi"} and "layers.2.ffn_x" in sf.keys
