"""Persistence: conversations and turns in SQLite (WAL), states as safetensors files.

The database and its ``-wal``/``-shm`` files are mode 0600 whatever the umask (made so before SQLite opens
them; SQLite gives its side files the database's mode), in the home's 0700 data directory.

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
import os
import sqlite3
import threading
import time
from pathlib import Path

import msgspec

from .protocol.messages import (MAX_TEXT, MAX_TITLE, SUMMARY_CHARS, ConversationInfo, TurnInfo,
                                check_conversation_id, clip_bytes, quote)

SCHEMA_VERSION = 1


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
    PRIMARY KEY (conversation_id, idx)
);
"""


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

    def _private_files(self) -> None:
        """Create the database file if missing and make it and its side files (``-wal``, ``-shm``,
        ``-journal``) mode 0600, before SQLite opens them."""
        fd = os.open(self.database, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.database.with_name(self.database.name + suffix)
            try:
                os.chmod(side, 0o600)
            except FileNotFoundError:
                pass

    def _migrate(self) -> None:
        self.database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._private_files()
        db = self.db
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.database} has schema {version}, newer than this program's {SCHEMA_VERSION}")
        if version == 0:
            db.execute("BEGIN IMMEDIATE")
            if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt.replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS"))
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")

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

    _COLUMNS = ("c.id,c.title,c.created,c.updated,c.system_prompt,c.sampling,c.model_fingerprint,c.state_n,"
                "c.state_stale,(SELECT COUNT(*) FROM turns t WHERE t.conversation_id=c.id)")

    @staticmethod
    def _info(row, truncated: bool = False) -> ConversationInfo:
        return ConversationInfo(id=row[0], title=row[1], created=row[2], updated=row[3], system_prompt=row[4],
                                sampling=json.loads(row[5]), model_fingerprint=row[6], state_n=row[7],
                                state_stale=bool(row[8]), turns=row[9], truncated=truncated)

    def get(self, cid: str) -> ConversationInfo:
        """The whole conversation record. Raises NotFound, InvalidId."""
        check_conversation_id(cid)
        row = self.db.execute(f"SELECT {self._COLUMNS} FROM conversations c WHERE c.id=?", (cid,)).fetchone()
        if row is None:
            raise NotFound(f"no conversation {cid}")
        return self._info(row)

    def get_bounded(self, cid: str) -> ConversationInfo:
        """:meth:`get` with a title and system prompt cut to the limits (``MAX_TITLE`` characters,
        ``MAX_TEXT`` bytes; ``truncated`` set when cut): what a reply may carry whatever was stored."""
        c = self.get(cid)
        prompt, cut = clip_bytes(c.system_prompt, MAX_TEXT)
        if cut or len(c.title) > MAX_TITLE:
            c = msgspec.structs.replace(c, title=c.title[:MAX_TITLE], system_prompt=prompt, truncated=True)
        return c

    def count(self) -> int:
        """Conversations in the store."""
        return self.db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]

    def list(self, offset: int = 0, limit: int = -1) -> list[ConversationInfo]:
        """Summaries of ``limit`` conversations (-1 = all) from the ``offset``-th, most recently updated first:
        title and system prompt cut to ``SUMMARY_CHARS`` characters (``truncated`` set when cut); one query,
        reading no more of the long texts than the summary holds."""
        n = SUMMARY_CHARS
        rows = self.db.execute(
            f"SELECT c.id,substr(c.title,1,{n}),c.created,c.updated,substr(c.system_prompt,1,{n}),c.sampling,"
            "c.model_fingerprint,c.state_n,c.state_stale,(SELECT COUNT(*) FROM turns t WHERE t.conversation_id=c.id),"
            f"length(c.title)>{n} OR length(c.system_prompt)>{n}"
            " FROM conversations c ORDER BY c.updated DESC, c.id LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [self._info(r[:10], truncated=bool(r[10])) for r in rows]

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
        rows = self.db.execute("SELECT idx,role,text,tokens,created,finished FROM turns WHERE conversation_id=?"
                               " ORDER BY idx", (check_conversation_id(cid),)).fetchall()
        return [TurnInfo(*r) for r in rows]

    def turns_page(self, cid: str, offset: int, budget: int) -> list[TurnInfo]:
        """Turns of ``cid`` from index ``offset`` on, as many as fit in ``budget`` bytes of UTF-8 text (at least
        one where any is left); a turn's text longer than ``MAX_TEXT`` bytes (stored by an older version) is
        cut there with ``truncated`` set. Reads rows only up to the first that does not fit."""
        out, used = [], 0
        cur = self.db.execute("SELECT idx,role,text,tokens,created,finished FROM turns WHERE conversation_id=?"
                              " AND idx>=? ORDER BY idx", (check_conversation_id(cid), offset))
        for r in cur:
            text, cut = clip_bytes(r[2], MAX_TEXT)
            size = len(text.encode("utf-8", "surrogatepass")) + 64
            if out and used + size > budget:
                break
            out.append(TurnInfo(r[0], r[1], text, r[3], r[4], r[5], truncated=cut))
            used += size
        cur.close()
        return out

    def commit_exchange(self, cid: str, user: TurnInfo, assistant: TurnInfo, state_n: int, fingerprint: str,
                        drop_from: int | None = None) -> None:
        """Atomically (one transaction): drop turns with index >= ``drop_from``, append ``user`` and
        ``assistant`` and record that the state file ``state_n`` now covers the conversation."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if drop_from is not None:
                db.execute("DELETE FROM turns WHERE conversation_id=? AND idx>=?", (cid, drop_from))
            n = db.execute("SELECT COALESCE(MAX(idx)+1,0) FROM turns WHERE conversation_id=?", (cid,)).fetchone()[0]
            for i, t in enumerate((user, assistant)):
                db.execute("INSERT INTO turns VALUES (?,?,?,?,?,?,?)",
                           (cid, n + i, t.role, t.text, t.tokens, t.created, t.finished))
            db.execute("UPDATE conversations SET state_n=?,state_stale=0,model_fingerprint=?,updated=? WHERE id=?",
                       (state_n, fingerprint, time.time(), cid))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- state files
    def remove_partial_saves(self) -> int:
        """Delete the temporary files a save leaves when the process is killed in the middle of it
        (``*.tmp`` anywhere under the states directory); call only with the daemon's lock held. Returns
        how many were removed."""
        n = 0
        if self.states_dir.exists():
            for f in self.states_dir.rglob("*.tmp"):
                if f.is_file() and not f.is_symlink():
                    f.unlink(missing_ok=True)
                    n += 1
        return n

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
    raise ValueError(f"unknown export format {quote(fmt)} (md or json)")
