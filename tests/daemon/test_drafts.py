"""Draft prefill on a real daemon (tiny RWKV-7, greedy): a message read ahead while typed gives the same reply
and the same state as one read on Enter; a draft edited in the middle rolls back to what it still shares."""

from __future__ import annotations

import torch

from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.drafts import DRAFT_CHUNK, HOLD, Drafts, thin
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.models.text.templates import RWKV_CHAT

from .conftest import GREEDY, done, greedy, module_daemon, wait_for


home = module_daemon("drafts", "7")


def drafted(c: Client, cid: str) -> dict:
    """The draft of ``cid`` once read ahead as far as it goes."""
    def read():
        d = c.status()["home"]["sessions"]["drafts"].get(cid)
        return d if d and not d["pending"] and d["tokens"] and d["fed"] == d["tokens"] else None
    return wait_for(read, timeout=20)


def same_state(c: Client, a: str, b: str) -> bool:
    (_, ta), (_, tb) = c.get_state(a), c.get_state(b)
    return ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-5) for k in ta)


def replay(c: Client, first: tuple[str, str] | None, message: str) -> tuple[str, m.Done]:
    """The same conversation with no draft: its id and the reply's Done."""
    cid = c.create_conversation(**GREEDY).id
    if first:
        assert done(c.chat(cid, first[0])).text == first[1]
    return cid, done(c.chat(cid, message))


def test_a_draft_read_ahead_gives_the_same_reply_and_state(home, model_path):
    message = "Tell me about the big cats of Africa, please"
    with Client(home_paths(home), autostart=False) as c:
        cid = c.create_conversation(**GREEDY).id
        hello = done(c.chat(cid, "Hello"))
        c.draft(cid, message[:20])
        drafted(c, cid)
        c.draft(cid, message)                               # typed on: read on from where it was
        d = drafted(c, cid)
        assert d["tokens"] == len(("User: " + message).encode()) - HOLD and d["rollbacks"] == 0
        r = done(c.chat(cid, message))
        assert r.draft_tokens == d["fed"] and r.prompt_tokens == len(RWKV_CHAT.prompt(message).encode())
        other, plain = replay(c, ("Hello", hello.text), message)
        assert plain.draft_tokens == 0 and r.text == plain.text
        text = RWKV_CHAT.transcript("", [("Hello", hello.text)]) + RWKV_CHAT.prompt(message)
        assert r.text == greedy(model_path("7"), text, GREEDY["max_tokens"]).split(RWKV_CHAT.stop)[0].strip()
        assert same_state(c, cid, other)
        # a first message, drafted before its conversation exists
        new = "c" + "0" * 11
        c.draft(new, "Good morning to you")
        drafted(c, new)
        f = done(c.chat(new, "Good morning to you", **GREEDY))
        assert f.draft_tokens > 0 and f.text == replay(c, None, "Good morning to you")[1].text


def test_a_draft_edited_in_the_middle_rolls_back(home):
    start = ("Tell me a long story about the big cats of Africa and their cubs, the rivers they cross, the rains "
             "that come and go, and the long dry months when the grass turns gold and ")
    before = start + "the lions rest in the shade of the old trees."
    after = start + "the zebras rest in the shade of the old trees."
    shared = len(("User: " + start).encode())
    with Client(home_paths(home), autostart=False) as c:
        cid = c.create_conversation(**GREEDY).id
        hello = done(c.chat(cid, "Hi"))
        c.draft(cid, before)
        drafted(c, cid)
        c.draft(cid, after)                                 # changed before its end
        d = drafted(c, cid)
        assert d["rollbacks"] == 1 and d["fed"] == len(("User: " + after).encode()) - HOLD
        assert shared - DRAFT_CHUNK < d["rolled_to"] <= shared    # the last checkpoint before the edit
        r = done(c.chat(cid, after + "?"))                  # and one more character typed before Enter
        assert 0 < r.draft_tokens == d["fed"]
        other, plain = replay(c, ("Hi", hello.text), after + "?")
        assert r.text == plain.text and same_state(c, cid, other)


def test_checkpoints_thin_out_towards_the_start():
    cps = [(0, None)]
    for end in range(64, 64 * 40, 64):
        cps = thin(cps + [(end, None)], 6)
    ends = [n for n, _ in cps]
    assert len(ends) == 6 and ends[0] == 0 and ends[-1] == 64 * 39
    gaps = [b - a for a, b in zip(ends, ends[1:])]
    assert gaps[-1] == 64 and gaps[0] > gaps[-1] * 4          # dense near the end, sparse towards the start


def test_drafts_switched_off_are_ignored():
    drafts = Drafts(enabled=False)
    drafts.update("c1", "hello")
    assert drafts.stats() == {} and not drafts.due()
