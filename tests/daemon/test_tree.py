"""The conversation tree on a real daemon (tiny RWKV-7, greedy): a branch from any turn starts from that
turn's saved state (nothing above it re-read) and equals the conversation replayed from scratch; branches are
switched and deleted; the tree survives a restart; the CLI prints it; exports hold every branch."""

from __future__ import annotations

import json

import msgspec
import pytest

from rwkv_chat.daemon.client import Client, DaemonError
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.models.text.templates import RWKV_CHAT

from .conftest import GREEDY, cli, done, greedy, module_daemon, start_daemon, stop_daemon


home = module_daemon("tree", "7")


def plen(message: str) -> int:
    return len(RWKV_CHAT.prompt(message).encode())    # the tiny models' vocabulary: one token per byte


def reference(model, pairs: list[tuple[str, str]], message: str) -> str:
    """The engine's greedy reply to ``message`` after ``pairs``, read from scratch."""
    text = RWKV_CHAT.transcript("", pairs) + RWKV_CHAT.prompt(message)
    return greedy(model, text, GREEDY["max_tokens"]).split(RWKV_CHAT.stop)[0].strip()


def test_branches_from_any_turn_equal_a_replay_and_survive_a_restart(home, model_path):
    model = model_path("7")
    with Client(home_paths(home), autostart=False) as c:
        cid = c.create_conversation(title="tree", **GREEDY).id
        msgs = ["Hello there", "Tell me about cats", "And dogs?"]
        replies = [done(c.chat(cid, t)).text for t in msgs]
        path = c.conversation(cid).turns
        assert [t.index for t in path] == list(range(6)) and all(t.branches == 1 for t in path)

        # edit the second message: a branch from the state after the first reply, nothing re-read
        e = done(c.edit_last_user(cid, "Tell me about birds", turn=2))
        assert (e.prompt_tokens, e.reread_tokens) == (plen("Tell me about birds"), 0)
        assert e.text == reference(model, [(msgs[0], replies[0])], "Tell me about birds")
        fresh = c.create_conversation(title="replay", **GREEDY).id   # the same, replayed in a new conversation
        done(c.chat(fresh, msgs[0]))
        assert done(c.chat(fresh, "Tell me about birds")).text == e.text
        d = c.conversation(cid)
        assert [t.text for t in d.turns] == [msgs[0], replies[0], "Tell me about birds", e.text]
        assert (d.turns[2].branch, d.turns[2].branches, d.conversation.turns) == (1, 2, 4)

        # regenerate the first reply (turn 1), twice: siblings from the state before the first message
        r = done(c.regenerate(cid, turn=1))
        assert r.text == replies[0] and r.prompt_tokens == plen(msgs[0])
        done(c.regenerate(cid, turn=1, temperature=1.0, seed=3))
        d = c.conversation(cid)
        assert (d.turns[1].branch, d.turns[1].branches, len(d.turns)) == (2, 3, 2)

        # switch back to the first reply: the newest path below it (the edited message) is chosen
        d = c.switch_branch(cid, d.turns[1].index, -2)
        assert [t.text for t in d.turns] == [msgs[0], replies[0], "Tell me about birds", e.text]
        d = c.switch_branch(cid, d.turns[2].index, -1)      # and the original second message
        assert [t.text for t in d.turns] == [msgs[0], replies[0], msgs[1], replies[1], msgs[2], replies[2]]
        with pytest.raises(DaemonError) as ei:
            list(c.regenerate(cid, turn=2))                   # turn 2 is a user message
        assert ei.value.kind == "Conflict"
        tree_before = c.branches(cid)
        # a client that knows nothing of branches reads the conversation: no field it does not know is sent
        old = {"index", "role", "text", "tokens", "created", "finished", "reason", "tokens_per_s", "truncated"}
        raw = msgspec.msgpack.decode(msgspec.msgpack.encode(c.request(m.GetConversation(conversation_id=cid))))
        assert all(set(t) <= old for t in raw["turns"]) and len(raw["turns"]) == 6
        assert [t.branches for t in c.conversation(cid).turns] == [1, 3, 2, 1, 1, 1]          # a new one is told

    stop_daemon(home)
    start_daemon(home, model)
    with Client(home_paths(home), autostart=False) as c:
        assert c.branches(cid) == tree_before
        d = c.conversation(cid)
        assert c.branches(cid).leaf == 5
        nxt = done(c.chat(cid, "Thanks"))                   # continues from the saved state of turn 5
        assert (nxt.prompt_tokens, nxt.reread_tokens) == (plen("Thanks"), 0)
        assert nxt.text == reference(model, list(zip(msgs, replies)), "Thanks")
        # edit the third message after the restart: from the state file of turn 3
        e3 = done(c.edit_last_user(cid, "And fish?", turn=4))
        assert e3.prompt_tokens == plen("And fish?")
        assert e3.text == reference(model, list(zip(msgs[:2], replies[:2])), "And fish?")

        # exports: json every branch, md the chosen path (or every branch)
        data = json.loads(c.export(cid, "json"))
        assert len(data["tree"]) == len(c.branches(cid).turns) and data["turns"][-1]["text"] == e3.text
        md = c.export(cid, "md")
        assert "And fish?" in md and "Tell me about birds" not in md
        assert "Tell me about birds" in c.export(cid, "md", "all") and "## Branch" in c.export(cid, "md", "all")
        out = cli(home, "conversations", "tree", cid).stdout
        assert "Tell me about birds" in out and "[2/2]" in out and "* " in out

        # delete the edited branch (turn 2's sibling): its turns and state files go, the rest stays
        states = home_paths(home).states_dir / cid
        birds = [t for t in c.branches(cid).turns if t.text == "Tell me about birds"][0]
        below = [t.index for t in c.branches(cid).turns if t.parent == birds.index]
        assert any(states.rglob(f"{below[0]}.safetensors"))
        d = c.delete_branch(cid, birds.index)
        left = c.branches(cid).turns
        assert "Tell me about birds" not in [t.text for t in left] and not any(states.rglob(f"{below[0]}.safetensors"))
        assert d.turns[-1].text == e3.text and any(states.rglob("3.safetensors"))


def _schema_2_db(path, rows: str) -> None:
    """A database of schema version 2 (linear conversations: turns without parents) holding ``rows`` (SQL)."""
    import sqlite3

    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
            updated REAL NOT NULL, system_prompt TEXT NOT NULL DEFAULT '', sampling TEXT NOT NULL DEFAULT '{}',
            model_fingerprint TEXT NOT NULL DEFAULT '', state_n INTEGER NOT NULL DEFAULT 0,
            state_stale INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE turns (conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), text TEXT NOT NULL,
            tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, finished REAL NOT NULL,
            reason TEXT NOT NULL DEFAULT '', tokens_per_s REAL NOT NULL DEFAULT 0,
            PRIMARY KEY (conversation_id, idx));
    """ + rows + "\nPRAGMA user_version=2;")
    con.close()


def test_a_schema_2_store_becomes_a_tree_with_its_states_renamed(tmp_path):
    from rwkv_chat.daemon.branches import delete_branch, switch_branch, tree_page
    from rwkv_chat.daemon.store import SCHEMA_VERSION, Store

    _schema_2_db(tmp_path / "db.sqlite3", """
        INSERT INTO conversations(id, title, created, updated, model_fingerprint, state_n)
            VALUES ('old', 'Old', 1, 1, 'f', 2), ('empty', 'E', 1, 1, '', 0);
        INSERT INTO turns VALUES ('old', 0, 'user', 'a', 1, 1, 1, '', 0), ('old', 1, 'assistant', 'b', 1, 1, 2, 'stop', 5),
            ('old', 2, 'user', 'c', 1, 1, 1, '', 0), ('old', 3, 'assistant', 'd', 1, 1, 2, 'cancelled', 6);""")
    model = tmp_path / "states" / "old" / "f"
    model.mkdir(parents=True)
    for n in range(3):                      # the linear layout: named by exchanges consumed
        (model / f"{n}.safetensors").write_text(f"after {n}")
    s = Store(tmp_path / "db.sqlite3", tmp_path / "states")
    assert SCHEMA_VERSION == 4
    turns = s.turns("old")
    assert all(t.family == "" for t in turns)          # replies stored before the family was kept
    assert [(t.index, t.parent, t.text, t.reason) for t in turns] == [
        (0, -1, "a", ""), (1, 0, "b", "stop"), (2, 1, "c", ""), (3, 2, "d", "cancelled")]
    c = s.get("old")
    assert (s.leaf("old"), c.turns, c.state_models) == (3, 4, ["f"])
    assert sorted(f.name for f in model.iterdir()) == ["1.safetensors", "3.safetensors"]
    assert (model / "3.safetensors").read_text() == "after 2" and (model / "1.safetensors").read_text() == "after 1"
    assert (s.leaf("empty"), s.turns("empty")) == (-1, [])
    # the migrated conversation branches like a new one
    r = s.commit_exchange("old", m.TurnInfo(0, "user", "c2", 1, 1.0, 1.0), m.TurnInfo(0, "assistant", "d2", 1, 1.0, 2.0),
                          parent=1)
    assert r == 5 and [t.text for t in s.turns("old")] == ["a", "b", "c2", "d2"]
    assert (s.turns("old")[2].branch, s.turns("old")[2].branches) == (1, 2)
    r = s.commit_exchange("old", m.TurnInfo(0, "user", "", 0, 1.0, 1.0), m.TurnInfo(0, "assistant", "d3", 1, 1.0, 2.0),
                          user_index=4)
    assert r == 6 and [t.text for t in s.turns("old")] == ["a", "b", "c2", "d3"]
    assert switch_branch(s, "old", 2) == 3 and s.turns("old")[-1].text == "d"
    assert switch_branch(s, "old", 2, 5) == 6                  # clamped to the last sibling; its newest path
    assert delete_branch(s, "old", 6) == [6] and s.leaf("old") == 5
    assert sorted(delete_branch(s, "old", 5)) == [4, 5]         # the only reply takes its message along
    assert s.leaf("old") == 3 and [t.index for t in tree_page(s, "old")[0]] == [0, 1, 2, 3]
    s2 = Store(tmp_path / "db.sqlite3", tmp_path / "states")   # reopened: nothing migrated again
    assert [t.text for t in s2.turns("old")] == ["a", "b", "c", "d"] and (model / "3.safetensors").exists()
