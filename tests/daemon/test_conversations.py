"""The conversation model of one real daemon: stopped replies kept, regenerate and edit by turn (a reply or a
message of the conversation, else a conflict), fresh randomness, continuing on another model and back, damaged state files rebuilt from the turns."""

from __future__ import annotations

import pytest

from rwkv_chat.daemon.client import Client, DaemonError
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.models.text.templates import RWKV_CHAT

from .conftest import greedy, module_daemon

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}


home = module_daemon("conv", "5.2")


@pytest.fixture()
def c(home, model_path):
    with Client(home_paths(home), autostart=False) as client:
        if client.status()["model"].get("path") != str(model_path("5.2")):
            list(client.load(str(model_path("5.2")), "cpu fp32"))
        yield client


def run(gen) -> tuple[m.Done, set[str]]:
    """The Done event of a generation and the notes of its prefill progress."""
    events = list(gen)
    return events[-1], {e.text for e in events if isinstance(e, m.Progress) and e.text}


#: the sampling seed of the replies stopped mid-way (unseeded, a reply may end on its own before the stop)
SEED = 3


def stopped_reply(c: Client, cid: str, message: str) -> m.Done:
    gen = c.chat(cid, message, max_tokens=5000, temperature=1.0, seed=SEED)    # seeded: a reply that runs on
    text = ""
    for ev in gen:
        text += ev.text if isinstance(ev, m.Token) else ""
        assert not isinstance(ev, m.Done), f"the reply ended by itself before it could be stopped: {ev}"
        if len(text.strip()) >= 5:
            break
    c.cancel(conversation_id=cid)
    return list(gen)[-1]


def plen(message: str) -> int:
    return len(RWKV_CHAT.prompt(message).encode())    # the tiny models' vocabulary: one token per byte


def test_a_stopped_reply_is_kept_with_its_state_and_redo_acts_on_the_turn_named(c):
    cid = c.create_conversation(title="stop", **GREEDY).id
    run(c.chat(cid, "Hello", max_tokens=8))
    done = stopped_reply(c, cid, "Tell me a long story")
    assert done.reason == "cancelled" and done.text
    turns = c.conversation(cid).turns
    assert [(t.role, t.text, t.reason) for t in turns[2:]] == [("user", "Tell me a long story", ""),
                                                               ("assistant", done.text, "cancelled")]
    d, notes = run(c.chat(cid, "Go on", max_tokens=8))     # continues after the stopped reply: nothing re-read
    assert d.prompt_tokens == plen("Go on") and not notes
    with pytest.raises(DaemonError) as ei:                  # turn 2 is a message, not a reply
        list(c.regenerate(cid, turn=2))
    assert ei.value.kind == "Conflict"
    with pytest.raises(DaemonError) as ei:                  # turn 3 is a reply, not a message
        list(c.edit_last_user(cid, "Stop.", turn=3))
    assert ei.value.kind == "Conflict"
    assert len(c.conversation(cid).turns) == 6              # nothing was overwritten
    e, _ = run(c.edit_last_user(cid, "Go on, please", turn=4, max_tokens=8))
    assert [t.text for t in c.conversation(cid).turns] == ["Hello", turns[1].text, "Tell me a long story",
                                                           done.text, "Go on, please", e.text]
    assert e.prompt_tokens == plen("Go on, please")        # from the state after the stopped reply


def test_without_a_seed_each_generation_draws_fresh_randomness(c):
    cid = c.create_conversation(title="rng", temperature=1.0, top_p=1.0, max_tokens=32).id
    run(c.chat(cid, "Hello"))
    first, _ = run(c.chat(cid, "Tell me something"))        # resumes from a saved state (and sampler state)
    again = [run(c.regenerate(cid))[0].text for _ in range(2)]
    assert len({first.text, *again}) == 3
    seeded = [run(c.regenerate(cid, seed=11))[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]                           # a seed: the same request, the same reply


def test_a_conversation_continues_on_another_model_and_back(c, model_path):
    a = c.create_conversation(title="A", **GREEDY).id
    b = c.create_conversation(title="B", **GREEDY).id
    a1, _ = run(c.chat(a, "What is 2+2?", max_tokens=12))
    run(c.chat(b, "Hi", max_tokens=6))
    fp52 = c.status()["model"]["fingerprint"]
    list(c.load(str(model_path("7")), "cpu fp32"))
    a2, notes = run(c.chat(a, "And 3+3?", max_tokens=12))  # the transcript is read on the new model
    text = RWKV_CHAT.transcript("", [("What is 2+2?", a1.text)]) + RWKV_CHAT.prompt("And 3+3?")
    assert a2.prompt_tokens == len(text.encode()) and any("re-reading 2 earlier turns" in n for n in notes)
    assert a2.text == greedy(model_path("7"), text, 12).split(RWKV_CHAT.stop)[0].strip()
    r, notes = run(c.regenerate(a, max_tokens=12))           # the history's state on this model was saved
    assert r.prompt_tokens == plen("And 3+3?") and not notes and r.text == a2.text
    list(c.load(str(model_path("5.2")), "cpu fp32"))
    assert fp52 in c.conversation(b).conversation.state_models
    d, notes = run(c.chat(b, "Again", max_tokens=6))        # B never left 5.2: no re-read
    assert d.prompt_tokens == plen("Again") and not notes
    d, notes = run(c.chat(a, "Thanks", max_tokens=6))       # A: only the exchange 5.2 has not seen
    delta = RWKV_CHAT.transcript("", [("And 3+3?", a2.text)]) + RWKV_CHAT.prompt("Thanks")
    assert d.prompt_tokens == len(delta.encode()) and notes
    assert [t.text for t in c.conversation(a).turns][::2] == ["What is 2+2?", "And 3+3?", "Thanks"]


@pytest.mark.parametrize("damage", ["version", "token_count"])
def test_a_bad_state_file_is_rebuilt_from_the_transcript(c, home, model_path, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cid = c.create_conversation(title="damaged", **GREEDY).id
    one, _ = run(c.chat(cid, "One", max_tokens=8))
    files = list((home_paths(home).states_dir / cid).rglob("1.safetensors"))
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: v for k, v in meta.items() if k != "version"} if damage == "version" else {**meta, "token_count": "abc"}
    save_file(tensors, str(files[0]), metadata=meta)
    list(c.load(str(model_path("5.2")), "cpu fp32"))        # nothing in memory: the file is read
    two, notes = run(c.chat(cid, "Two", max_tokens=8))
    text = RWKV_CHAT.transcript("", [("One", one.text)]) + RWKV_CHAT.prompt("Two")
    assert two.prompt_tokens == len(text.encode())          # rebuilt from the stored turns
    assert any(str(files[0]) in n and repr(damage) in n for n in notes)
    assert two.text == greedy(model_path("5.2"), text, 8).split(RWKV_CHAT.stop)[0].strip()
    three, notes = run(c.chat(cid, "Three", max_tokens=4))  # and goes on from the new state
    assert three.prompt_tokens == plen("Three") and not notes
