"""A conversation's context in use, asked of real daemon processes (``GetConversation(context=True)``): on a
tiny random Qwen2 folder (a context limit: its KV cache) it is what the next reply starts from — the last
Done's ``context_used`` while that reply's state is saved (after a restart too, from the state file), the
history the next reply re-reads where no state is left, each branch's own — and on an RWKV model (no limit)
unknown; a client that does not ask gets no field it does not know."""

from __future__ import annotations

import shutil

import msgspec
import pytest

from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m

from .conftest import cli, done, make_home, start_daemon, stop_daemon, write_qwen_folder

SAMPLING = dict(temperature=1.0, top_p=0.9, max_tokens=12)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory, shared_dir):
    return write_qwen_folder(tmp_path_factory.mktemp("qwen") / "tiny-qwen2", shared_dir)


def test_the_context_in_use_is_what_the_next_reply_starts_from(tmp_path, qwen_folder):
    home = make_home(tmp_path / "h")
    paths = home_paths(home)
    start_daemon(home, qwen_folder)
    try:
        with Client(paths, autostart=False) as c:
            limit = c.status()["model"]["context_limit"]
            assert limit
            c.create_conversation(conversation_id="sys", system_prompt="You answer in one short sentence.")
            last = {}
            for cid in ("plain", "sys"):
                done(c.chat(cid, "Hello there", seed=1, **SAMPLING))
                last[cid] = done(c.chat(cid, "What next?", seed=2, **SAMPLING))
                assert last[cid].context_limit == limit and last[cid].context_used > 0
                assert c.context(cid) == (last[cid].context_used, limit)      # the in-memory state
            d = c.conversation("plain", context=True)
            assert (d.context_used, d.context_limit) == (last["plain"].context_used, limit)
            assert len(d.turns) == 4
            # a client that does not ask (or knows nothing of it) gets no context field
            raw = msgspec.msgpack.decode(msgspec.msgpack.encode(
                c.request(m.GetConversation(conversation_id="plain"))))
            assert "context_used" not in raw and "context_limit" not in raw

            # a branch: regenerate the last reply; each branch tells the use of its own saved state
            regen = done(c.regenerate("plain", seed=3, **SAMPLING))
            assert c.context("plain") == (regen.context_used, limit)
            d = c.switch_branch("plain", d.turns[3].index, 0, context=True)       # back to the first reply
            assert (d.context_used, d.context_limit) == (last["plain"].context_used, limit)
            assert c.conversation("plain").turns[3].text == last["plain"].text

        stop_daemon(home)
        start_daemon(home, qwen_folder)
        with Client(paths, autostart=False) as c:
            for cid in ("plain", "sys"):                     # from the state files' metadata
                assert c.context(cid) == (last[cid].context_used, limit)
        shown = cli(home, "conversations", "show", "sys")
        assert shown.stderr.strip().splitlines()[-1] == f"[context {last['sys'].context_used}/{limit} tokens]"
        assert "User: What next?" in shown.stdout
        stop_daemon(home)
        for cid in ("plain", "sys"):                        # no saved state left: the history is read again
            shutil.rmtree(paths.states_dir / cid)
        start_daemon(home, qwen_folder)
        with Client(paths, autostart=False) as c:
            for cid in ("plain", "sys"):
                used, got_limit = c.context(cid)
                nxt = done(c.chat(cid, "And then?", seed=4, **SAMPLING))
                # what the reply read (or took from the shared prompt cache) before its message
                assert nxt.reread_tokens > 0
                assert (used, got_limit) == (nxt.reread_tokens + nxt.cached_tokens, limit)
                assert c.context(cid) == (nxt.context_used, limit)
    finally:
        stop_daemon(home)


def test_no_context_in_use_without_a_limit_or_a_model(tmp_path, model_path):
    home = make_home(tmp_path / "h")
    paths = home_paths(home)
    start_daemon(home, model_path("5.2"))                   # RWKV: a state of no length, no limit
    try:
        with Client(paths, autostart=False) as c:
            first = done(c.chat("r", "Hello there", max_tokens=4))
            assert first.context_limit is None
            assert c.context("r") == (None, None)
            d = c.conversation("r", context=True)
            assert (d.context_used, d.context_limit) == (None, None) and len(d.turns) == 2
        assert "context" not in cli(home, "conversations", "show", "r").stderr
        stop_daemon(home)
        start_daemon(home, None)                            # no model loaded
        with Client(paths, autostart=False) as c:
            assert c.context("r") == (None, None)
    finally:
        stop_daemon(home)


class _OldGet(msgspec.Struct, tag_field="t", tag="GetConversation", forbid_unknown_fields=True):
    """GetConversation as a daemon before ``context`` reads it."""

    conversation_id: str
    turn_offset: int = 0
    branches: bool = False


class _OldDetail(msgspec.Struct, tag_field="t", tag="ConversationDetail", forbid_unknown_fields=True):
    """ConversationDetail as a client before ``context_used`` reads it."""

    conversation: m.ConversationInfo
    turns: list[m.TurnInfo]


def test_older_peers_read_what_does_not_ask_for_the_context():
    enc = msgspec.msgpack.Encoder()
    req = msgspec.msgpack.decode(enc.encode(m.GetConversation(conversation_id="c", turn_offset=2, branches=True)),
                                 type=_OldGet)
    assert (req.conversation_id, req.turn_offset, req.branches) == ("c", 2, True)
    for msg in (m.SwitchBranch(conversation_id="c", turn=1), m.DeleteBranch(conversation_id="c", turn=1)):
        assert "context" not in msgspec.msgpack.decode(enc.encode(msg))
    assert msgspec.msgpack.decode(enc.encode(m.GetConversation(conversation_id="c", context=True)))["context"]
    conv = m.ConversationInfo(id="c", title="", created=0.0, updated=0.0, system_prompt="", sampling={},
                              model_fingerprint="")
    turns = [m.TurnInfo(0, "user", "Hi", 2, 0.0, 0.0)]
    old = msgspec.msgpack.decode(enc.encode(m.ConversationDetail(conversation=conv, turns=turns)), type=_OldDetail)
    assert old.turns == turns
    with pytest.raises(msgspec.ValidationError):      # why a client must ask for it
        msgspec.msgpack.decode(enc.encode(m.ConversationDetail(conversation=conv, turns=turns, context_used=5,
                                                               context_limit=512)), type=_OldDetail)
