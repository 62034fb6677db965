"""The decode paths (static buffers / CUDA graph / batching) against the plain ``RWKV.forward`` path."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import RWKV, StateError, TokenError
from rwkv_chat.models.rwkv.decode import BatchDecoder, decode_greedy


def _plain_greedy(model, logits, state, n):
    out = []
    for _ in range(n):
        tok = int(torch.argmax(logits))
        out.append(tok)
        logits, state = model.forward([tok], state)
    return out, logits, state


@pytest.mark.parametrize("version", ["7", "6", "5.2", "4"])
def test_decoder_same_tokens_as_plain(model_path, version):
    model = RWKV(model_path(version), "cpu fp32")
    logits, state = model.forward(list(b"Once upon a time"), None)
    want, last, want_state = _plain_greedy(model, logits, state, 24)
    dec = BatchDecoder(model, max_batch=1)
    assert decode_greedy(model, logits, state, 24, dec) == want
    # the state left by the decoder equals the plain path's
    h = dec.add(state)
    for tok in want:
        out = dec.step({h: tok})[h]
    got = dec.remove(h)
    assert torch.allclose(out, last, rtol=1e-5, atol=1e-5)
    assert got.token_count == want_state.token_count
    for a, b in zip(got, want_state):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batch_independence(model_path):
    """A conversation's tokens do not depend on which others share its steps, nor on joins, leaves and
    conversations that skip a step."""
    model = RWKV(model_path("7"), "cpu fp32")
    logits, state = model.forward(list(b"The capital of France"), None)
    want, _, _ = _plain_greedy(model, logits, state, 30)

    dec = BatchDecoder(model, max_batch=4, buckets=(1, 2, 4))
    others = [dec.add(model.forward(list(p), None)[1]) for p in (b"abc", b"0123456789")]
    h = dec.add(state)
    got, l, late = [], logits, None
    for i in range(30):
        tok = int(torch.argmax(l))
        got.append(tok)
        step = {h: tok}
        if i % 3:                                   # the others sometimes skip a step
            step.update({o: 97 + i for o in others})
        if late is not None:
            step[late] = 65
        out = dec.step(step)
        l = out[h]
        if i == 10:
            dec.remove(others.pop(0))               # a leave moves the last slot into the hole
        if i == 15:
            late = dec.add(None)                    # a join
    assert got == want
    # batched forward_batch gives the same next-token logits as one at a time
    s2 = model.forward(list(b"xyz"), None)[1]
    from rwkv_chat.models import State
    lb, _ = model.forward_batch([[5], [7]], State.stack([state, s2]))
    assert torch.allclose(lb[0], model.forward([5], state)[0], rtol=1e-5, atol=1e-5)
    assert torch.allclose(lb[1], model.forward([7], s2)[0], rtol=1e-5, atol=1e-5)


def test_decoder_errors(model_path):
    model = RWKV(model_path("7"), "cpu fp32")
    dec = BatchDecoder(model, max_batch=1)
    h = dec.add(None)
    with pytest.raises(StateError):
        dec.add(None)                               # no free slot
    with pytest.raises(TokenError):
        dec.step({h: model.vocab_size})
    dec.remove(h)
    with pytest.raises(StateError):
        dec.step({h: 1})                            # stale handle
    with pytest.raises(StateError, match="ffn"):
        BatchDecoder(model, max_batch=1, ffn="sprase")   # not a value product of the fused step
    assert BatchDecoder(model, max_batch=1, ffn="dense").ffn is None      # no fused step on CPU: nothing to pick


@pytest.mark.parametrize("version", ["7", "5.2"])
def test_greedy_on_device_equals_host_loop(model_path, version):
    """``BatchDecoder.greedy`` (argmax fed back without the host) picks the host loop's tokens for every
    fed conversation, leaves a conversation it does not feed untouched, and counts tokens as ``step``."""
    model = RWKV(model_path(version), "cpu fp32")
    prompts = (b"Once upon a time", b"The capital of France", b"0123")
    starts = [model.forward(list(p), None) for p in prompts]
    want = [_plain_greedy(model, lg, st, 12) for lg, st in starts[:2]]
    dec = BatchDecoder(model, max_batch=4, buckets=(1, 2, 4))
    fed = [dec.add(st) for _, st in starts[:2]]
    idle = dec.add(starts[2][1])
    firsts = {h: int(torch.argmax(lg)) for h, (lg, _) in zip(fed, starts)}
    got = dec.greedy(firsts, 11)
    for h, (toks, _, _) in zip(fed, want):
        assert [firsts[h]] + got[h] == toks
    # the fed conversations consumed their first token and 10 of the 11 returned ones
    for i, (h, (toks, _, _)) in enumerate(zip(fed, want)):
        st = dec.state(h)
        assert st.token_count == starts[i][1].token_count + 11
        _, ref_state = model.forward(toks[:11], starts[i][1])
        for a, b in zip(st, ref_state):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(dec.state(idle), starts[2][1]):
        assert torch.equal(a, b)
    with pytest.raises(StateError):
        dec.greedy(firsts, 0)
    with pytest.raises(TokenError):
        dec.greedy({fed[0]: model.vocab_size}, 2)
