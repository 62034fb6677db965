"""The KV cache as the conversation state: save -> load -> the same continuation, branches that do not disturb each
other, refusal on another model, the context limit."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.errors import ContextLimitError, StateError
from rwkv_chat.models.qwen2.cache import KVState
from rwkv_chat.models.qwen2.model import Qwen2
from rwkv_chat.models.state import State

from .conftest import continue_greedy


def test_saved_state_resumes_identically(qwen_folders, tmp_path):
    model = Qwen2(qwen_folders["untied"][0], "cpu fp32", kernels=False)
    ids = list(range(5, 30))
    logits, state = model.forward(ids, None)
    path = state.save(tmp_path / "s.safetensors", metadata={"note": "x"})
    expected, last = continue_greedy(model, logits, state, 16)
    fresh = Qwen2(qwen_folders["untied"][0], "cpu fp32", kernels=False)
    loaded = fresh.load_state(path)
    assert isinstance(loaded, KVState) and loaded.token_count == len(ids)
    assert loaded.tokens[0].tolist() == ids and loaded.metadata["note"] == "x"
    got, last2 = continue_greedy(fresh, logits, loaded, 16)
    assert got == expected and torch.equal(last, last2)
    generic = State.load(path)                  # the daemon's export reads it as a plain State
    assert generic.names == ("k", "v") and generic.token_count == len(ids)


def test_state_file_keeps_only_the_filled_part_in_its_dtype(qwen_folders, tmp_path):
    from safetensors import safe_open

    model = Qwen2(qwen_folders["tied"][0], "cpu bf16", kernels=False)
    _, state = model.forward([1, 2, 3], None)
    assert state.buffer.capacity > 3
    path = state.save(tmp_path / "s.safetensors")
    with safe_open(str(path), "pt") as f:
        k = f.get_tensor("layers.0.k")
        assert k.dtype == torch.bfloat16 and k.shape[2] == 3
        assert f.metadata()["fingerprint"] == model.fingerprint and f.metadata()["dtype"] == "bfloat16"


def test_branches_from_one_state_do_not_disturb_each_other(qwen_folders):
    model = Qwen2(qwen_folders["tied"][0], "cpu fp32", kernels=False)
    _, base = model.forward([3, 1, 4], None)
    a_logits, a = model.forward([1, 5], base)
    b_logits, b = model.forward([9, 2, 6], base)          # writes where a's tokens lie in a shared buffer
    def same(x, y):
        return torch.allclose(x, y, atol=1e-5, rtol=0)

    assert same(a_logits, model.forward([3, 1, 4, 1, 5], None)[0])
    assert same(b_logits, model.forward([3, 1, 4, 9, 2, 6], None)[0])
    assert same(model.forward([7], a)[0], model.forward([3, 1, 4, 1, 5, 7], None)[0])
    assert same(model.forward([7], b)[0], model.forward([3, 1, 4, 9, 2, 6, 7], None)[0])
    assert base.token_count == 3 and a.token_count == 5 and b.token_count == 6
    c = a.clone()
    assert c.buffer is None and torch.equal(c.layers[0][0], a.layers[0][0])
    moved = a.to("cpu")
    assert isinstance(moved, KVState) and moved.tokens[0].tolist() == [3, 1, 4, 1, 5]
    assert isinstance(a.with_layers(a.layers), KVState)


def test_state_of_another_model_is_refused(qwen_folders, tmp_path):
    one = Qwen2(qwen_folders["tied"][0], "cpu fp32", kernels=False)
    other = Qwen2(qwen_folders["untied"][0], "cpu fp32", kernels=False)
    assert one.fingerprint != other.fingerprint
    _, state = one.forward([1, 2], None)
    with pytest.raises(StateError, match="another model"):
        other.forward([3], state)
    path = state.save(tmp_path / "s.safetensors")
    with pytest.raises(StateError, match="s.safetensors"):
        other.load_state(path)
    rwkv_like = State("7", one.fingerprint, ("att_x",), [(torch.zeros(1, 4),)])
    with pytest.raises(StateError):
        one.forward([1], rwkv_like)
    rwkv_like.save(tmp_path / "r.safetensors")
    with pytest.raises(StateError, match="not a KV cache"):
        one.load_state(tmp_path / "r.safetensors")


def test_context_limit(qwen_folders):
    model = Qwen2(qwen_folders["tied"][0], "cpu fp32", kernels=False, context_limit=10)
    assert model.context_limit == 10
    assert Qwen2(qwen_folders["tied"][0], "cpu fp32", kernels=False, context_limit=10**6).context_limit == 256
    _, state = model.forward(list(range(8)), None)
    _, state = model.forward([8, 9], state)
    with pytest.raises(ContextLimitError) as e:
        model.forward([10], state)
    assert isinstance(e.value, StateError) and e.value.limit == 10 and e.value.needed == 11
    dec = model.decoder(2)
    h = dec.add(state)
    with pytest.raises(ContextLimitError):
        dec.step({h: 1})
    other = dec.add(model.forward([1, 2], None)[1])       # steps beside a full slot that is not fed
    assert torch.allclose(dec.step({other: 3})[other], model.forward([1, 2, 3], None)[0], atol=1e-5, rtol=0)


def test_daemon_sessions_spill_and_restore_keep_a_kv_cache(qwen_folders):
    from rwkv_chat.daemon.sessions import _restore, _spill

    model = Qwen2(qwen_folders["tied"][0], "cpu bf16", kernels=False)
    _, state = model.forward([4, 5, 6], None)
    spilled, placement = _spill(state)
    back = _restore(spilled, placement)
    assert isinstance(back, KVState) and back.tokens[0].tolist() == [4, 5, 6]
    assert back.layers[0][0].dtype == torch.bfloat16
    assert torch.equal(model.forward([7], back)[0], model.forward([7], state.clone())[0])
    plain = State("7", "f", ("att_x",), [(torch.ones(1, 4, dtype=torch.bfloat16),)], 5, {"a": "b"})
    again = _restore(*_spill(plain))
    assert type(again) is State and again.token_count == 5 and again.layers[0][0].dtype == torch.bfloat16
