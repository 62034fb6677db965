"""SQLite store, conversation ids, export, config file and home paths (no daemon)."""

from __future__ import annotations

import json
import sqlite3
import stat

import pytest

from rwkv_chat.daemon.config import Config, ConfigError, load_config, save_config
from rwkv_chat.daemon.paths import ensure_dirs, get_paths, home_paths
from rwkv_chat.daemon.protocol.messages import InvalidId, TurnInfo, check_conversation_id
from rwkv_chat.daemon.branches import export_conversation
from rwkv_chat.daemon.store import SCHEMA_VERSION, NotFound, Store


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "a b", "x" * 65, "-a", "a\x00", "é", "a.b"])
def test_conversation_ids_are_strict(bad):
    with pytest.raises(InvalidId):
        check_conversation_id(bad)


def test_store_schema_turns_and_export(tmp_path):
    s = Store(tmp_path / "db.sqlite3", tmp_path / "states")
    con = sqlite3.connect(tmp_path / "db.sqlite3")
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.create("c1", title="T", system_prompt="Be brief.", sampling={"temperature": 0.5})
    with pytest.raises(ValueError):
        s.create("c1")
    s.commit_exchange("c1", TurnInfo(0, "user", "hi", 3, 1.0, 1.0), TurnInfo(0, "assistant", "hello", 4, 1.0, 2.0),
                      state_n=1, fingerprint="f")
    s.commit_exchange("c1", TurnInfo(0, "user", "again", 3, 3.0, 3.0), TurnInfo(0, "assistant", "yes", 2, 3.0, 4.0),
                      state_n=2, fingerprint="f")
    c = s.get("c1")
    assert (c.turns, c.state_n, c.model_fingerprint, c.sampling) == (4, 2, "f", {"temperature": 0.5})
    assert [t.text for t in s.turns("c1")] == ["hi", "hello", "again", "yes"]
    md = export_conversation(c, s.turns("c1"), "md")
    assert "**User:** again" in md and "Be brief." in md
    data = json.loads(export_conversation(c, s.turns("c1"), "json"))
    assert data["id"] == "c1" and [t["role"] for t in data["turns"]] == ["user", "assistant"] * 2
    for fp in ("f", "g"):                                   # states are kept per model, per reply
        s.model_dir("c1", fp).mkdir(parents=True)
        for t in (1, 3):
            s.state_path("c1", t, fp).write_bytes(b"x")
    assert s.get("c1").state_models == ["f", "g"]           # both have a state after the last reply
    s.drop_turn_states("c1", [3])
    assert s.get("c1").state_models == [] and s.state_path("c1", 1, "g").exists()
    s.delete("c1")
    with pytest.raises(NotFound):
        s.get("c1")
    assert not s.state_dir("c1").exists()


def test_home_puts_everything_under_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RWKV_CHAT_HOME", str(tmp_path / "h"))
    paths = ensure_dirs(get_paths())
    assert paths == home_paths(tmp_path / "h")
    for d in (paths.config_dir, paths.data_dir, paths.cache_dir, paths.runtime_dir):
        assert d.is_dir() and d.is_relative_to(tmp_path / "h")
    assert stat.S_IMODE(paths.runtime_dir.stat().st_mode) == 0o700


def test_config_roundtrip_and_errors(tmp_path):
    path = tmp_path / "config.toml"
    assert load_config(path) == Config()
    cfg = Config()
    cfg.model.path, cfg.model.strategy, cfg.daemon.client_timeout = "/m.pth", "cpu fp32", 3
    cfg.sampling = cfg.sampling.updated(top_k=5)
    save_config(cfg, path)
    assert load_config(path) == cfg
    path.write_text("[daemon]\nqueue_limit = 'many'\n")
    with pytest.raises(ConfigError, match="queue_limit"):
        load_config(path)
    path.write_text("[nope]\nx = 1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(path)
    path.write_text("[model\n")
    with pytest.raises(ConfigError):
        load_config(path)
    path.write_text("[sampling]\nmax_tokens = 500\n[daemon]\nmax_tokens_limit = 400\n")
    with pytest.raises(ConfigError, match="max_tokens_limit"):
        load_config(path)


def test_prompt_cache_budgets(tmp_path):
    """The three tiers' byte budgets: read from [daemon], written back, refused when not a count of bytes."""
    path = tmp_path / "config.toml"
    assert Config().daemon.prompt_cache_device_bytes > 0          # the device tier is on by default
    path.write_text("[daemon]\nprompt_cache_device_bytes = 0\nprompt_cache_ram_bytes = 4096\n")
    cfg = load_config(path)
    assert (cfg.daemon.prompt_cache_device_bytes, cfg.daemon.prompt_cache_ram_bytes) == (0, 4096)
    save_config(cfg, path)
    assert load_config(path) == cfg
    for key in ("prompt_cache_device_bytes", "prompt_cache_ram_bytes", "prompt_cache_disk_bytes"):
        for bad in ("'1G'", "1.5", "true", "-1"):
            path.write_text(f"[daemon]\n{key} = {bad}\n")
            with pytest.raises(ConfigError, match=key):
                load_config(path)


def _schema_1_db(path, rows: str) -> None:
    """A database of schema version 1 (before turns had a reason and a speed) holding ``rows`` (SQL)."""
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, title TEXT NOT NULL DEFAULT '', created REAL NOT NULL,
            updated REAL NOT NULL, system_prompt TEXT NOT NULL DEFAULT '', sampling TEXT NOT NULL DEFAULT '{}',
            model_fingerprint TEXT NOT NULL DEFAULT '', state_n INTEGER NOT NULL DEFAULT 0,
            state_stale INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE turns (conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('user', 'assistant')), text TEXT NOT NULL,
            tokens INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, finished REAL NOT NULL,
            PRIMARY KEY (conversation_id, idx));
    """ + rows + "\nPRAGMA user_version=1;")
    con.close()


def test_store_migrates_schema_1_and_finds_conversations(tmp_path):
    db = tmp_path / "db.sqlite3"
    _schema_1_db(db, """
        INSERT INTO conversations(id, title, created, updated) VALUES ('old1', 'my trip', 1, 1);
        INSERT INTO turns VALUES ('old1', 0, 'user', 'hi', 1, 1, 1), ('old1', 1, 'assistant', 'yo', 1, 1, 2);""")
    s = Store(db, tmp_path / "states")
    assert [(t.text, t.reason) for t in s.turns("old1")] == [("hi", ""), ("yo", "")]
    s.create("c1a2", title="my trip")
    s.create("c1b3", title="other")
    assert [c.id for c in s.find("old1")] == ["old1"]                  # an id
    assert sorted(c.id for c in s.find("my trip")) == ["c1a2", "old1"]  # a title (two: ambiguous)
    assert [c.id for c in s.find("c1b")] == ["c1b3"]                    # an id prefix
    assert sorted(c.id for c in s.find("c1")) == ["c1a2", "c1b3"]
    assert s.find("C1B") == [] and s.find("%") == [] and s.find("") == []


def test_schema_1_is_migrated_replies_keep_reason_and_speed_and_untitled_get_a_title(tmp_path):
    from rwkv_chat.daemon.store import title_from

    _schema_1_db(tmp_path / "db.sqlite3", """
        INSERT INTO conversations(id, title, created, updated) VALUES ('old', 'Kept', 1, 1);
        INSERT INTO turns VALUES ('old', 0, 'user', 'hi', 1, 1, 1), ('old', 1, 'assistant', 'hello', 2, 1, 2);""")
    s = Store(tmp_path / "db.sqlite3", tmp_path / "states")
    assert [(t.text, t.reason, t.tokens_per_s) for t in s.turns("old")] == [("hi", "", 0.0), ("hello", "", 0.0)]
    s.commit_exchange("old", TurnInfo(0, "user", "more", 1, 3.0, 3.0),
                      TurnInfo(0, "assistant", "yes", 2, 3.0, 4.0, reason="length", tokens_per_s=812.5),
                      state_n=2, fingerprint="f")
    assert (s.turns("old")[-1].reason, s.turns("old")[-1].tokens_per_s) == ("length", 812.5)
    s.commit_exchange("old", TurnInfo(0, "user", "and Qwen?", 1, 5.0, 5.0),
                      TurnInfo(0, "assistant", "here", 1, 5.0, 6.0, family="qwen2"), state_n=3, fingerprint="g")
    assert [t.family for t in s.turns("old")] == ["", "", "", "", "", "qwen2"]     # replies keep who wrote them
    assert [t.family for t in s.turns_page("old", 0, 1 << 20)][-1] == "qwen2"
    assert s.get("old").title == "Kept"                          # a title given is never replaced
    s.create("new")                                              # Ctrl+N: no title yet
    s.commit_exchange("new", TurnInfo(0, "user", "\n  Plan a day   in Lyon\nwith kids", 9, 1.0, 1.0),
                      TurnInfo(0, "assistant", "Sure", 1, 1.0, 2.0), state_n=1, fingerprint="f")
    assert s.get("new").title == "Plan a day in Lyon"
    long = title_from("word " * 40)
    assert len(long) <= 60 and long.endswith("…") and not long.endswith(" …")
