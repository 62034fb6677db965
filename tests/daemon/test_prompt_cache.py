"""Prompt states shared across conversations (tiny RWKV-7, greedy): the state after a system prompt is read
once and reused by every conversation that starts with it, from RAM and, after a restart, from disk; each
conversation gets the reply computed from scratch; the tiers keep to their byte budgets."""

from __future__ import annotations

from rwkv_chat.app.daemon_cli import prompt_states_line
from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.config import Config
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.models import load_model
from rwkv_chat.models.text.templates import RWKV_CHAT

from .conftest import GREEDY, cli, done, greedy, module_daemon, start_daemon, stop_daemon, write_qwen_folder

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
        pc = c.status()["home"]["sessions"]["prompt_cache"]
    # the daemon reports all three tiers; a CPU model's states skip the device tier (they are in RAM)
    budgets = Config().daemon
    assert (pc["device_budget"], pc["ram_budget"], pc["disk_budget"]) == (
        budgets.prompt_cache_device_bytes, budgets.prompt_cache_ram_bytes, budgets.prompt_cache_disk_bytes)
    assert (pc["device_entries"], pc["device_bytes"], pc["ram_entries"], pc["disk_entries"]) == (0, 0, 2, 2)
    state_bytes = load_model(str(model), "cpu fp32").zero_state().nbytes()
    assert pc["ram_bytes"] == 2 * state_bytes
    assert pc["hits"] == {"device": 0, "ram": 3, "disk": 0}      # the two chats and the edit that were cached
    line = cli(home, "daemon", "status").stdout
    assert prompt_states_line(pc) in line and "0 on the model's devices" in line
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
    assert got is not None and cold.stats()["hits"] == {"device": 0, "ram": 0, "disk": 1}
    assert all((x == y).all() for la, lb in zip(got.layers, states[2][1].layers) for x, y in zip(la, lb))
    assert cold.get(model, states[2][0][:-1]) is None            # another prefix: a miss


def _same(a, b) -> bool:
    return all((x == y).all() for la, lb in zip(a.layers, b.layers) for x, y in zip(la, lb))


def _states(model, n: int) -> list:
    """``n`` (tokens, state) pairs of ``model``: distinct 10-token prefixes read from the zero state."""
    out = []
    for k in range(n):
        tokens = list(range(30 + k, 40 + k))
        out.append((tokens, model.forward(tokens, None)[1]))
    return out


def test_states_move_through_device_ram_and_disk_tiers(tmp_path, model_path):
    """The device tier (its logic run on the CPU: ``cpu_device``) keeps the most recently used states, sheds
    the least recently used into RAM and RAM into disk; hits in RAM and on disk are promoted; byte counts are
    the states' tensors' bytes."""
    from rwkv_chat.daemon.prompt_cache import PromptCache
    from rwkv_chat.models import load_model

    model = load_model(str(model_path("7")), "cpu fp32")
    (ta, a), (tb, b), (tc, c), (td, d) = _states(model, 4)
    size = sum(t.numel() * t.element_size() for layer in a.layers for t in layer)
    d_dir = tmp_path / "p"
    probe = PromptCache(tmp_path / "probe", ram_bytes=0, disk_bytes=1 << 30)
    probe.put(model, ta, a)
    file_size = probe.stats()["disk_bytes"]
    cache = PromptCache(d_dir, ram_bytes=int(1.5 * size), disk_bytes=int(2.5 * file_size),
                        device_bytes=int(2.5 * size), cpu_device=True)

    def tiers():
        s = cache.stats()
        return s["device_entries"], s["ram_entries"], s["disk_entries"]

    cache.put(model, ta, a)
    cache.put(model, tb, b)
    assert tiers() == (2, 0, 2) and cache.stats()["device_bytes"] == 2 * size
    cache.put(model, tc, c)                                   # A: device -> RAM; its file trimmed
    assert tiers() == (2, 1, 2)
    cache.put(model, td, d)                                   # B: device -> RAM, A: RAM -> out (least used)
    s = cache.stats()
    assert tiers() == (2, 1, 2) and (s["device_bytes"], s["ram_bytes"]) == (2 * size, size)
    assert cache.get(model, ta) is None and cache.stats()["misses"] == 1

    got = cache.get(model, tb)                                # RAM hit: B to the device tier, C down to RAM
    assert _same(got, b) and cache.stats()["hits"] == {"device": 0, "ram": 1, "disk": 0}
    assert tiers() == (2, 1, 2)
    got = cache.get(model, td)                                # device hit (D stayed)
    assert _same(got, d) and cache.stats()["hits"]["device"] == 1
    for layer in got.layers:                                  # a private copy
        for t in layer:
            t.fill_(7.0)
    assert _same(cache.get(model, td), d) and cache.stats()["hits"]["device"] == 2
    got = cache.get(model, tc)                                # C was demoted to RAM: hit there, promoted
    assert _same(got, c) and cache.stats()["hits"]["ram"] == 2
    assert _same(cache.get(model, tc), c) and cache.stats()["hits"]["device"] == 3
    assert _same(cache.get(model, tb), b) and cache.stats()["hits"]["ram"] == 3   # B was shed for C

    cold = PromptCache(d_dir, ram_bytes=int(1.5 * size), disk_bytes=int(2.5 * file_size),
                       device_bytes=int(2.5 * size), cpu_device=True)   # a restart: only the files
    on_disk = [t for t in (tb, tc, td) if cold.get(model, t) is not None]
    assert len(on_disk) == 2 and cold.stats()["hits"] == {"device": 0, "ram": 0, "disk": 2}
    assert cold.stats()["device_entries"] == 2                # promoted from disk
    assert _same(cold.get(model, on_disk[0]), dict(zip(map(tuple, (tb, tc, td)), (b, c, d)))[tuple(on_disk[0])])
    assert cold.stats()["hits"]["device"] == 1

    cold.release_device()                                     # the model goes: device -> RAM (-> disk)
    s = cold.stats()
    assert (s["device_entries"], s["ram_entries"], s["device_bytes"], s["ram_bytes"]) == (0, 1, 0, size)
    assert cold.get(model, on_disk[0]) is not None and cold.stats()["hits"]["ram"] == 1   # the most recent


def test_a_state_demoted_past_ram_is_written_again(tmp_path, model_path):
    """A state whose file the disk tier trimmed while it was in use on the device is written again when it
    leaves the device tier (RAM off), as the disk tier's most recently used file."""
    from rwkv_chat.daemon.prompt_cache import PromptCache
    from rwkv_chat.models import load_model

    model = load_model(str(model_path("7")), "cpu fp32")
    (ta, a), (tb, b), (tc, c) = _states(model, 3)
    size = a.nbytes()
    probe = PromptCache(tmp_path / "probe", ram_bytes=0, disk_bytes=1 << 30)
    probe.put(model, ta, a)
    one_file = int(1.5 * probe.stats()["disk_bytes"])
    cache = PromptCache(tmp_path / "p", ram_bytes=0, disk_bytes=one_file, device_bytes=int(2.5 * size),
                        cpu_device=True)
    cache.put(model, ta, a)
    cache.put(model, tb, b)                                   # A's file trimmed (B's is newer)
    assert cache.get(model, ta) is not None                   # device hit: A is the most recently used
    cache.put(model, tc, c)                                   # B shed (its file trimmed for C's)
    assert cache.get(model, ta) is not None
    cache.release_device()                                    # C (file kept), then A: written, C's trimmed
    s = cache.stats()
    assert (s["device_entries"], s["ram_entries"], s["disk_entries"]) == (0, 0, 1)
    cold = PromptCache(tmp_path / "p", ram_bytes=0, disk_bytes=one_file)
    got = cold.get(model, ta)
    assert got is not None and _same(got, a) and cold.get(model, tc) is None


def test_cpu_states_skip_the_device_tier(tmp_path, model_path):
    """By default a CPU-only model's states go to the RAM tier (the same memory): the device tier stays
    empty whatever its budget."""
    from rwkv_chat.daemon.prompt_cache import PromptCache
    from rwkv_chat.models import load_model

    model = load_model(str(model_path("7")), "cpu fp32")
    (ta, a), = _states(model, 1)
    cache = PromptCache(tmp_path / "p", ram_bytes=1 << 30, disk_bytes=0, device_bytes=1 << 30)
    cache.put(model, ta, a)
    assert _same(cache.get(model, ta), a)
    s = cache.stats()
    assert (s["device_entries"], s["ram_entries"], s["ram_bytes"]) == (0, 1, a.nbytes())
    assert s["hits"] == {"device": 0, "ram": 1, "disk": 0}


def test_kv_caches_move_through_the_tiers(tmp_path, shared_dir):
    """A Qwen2 KV cache (KVState: keys, values and token ids) keeps its contents through the device tier,
    RAM and disk, and comes back from each."""
    from rwkv_chat.daemon.prompt_cache import PromptCache
    from rwkv_chat.models import load_model

    model = load_model(str(write_qwen_folder(tmp_path / "q", shared_dir)), "cpu fp32")
    (ta, a), (tb, b), (tc, c) = _states(model, 3)
    size = a.nbytes()
    cache = PromptCache(tmp_path / "p", ram_bytes=int(1.5 * size), disk_bytes=1 << 30,
                        device_bytes=int(1.5 * size), cpu_device=True)
    for tokens, st in ((ta, a), (tb, b), (tc, c)):
        cache.put(model, tokens, st)
    s = cache.stats()
    assert (s["device_entries"], s["ram_entries"], s["disk_entries"]) == (1, 1, 3)
    assert (s["device_bytes"], s["ram_bytes"]) == (size, size)
    for tokens, st, tier in ((tc, c, "device"), (tb, b, "ram"), (ta, a, "disk")):
        before = cache.stats()["hits"][tier]
        got = cache.get(model, tokens)
        assert cache.stats()["hits"][tier] == before + 1
        assert type(got) is type(st) and got.token_count == st.token_count == len(tokens)
        assert (got.tokens == st.tokens).all() and _same(got, st)


def test_a_reload_with_another_strategy_gets_the_states_in_its_dtypes(tmp_path, model_path):
    """The same checkpoint (one fingerprint) reloaded with another strategy: the device tier is released
    before the load (as the daemon does), and a RAM hit is placed as the new model places states."""
    from rwkv_chat.daemon.prompt_cache import PromptCache
    from rwkv_chat.models import load_model

    fp32 = load_model(str(model_path("7")), "cpu fp32")
    bf16 = load_model(str(model_path("7")), "cpu bf16")
    assert fp32.fingerprint == bf16.fingerprint
    (ta, a), = _states(fp32, 1)
    cache = PromptCache(tmp_path / "p", ram_bytes=1 << 30, disk_bytes=0, device_bytes=1 << 30, cpu_device=True)
    cache.put(fp32, ta, a)
    cache.release_device()
    ref = bf16.place_state(a)
    for tier in ("ram", "device"):                            # from RAM, then promoted
        got = cache.get(bf16, ta)
        assert _same(got, ref) and cache.stats()["hits"][tier] == 1
        assert [t.dtype for t in got.layers[0]] == [t.dtype for t in bf16.zero_state().layers[0]]
