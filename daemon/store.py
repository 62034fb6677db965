"""Persistence: conversations and turns in SQLite (WAL), states as safetensors files.

The database and its ``-wal``/``-shm`` files are mode 0600 whatever the umask (made so before SQLite opens
them; SQLite gives its side files the database's mode), in the home's 0700 data directory.

Schema version lives in ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`). Turns come in exchanges (a user
turn and its reply; a reply keeps why it ended, ``reason``, and its decode speed, ``tokens_per_s``; a reply
the user stopped is kept as far as it got, ``reason`` "cancelled"). Version 2 added those two columns; a
version 1 database is migrated in place (:data:`_MIGRATIONS`).

State files live in ``<data dir>/states/<conversation id>/<model fingerprint>/<n>.safetensors`` where ``n`` is
the number of exchanges the state has consumed: states are kept per model, so a conversation continued on
another model and then on the first again re-reads only what the first has not seen. Each file records the
digest of the transcript it consumed (:func:`transcript_digest`, metadata :data:`DIGEST_KEY`): a state whose
digest is not that of the stored turns (an edit, a new system prompt, a crash between file and turns) is never
used. Per model the newest state and the one before the last exchange are kept (that one serves
``regenerate`` and ``edit_last_user``).

Conversation ids are checked (:func:`~rwkv_chat.daemon.protocol.messages.check_conversation_id`) before any
path or query is built from one. Conversations and turns come back as the protocol's records
(``ConversationInfo``, ``TurnInfo``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import msgspec

from .paths import private_dir
from .protocol.messages import (MAX_TEXT, MAX_TITLE, SUMMARY_CHARS, ConversationInfo, TurnInfo,
                                check_conversation_id, clip_bytes, quote)

SCHEMA_VERSION = 2

#: metadata entry of a state file: :func:`transcript_digest` of what the state consumed
DIGEST_KEY = "rwkv_chat.transcript"
_FINGERPRINT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def transcript_digest(system_prompt: str, pairs: list[tuple[str, str]]) -> str:
    """A digest of a conversation's system prompt and its first exchanges ``pairs`` (user text, reply text):
    what a state after those exchanges has consumed."""
    return hashlib.sha256(json.dumps([system_prompt, pairs], ensure_ascii=False).encode()).hexdigest()[:32]


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
#: schema version -> the statements that bring a database of the version before it there. Version 2: a turn
#: keeps why it ended (``reason``) and its decode speed (``tokens_per_s``).
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
        models = [] if row[8] or not row[9] else self.state_models(cid, row[9] // 2)
        return msgspec.structs.replace(self._info(row), state_models=models)

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

    def find(self, query: str, limit: int = 10) -> list[ConversationInfo]:
        """The conversations ``query`` names, by the best kind of match: the conversation whose id it is; else
        those titled exactly ``query``; else those whose id starts with ``query`` (at most ``limit``, newest
        first). Empty when none matches."""
        limit = max(1, min(int(limit), 100))
        db = self.db
        rows = db.execute("SELECT id FROM conversations WHERE id=?", (query,)).fetchall()
        if not rows:
            rows = db.execute("SELECT id FROM conversations WHERE title=? ORDER BY updated DESC LIMIT ?",
                              (query, limit)).fetchall()
        if not rows and query:
            rows = db.execute("SELECT id FROM conversations WHERE substr(id,1,?)=? ORDER BY updated DESC LIMIT ?",
                              (len(query), query, limit)).fetchall()
        return [self.get(r[0]) for r in rows]

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
        shutil.rmtree(self.state_dir(cid), ignore_errors=True)

    # -- turns
    def turns(self, cid: str) -> list[TurnInfo]:
        rows = self.db.execute("SELECT idx,role,text,tokens,created,finished,reason,tokens_per_s FROM turns"
                               " WHERE conversation_id=? ORDER BY idx", (check_conversation_id(cid),)).fetchall()
        return [TurnInfo(*r) for r in rows]

    def turns_page(self, cid: str, offset: int, budget: int) -> list[TurnInfo]:
        """Turns of ``cid`` from index ``offset`` on, as many as fit in ``budget`` bytes of UTF-8 text (at least
        one where any is left); a turn's text longer than ``MAX_TEXT`` bytes (stored by an older version) is
        cut there with ``truncated`` set. Reads rows only up to the first that does not fit."""
        out, used = [], 0
        cur = self.db.execute("SELECT idx,role,text,tokens,created,finished,reason,tokens_per_s FROM turns"
                              " WHERE conversation_id=? AND idx>=? ORDER BY idx", (check_conversation_id(cid), offset))
        for r in cur:
            text, cut = clip_bytes(r[2], MAX_TEXT)
            size = len(text.encode("utf-8", "surrogatepass")) + 64
            if out and used + size > budget:
                break
            out.append(TurnInfo(r[0], r[1], text, r[3], r[4], r[5], r[6], r[7], truncated=cut))
            used += size
        cur.close()
        return out

    def commit_exchange(self, cid: str, user: TurnInfo, assistant: TurnInfo, state_n: int | None, fingerprint: str,
                        drop_from: int | None = None) -> None:
        """Atomically (one transaction): drop turns with index >= ``drop_from``, append ``user`` and
        ``assistant`` and, unless ``state_n`` is None (no state was saved), record that the state file
        ``state_n`` of model ``fingerprint`` now covers the conversation. An untitled conversation takes its
        title from the user's message (:func:`title_from`). Raises NotFound (nothing changes) when the
        conversation is gone (deleted while its reply was generated)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM conversations WHERE id=?", (cid,)).fetchone() is None:
                raise NotFound(f"no conversation {cid}")
            if drop_from is not None:
                db.execute("DELETE FROM turns WHERE conversation_id=? AND idx>=?", (cid, drop_from))
            n = db.execute("SELECT COALESCE(MAX(idx)+1,0) FROM turns WHERE conversation_id=?", (cid,)).fetchone()[0]
            for i, t in enumerate((user, assistant)):
                db.execute("INSERT INTO turns(conversation_id,idx,role,text,tokens,created,finished,reason,"
                           "tokens_per_s) VALUES (?,?,?,?,?,?,?,?,?)",
                           (cid, n + i, t.role, t.text, t.tokens, t.created, t.finished, t.reason, t.tokens_per_s))
            if state_n is None:
                db.execute("UPDATE conversations SET updated=? WHERE id=?", (time.time(), cid))
            else:
                db.execute("UPDATE conversations SET state_n=?,state_stale=0,model_fingerprint=?,updated=?"
                           " WHERE id=?", (state_n, fingerprint, time.time(), cid))
            db.execute("UPDATE conversations SET title=? WHERE id=? AND title=''", (title_from(user.text), cid))
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
        """The folder of every state file of ``cid`` (one sub-folder per model)."""
        return self.states_dir / check_conversation_id(cid)

    def model_dir(self, cid: str, fingerprint: str) -> Path:
        """The folder of the state files of ``cid`` on the model ``fingerprint``."""
        name = fingerprint if _FINGERPRINT_RE.fullmatch(fingerprint or "") else \
            "h" + hashlib.sha256(str(fingerprint).encode()).hexdigest()[:32]
        return self.state_dir(cid) / name

    def state_path(self, cid: str, n: int, fingerprint: str) -> Path:
        """The state file of ``cid`` after ``n`` exchanges on the model ``fingerprint``."""
        return self.model_dir(cid, fingerprint) / f"{int(n)}.safetensors"

    def make_model_dir(self, cid: str, fingerprint: str) -> Path:
        """Create (if needed) the folder of ``state_path(cid, n, fingerprint)``: the conversation's folder and
        the model's inside it, each private (0700, owner checked) whatever the umask. Returns it. Raises
        UnsafeDirectory, OSError."""
        private_dir(self.state_dir(cid))
        return private_dir(self.model_dir(cid, fingerprint))

    def state_files(self, cid: str, fingerprint: str) -> list[tuple[int, Path]]:
        """``(n, path)`` of the state files of ``cid`` on the model ``fingerprint``, newest (largest n) first."""
        d = self.model_dir(cid, fingerprint)
        if not d.is_dir():
            return []
        files = [(int(f.stem), f) for f in d.glob("*.safetensors") if f.stem.isdigit()]
        return sorted(files, key=lambda x: x[0], reverse=True)

    def state_models(self, cid: str, n: int) -> list[str]:
        """Names (fingerprints) of the models with a state file of ``cid`` after ``n`` exchanges."""
        d = self.state_dir(cid)
        if not d.is_dir():
            return []
        return sorted(m.name for m in d.iterdir() if (m / f"{int(n)}.safetensors").is_file())

    def prune_states(self, cid: str, fingerprint: str, keep: set[int], changed_after: int | None = None) -> None:
        """Delete the state files of ``cid`` on the model ``fingerprint`` other than those after ``keep``
        exchanges; with ``changed_after`` (the exchanges after that many were replaced), the files of every
        other model after more than that many exchanges too (they consumed replaced turns)."""
        d = self.state_dir(cid)
        if not d.is_dir():
            return
        own = self.model_dir(cid, fingerprint)
        for f in d.glob("*.safetensors"):             # the layout before states were kept per model
            f.unlink(missing_ok=True)
        for m in d.iterdir():
            if not m.is_dir():
                continue
            for f in m.glob("*.safetensors"):
                if not f.stem.isdigit():
                    continue
                n = int(f.stem)
                if (n not in keep) if m == own else (changed_after is not None and n > changed_after):
                    f.unlink(missing_ok=True)

    def drop_states(self, cid: str) -> None:
        """Delete every state file of ``cid`` (what they consumed is no longer the conversation)."""
        shutil.rmtree(self.state_dir(cid), ignore_errors=True)


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
    raise ValueError(f"unknown export format {quote(fmt)} (md or json)")
