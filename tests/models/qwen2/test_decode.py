"""The batched decoder: conversations of different cache lengths in one step equal each one alone."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.errors import StateError, TokenError
from rwkv_chat.models.qwen2.cache import KVState
from rwkv_chat.models.qwen2.model import Qwen2

from .conftest import continue_greedy


def alone(model, prompt, n):
    return continue_greedy(model, *model.forward(prompt, None), n)


@pytest.mark.parametrize("variant", ("tied", "qwen3"))
def test_batched_decode_of_different_lengths_equals_each_alone(qwen_folders, variant):
    model = Qwen2(qwen_folders[variant][0], "cpu fp32", kernels=False)
    prompts = [[5], list(range(40, 77)), list(range(100, 112))]
    expected = [alone(model, p, 20) for p in prompts]
    dec = model.decoder(4, buckets=(1, 2, 4))
    feed, handles = {}, []
    for p in prompts:
        logits, state = model.forward(p, None)
        h = dec.add(state)
        handles.append(h)
        feed[h] = int(logits.argmax())
    got = {h: [feed[h]] for h in handles}
    for _ in range(19):
        out = dec.step(feed)
        feed = {h: int(x.argmax()) for h, x in out.items()}
        for h in handles:
            got[h].append(feed[h])
    out = dec.step(feed)
    for h, (tokens, logits) in zip(handles, expected):
        assert got[h] == tokens
        assert torch.allclose(out[h], logits, atol=1e-5, rtol=0)
    state = dec.remove(handles[1])
    assert isinstance(state, KVState) and state.token_count == 37 + 20
    assert state.tokens[0].tolist() == prompts[1] + got[handles[1]]
    assert dec.size == 2 and sorted(dec.handles()) == sorted([handles[0], handles[2]])


def test_decoder_steps_a_subset_and_moves_slots(qwen_folders):
    model = Qwen2(qwen_folders["tied"][0], "cpu fp32", kernels=False)
    dec = model.decoder(3)
    a, b, c = dec.add(None), dec.add(model.forward([1, 2, 3], None)[1]), dec.add(None)
    dec.step({a: 4, c: 5})                       # b is not fed: its cache stays
    dec.remove(a)                                # c moves into a's slot
    out = dec.step({b: 6, c: 7})
    assert torch.allclose(out[b], model.forward([1, 2, 3, 6], None)[0], atol=1e-5, rtol=0)
    assert torch.allclose(out[c], model.forward([5, 7], None)[0], atol=1e-5, rtol=0)
    # the greedy helper equals steps with the argmax fed back
    g = dec.greedy({b: 8}, 3)[b]
    ref, _ = alone(model, [1, 2, 3, 6, 8], 3)
    assert g == ref
    with pytest.raises(TokenError):
        dec.step({b: model.vocab_size})
    with pytest.raises(StateError):
        dec.step({a: 1})
    dec.add(None)
    with pytest.raises(StateError, match="slots"):
        dec.add(None)


def test_decoder_grows_past_one_chunk(qwen_folders):
    from rwkv_chat.models.qwen2 import cache

    model = Qwen2(qwen_folders["untied"][0], "cpu fp32", kernels=False)
    prompt = list(range(cache.CHUNK - 2))
    logits, state = model.forward(prompt, None)
    dec = model.decoder(2)
    h = dec.add(state)
    tokens, t = [], int(logits.argmax())
    for _ in range(5):
        tokens.append(t)
        t = int(dec.step({h: t})[h].argmax())
    assert dec.capacity > cache.CHUNK
    ref, _ = alone(model, prompt, 6)
    assert tokens + [t] == ref
    short = dec.add(model.forward([1, 2], None)[1])
    dec.remove(h)                                   # the long one leaves: steps attend over one chunk again
    assert torch.allclose(dec.step({short: 3})[short], model.forward([1, 2, 3], None)[0], atol=1e-5, rtol=0)
