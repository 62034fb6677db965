"""Persistence: conversations and turns in SQLite (WAL), states as safetensors files.

Schema version lives in ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`). State files live in
``<data dir>/states/<conversation id>/<n>.safetensors`` where ``n`` is the number of completed
exchanges (user turn + assistant turn) the state has consumed; the newest and the one before it are
kept (the one before serves ``regenerate`` and ``edit_last_user``).

Conversation ids are checked (:func:`~rwkv_chat.daemon.protocol.messages.check_conversation_id`) before any
path or query is built from one. Conversations and turns come back as the protocol's records
(``ConversationInfo``, ``TurnInfo``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import msgspec

from .protocol.messages import ConversationInfo, TurnInfo, check_conversation_id

SCHEMA_VERSION = 2


class NotFound(KeyError):
    """A conversation (or turn) does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


_SCHEMA = """
CREATE TABLE conversations (
    id TEXT PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    system_prompt TEXT NOT NULL DEFAULT '',
    sampling TEXT NOT NULL DEFAULT '{}',
    model_fingerprint TEXT NOT NULL DEFAULT '',
    state_n INTEGER NOT NULL DEFAULT 0,
    state_stale INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE turns (
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    text TEXT NOT NULL,
    tokens INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    finished REAL NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    tokens_per_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (conversation_id, idx)
);
"""
#: schema version -> the statements that bring a database of the version before it there
_MIGRATIONS = {
    2: ("ALTER TABLE turns ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE turns ADD COLUMN tokens_per_s REAL NOT NULL DEFAULT 0"),
}


class Store:
    """SQLite store; one connection per thread (WAL lets the server and scheduler threads share it)."""

    def __init__(self, database: Path, states_dir: Path):
        self.database = Path(database)
        self.states_dir = Path(states_dir)
        self._local = threading.local()
        self._migrate()

    @property
    def db(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.database, timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA foreign_keys=ON")
            self._local.con = con
        return con

    def _migrate(self) -> None:
        self.database.parent.mkdir(parents=True, exist_ok=True)
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.database} has schema {version}, newer than this program's {SCHEMA_VERSION}")
        if version == SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]     # another process may have begun
            if version == 0:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
            else:
                for v in range(version + 1, SCHEMA_VERSION + 1):
                    for stmt in _MIGRATIONS[v]:
                        db.execute(stmt)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- conversations
    def create(self, cid: str, title: str = "", system_prompt: str = "", sampling: dict | None = None,
               fingerprint: str = "") -> ConversationInfo:
        check_conversation_id(cid)
        now = time.time()
        try:
            self.db.execute(
                "INSERT INTO conversations(id,title,created,updated,system_prompt,sampling,model_fingerprint)"
                " VALUES (?,?,?,?,?,?,?)",
                (cid, title, now, now, system_prompt, json.dumps(sampling or {}), fingerprint))
        except sqlite3.IntegrityError as e:
            raise ValueError(f"conversation {cid} already exists") from e
        return self.get(cid)

    def exists(self, cid: str) -> bool:
        check_conversation_id(cid)
        return self.db.execute("SELECT 1 FROM conversations WHERE id=?", (cid,)).fetchone() is not None

    def get(self, cid: str) -> ConversationInfo:
        check_conversation_id(cid)
        row = self.db.execute(
            "SELECT c.id,c.title,c.created,c.updated,c.system_prompt,c.sampling,c.model_fingerprint,"
            "c.state_n,c.state_stale,(SELECT COUNT(*) FROM turns t WHERE t.conversation_id=c.id)"
            " FROM conversations c WHERE c.id=?", (cid,)).fetchone()
        if row is None:
            raise NotFound(f"no conversation {cid}")
        return ConversationInfo(id=row[0], title=row[1], created=row[2], updated=row[3], system_prompt=row[4],
                                sampling=json.loads(row[5]), model_fingerprint=row[6], state_n=row[7],
                                state_stale=bool(row[8]), turns=row[9])

    def list(self) -> list[ConversationInfo]:
        ids = [r[0] for r in self.db.execute("SELECT id FROM conversations ORDER BY updated DESC")]
        return [self.get(i) for i in ids]

    def update(self, cid: str, **fields) -> None:
        allowed = {"title", "system_prompt", "sampling", "model_fingerprint", "state_n", "state_stale"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        if "sampling" in fields:
            fields["sampling"] = json.dumps(fields["sampling"])
        sets = ",".join(f"{k}=?" for k in fields)
        cur = self.db.execute(f"UPDATE conversations SET {sets},updated=? WHERE id=?",
                              (*fields.values(), time.time(), check_conversation_id(cid)))
        if cur.rowcount == 0:
            raise NotFound(f"no conversation {cid}")

    def delete(self, cid: str) -> None:
        cur = self.db.execute("DELETE FROM conversations WHERE id=?", (check_conversation_id(cid),))
        if cur.rowcount == 0:
            raise NotFound(f"no conversation {cid}")
        d = self.state_dir(cid)
        if d.exists():
            for f in d.iterdir():
                f.unlink()
            d.rmdir()

    # -- turns
    def turns(self, cid: str) -> list[TurnInfo]:
        rows = self.db.execute("SELECT idx,role,text,tokens,created,finished,reason,tokens_per_s FROM turns"
                               " WHERE conversation_id=?"
                               " ORDER BY idx", (check_conversation_id(cid),)).fetchall()
        return [TurnInfo(*r) for r in rows]

    def commit_exchange(self, cid: str, user: TurnInfo, assistant: TurnInfo, state_n: int, fingerprint: str,
                        drop_from: int | None = None) -> None:
        """Atomically (one transaction): drop turns with index >= ``drop_from``, append ``user`` and
        ``assistant`` and record that the state file ``state_n`` now covers the conversation. An untitled
        conversation takes its title from the user's message (:func:`title_from`)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if drop_from is not None:
                db.execute("DELETE FROM turns WHERE conversation_id=? AND idx>=?", (cid, drop_from))
            n = db.execute("SELECT COALESCE(MAX(idx)+1,0) FROM turns WHERE conversation_id=?", (cid,)).fetchone()[0]
            for i, t in enumerate((user, assistant)):
                db.execute("INSERT INTO turns(conversation_id,idx,role,text,tokens,created,finished,reason,"
                           "tokens_per_s) VALUES (?,?,?,?,?,?,?,?,?)",
                           (cid, n + i, t.role, t.text, t.tokens, t.created, t.finished, t.reason, t.tokens_per_s))
            db.execute("UPDATE conversations SET state_n=?,state_stale=0,model_fingerprint=?,updated=? WHERE id=?",
                       (state_n, fingerprint, time.time(), cid))
            db.execute("UPDATE conversations SET title=? WHERE id=? AND title=''", (title_from(user.text), cid))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- state files
    def state_dir(self, cid: str) -> Path:
        return self.states_dir / check_conversation_id(cid)

    def state_path(self, cid: str, n: int) -> Path:
        return self.state_dir(cid) / f"{int(n)}.safetensors"

    def prune_states(self, cid: str, keep_from: int) -> None:
        """Delete state files of ``cid`` older than exchange ``keep_from``."""
        d = self.state_dir(cid)
        if not d.exists():
            return
        for f in d.glob("*.safetensors"):
            if f.stem.isdigit() and int(f.stem) < keep_from:
                f.unlink(missing_ok=True)


TITLE_CHARS = 60


def title_from(message: str) -> str:
    """A conversation's title from a message: its first non-blank line, cut at a word to at most
    ``TITLE_CHARS`` characters (with "…")."""
    line = next((ln.strip() for ln in message.splitlines() if ln.strip()), "")
    line = " ".join(line.split())
    if len(line) <= TITLE_CHARS:
        return line
    cut = line[:TITLE_CHARS - 1]
    if " " in cut[TITLE_CHARS // 2:]:
        cut = cut[:cut.rindex(" ")]
    return cut.rstrip(" ,.;:-") + "…"


def export_conversation(conv: ConversationInfo, turns: list[TurnInfo], fmt: str) -> str:
    """``fmt`` "md" (Markdown transcript) or "json" (conversation fields and turns). Raises ValueError."""
    if fmt == "json":
        data = {k: v for k, v in msgspec.structs.asdict(conv).items() if k not in ("state_n", "state_stale")}
        data["turns"] = [msgspec.structs.asdict(t) for t in turns]
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt == "md":
        out = [f"# {conv.title or conv.id}", ""]
        if conv.system_prompt:
            out += ["**System:** " + conv.system_prompt, ""]
        for t in turns:
            out += [f"**{t.role.capitalize()}:** {t.text}", ""]
        return "\n".join(out)
    raise ValueError(f"unknown export format {fmt!r} (md or json)")
