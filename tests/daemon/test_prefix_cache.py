"""The prefix cache of stateless chat requests and how messages are rendered (no daemon process).

The states are the engine's own (the tiny RWKV-7 model); expected logits come from the engine reading the whole
prompt from the zero state.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.daemon import stateless
from rwkv_chat.daemon.config import ConfigError, load_config
from rwkv_chat.daemon.prefix_cache import BLOCK, PrefixCache, state_bytes
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.models.text.templates import RWKV_CHAT


@pytest.fixture(scope="module")
def model(model_path):
    from rwkv_chat.models import RWKV

    return RWKV(model=str(model_path("7")), strategy="cpu fp32", verbose=False)


def tokens_of(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def test_a_hit_continues_exactly_where_the_prefix_ended(model):
    cache = PrefixCache(1 << 30)
    prompt = tokens_of(3 * BLOCK + 10)
    for cut in (BLOCK - 5, 2 * BLOCK, 2 * BLOCK + 7):         # entries inside blocks and on a boundary
        logits, state = model.forward(prompt[:cut], None)
        assert cache.store(prompt[:cut], model.fingerprint, state, logits)
    hit = cache.lookup(prompt, model.fingerprint)
    assert hit.length == 2 * BLOCK + 7                        # the longest stored prefix
    logits, _ = model.forward(prompt[hit.length:], hit.state)
    want, _ = model.forward(prompt, None)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    # a query equal to a stored prefix gets its logits (nothing left to read)
    exact = cache.lookup(prompt[:2 * BLOCK], model.fingerprint)
    assert exact.length == 2 * BLOCK
    torch.testing.assert_close(exact.logits, model.forward(prompt[:2 * BLOCK], None)[0])
    st = cache.stats()
    assert (st["hits"], st["misses"], st["entries"]) == (2, 0, 3)
    assert st["cached_tokens"] == 4 * BLOCK + 7 and st["prefilled_tokens"] == BLOCK + 3


def test_lookups_miss_what_was_never_stored(model):
    cache = PrefixCache(1 << 30)
    prompt = tokens_of(BLOCK + 20)
    logits, state = model.forward(prompt, None)
    cache.store(prompt, model.fingerprint, state, logits)
    other = list(prompt)
    other[3] = (other[3] + 1) % 256                           # differs inside the first block
    assert cache.lookup(other, model.fingerprint).state is None
    assert cache.lookup(prompt[:BLOCK + 19], model.fingerprint).state is None   # shorter than any entry
    assert cache.lookup(prompt, "another model").state is None
    assert cache.stats()["misses"] == 3 and cache.stats()["hits"] == 0


def test_hits_are_private_copies(model):
    cache = PrefixCache(1 << 30)
    prompt = tokens_of(12)
    logits, state = model.forward(prompt, None)
    cache.store(prompt, model.fingerprint, state, logits)
    hit = cache.lookup(prompt, model.fingerprint)
    for layer in hit.state.layers:
        for t in layer:
            t.add_(1.0)
    hit.logits.zero_()
    again = cache.lookup(prompt, model.fingerprint)
    torch.testing.assert_close(again.logits, logits)
    for a, b in zip(again.state.layers, state.layers):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y)


def test_least_recently_used_go_first_within_the_budget(model):
    prompts = [tokens_of(20, seed) for seed in range(4)]
    entries = [model.forward(p, None) for p in prompts]
    size = state_bytes(entries[0][1]) + entries[0][0].numel() * 4 + 20 * 8
    cache = PrefixCache(3 * size)
    for p, (logits, state) in zip(prompts[:3], entries[:3]):
        cache.store(p, model.fingerprint, state, logits)
    assert cache.lookup(prompts[0], model.fingerprint).length == 20       # 0 is now the most recent
    cache.store(prompts[3], model.fingerprint, entries[3][1], entries[3][0])
    assert cache.stats()["entries"] == 3 and cache.stats()["bytes"] <= 3 * size
    assert cache.lookup(prompts[1], model.fingerprint).state is None      # the least recently used went
    assert all(cache.lookup(prompts[i], model.fingerprint).length == 20 for i in (0, 2, 3))
    assert not PrefixCache(0).store(prompts[0], model.fingerprint, entries[0][1], entries[0][0])  # off
    assert not PrefixCache(size // 2).store(prompts[0], model.fingerprint, entries[0][1], entries[0][0])
    cache.clear()
    assert cache.stats()["entries"] == 0 and cache.stats()["bytes"] == 0


def test_messages_render_as_the_daemon_stores_conversations():
    from rwkv_chat.models.text.tokenizers import load_tokenizer

    tok = load_tokenizer(vocab_size=256)
    msgs = [m.ChatMessage("system", "Be brief."), m.ChatMessage("user", "Hi"),
            m.ChatMessage("assistant", "  Hello!  "), m.ChatMessage("user", "Bye")]
    text = RWKV_CHAT.transcript("Be brief.", [("Hi", "Hello!")]) + RWKV_CHAT.prompt("Bye")
    assert "".join(stateless.segments(RWKV_CHAT, msgs)) == text
    assert stateless.render(RWKV_CHAT, tok, msgs) == tok.encode(text)
    joined = [m.ChatMessage("user", "a"), m.ChatMessage("user", "b")]
    assert stateless.segments(RWKV_CHAT, joined) == [RWKV_CHAT.prompt("a\nb")]


@pytest.mark.parametrize("msgs, what", [
    ([], "empty"),
    ([m.ChatMessage("user", "a"), m.ChatMessage("assistant", "b")], "end with a user message"),
    ([m.ChatMessage("tool", "a")], "role"),
    ([m.ChatMessage("user", "x" * (m.MAX_TEXT + 1))], "content"),
])
def test_chat_messages_limits(msgs, what):
    with pytest.raises(m.LimitError, match=what):
        m.check_request(m.ChatMessages(client_id="c", topic="t", messages=msgs))


def test_config_http_section_and_cache_budget(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[http]\nlisten = "0.0.0.0:8080"\napi_key = "k"\n[daemon]\nprefix_cache_bytes = 0\n')
    cfg = load_config(path)
    assert (cfg.http.listen, cfg.http.api_key, cfg.daemon.prefix_cache_bytes) == ("0.0.0.0:8080", "k", 0)
    path.write_text("[daemon]\nprefix_cache_bytes = -1\n")
    with pytest.raises(ConfigError, match="prefix_cache_bytes"):
        load_config(path)


def test_a_failing_cache_costs_only_the_cache(model):
    """Out of memory while copying a state: the request goes on (a miss), and the cache is emptied."""
    from types import SimpleNamespace

    from rwkv_chat.daemon.sessions import Sessions

    class OOMState:
        def nbytes(self):
            return 10

        def clone(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    sessions = Sessions(store=None, prefix_bytes=1 << 30)
    prompt = tokens_of(10)
    logits, state = model.forward(prompt, None)
    sessions.prefix.store(prompt, model.fingerprint, state, logits)
    sessions.prefix.store(prompt[:5], model.fingerprint, OOMState(), logits, copy=False)
    gen = SimpleNamespace(id="j1", sessions=sessions, host=SimpleNamespace(model=model), prompt=prompt[:5],
                          state=OOMState(), logits=logits, out_tokens=[])
    stateless.prompt_read(gen)                       # copying fails: logged, nothing raised
    assert sessions.prefix.stats()["entries"] == 0   # out of memory: the cache let go of its states
    from rwkv_chat.models.text.tokenizers import load_tokenizer

    tok = load_tokenizer(vocab_size=256)
    msgs = [m.ChatMessage("user", "hi")]
    sessions.prefix.store(stateless.render(RWKV_CHAT, tok, msgs), model.fingerprint, OOMState(), logits, copy=False)
    gen = SimpleNamespace(id="j2", sessions=sessions, host=SimpleNamespace(model=model), config=SimpleNamespace(
        sampling_base=lambda defaults: SimpleNamespace(updated=lambda given: given)), state=None, logits=None, pos=0, cached=0,
        request=m.ChatMessages(client_id="c", topic="t", messages=msgs))
    stateless.start(gen, model, tok, RWKV_CHAT, {})                    # the hit's copy fails
    assert gen.cached == 0 and gen.pos == 0 and gen.state is not None     # read from the zero state
    assert sessions.prefix.stats()["entries"] == 0
