"""Prompt states shared across conversations (tiny RWKV-7, greedy): the state after a system prompt is read
once and reused by every conversation that starts with it, from RAM and, after a restart, from disk; each
conversation gets the reply computed from scratch; the tiers keep to their byte budgets."""

from __future__ import annotations

from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.models.text.templates import RWKV_CHAT

from .conftest import GREEDY, done, greedy, module_daemon, start_daemon, stop_daemon

PRESET = "You are a helpful assistant. Answer in one short sentence, plainly and kindly."


home = module_daemon("prompts", "7")


def fresh(model, message: str) -> str:
    """The engine's greedy reply to ``message`` under the preset, read from scratch."""
    text = RWKV_CHAT.transcript(PRESET, []) + RWKV_CHAT.prompt(message)
    return greedy(model, text, GREEDY["max_tokens"]).split(RWKV_CHAT.stop)[0].strip()


def test_a_preset_state_is_shared_by_conversations_and_survives_a_restart(home, model_path):
    model = model_path("7")
    head = len(RWKV_CHAT.transcript(PRESET, []).encode())     # bytes vocabulary: one token per byte
    with Client(home_paths(home), autostart=False) as c:
        a = c.create_conversation(system_prompt=PRESET, **GREEDY).id
        first = done(c.chat(a, "Hello"))
        assert first.cached_tokens == 0 and first.prompt_tokens == head + len(RWKV_CHAT.prompt("Hello").encode())
        for message in ("Hello", "What is a cat?"):
            b = c.create_conversation(system_prompt=PRESET, **GREEDY).id
            d = done(c.chat(b, message))
            assert d.cached_tokens == head and d.prompt_tokens == len(RWKV_CHAT.prompt(message).encode())
            assert d.text == fresh(model, message)
        assert first.text == fresh(model, "Hello")
        e = done(c.edit_last_user(b, "Hi", turn=0))             # an edit of the first message: the shared state
        assert (e.cached_tokens, e.reread_tokens, e.text) == (head, 0, fresh(model, "Hi"))
        other = c.create_conversation(system_prompt=PRESET + " Be funny.", **GREEDY).id
        assert done(c.chat(other, "Hello")).cached_tokens == 0     # another prompt: its own entry
    stop_daemon(home)
    start_daemon(home, model)
    with Client(home_paths(home), autostart=False) as c:
        d = c.create_conversation(system_prompt=PRESET, **GREEDY).id
        again = done(c.chat(d, "What is a cat?"))                # from the disk tier
        assert again.cached_tokens == head and again.text == fresh(model, "What is a cat?")
    files = list((home_paths(home).data_dir / "prompt_states").glob("*.safetensors"))
    assert len(files) == 2


def test_the_tiers_keep_to_their_budgets(tmp_path, model_path):
    from rwkv_chat.daemon.prompt_cache import PromptCache
    from rwkv_chat.models import load_model

    model = load_model(str(model_path("7")), "cpu fp32")
    states = {}
    for k in range(3):
        tokens = list(range(10 + k, 20 + k))
        _, states[k] = model.forward(tokens, None)
        states[k] = (tokens, states[k])
    size = states[0][1].nbytes()
    cache = PromptCache(tmp_path / "p", ram_bytes=int(2.5 * size), disk_bytes=int(1.5 * size))
    for tokens, st in states.values():
        cache.put(model, tokens, st)
    s = cache.stats()
    assert (s["ram_entries"], s["disk_entries"]) == (2, 1)      # least recently used out first
    assert cache.get(model, states[0][0]) is None                # out of both tiers
    got = cache.get(model, states[1][0])                         # RAM
    assert all((x == y).all() for la, lb in zip(got.layers, states[1][1].layers) for x, y in zip(la, lb))
    cold = PromptCache(tmp_path / "p", ram_bytes=0, disk_bytes=int(1.5 * size))
    got = cold.get(model, states[2][0])                          # disk (the newest file kept)
    assert got is not None and cold.stats()["hits"] == {"ram": 0, "disk": 1}
    assert all((x == y).all() for la, lb in zip(got.layers, states[2][1].layers) for x, y in zip(la, lb))
    assert cold.get(model, states[2][0][:-1]) is None            # another prefix: a miss
