"""Persistence: conversations and turns in SQLite (WAL), states as safetensors files.

The database and its ``-wal``/``-shm`` files are mode 0600 whatever the umask (made so before SQLite opens
them; SQLite gives its side files the database's mode), in the home's 0700 data directory.

Schema version lives in ``PRAGMA user_version`` (:data:`SCHEMA_VERSION`). Turns come in exchanges (a user
turn and its reply; a reply keeps why it ended, ``reason``, and its decode speed, ``tokens_per_s``; a reply
the user stopped is kept as far as it got, ``reason`` "cancelled"). Version 2 added those two columns.

A conversation is a tree of turns (version 3): every turn names its ``parent`` (-1: a first message) and its
``depth`` (turns above it) and when it was last on the chosen path (``visited``); a user turn's children are replies to it, a reply's children the messages after
it. The conversation's ``leaf`` (a reply, -1 when empty) chooses the path shown and continued:
:meth:`Store.turns` is that path, root first. A regenerate adds a sibling reply, an edit a sibling message
(:meth:`Store.commit_exchange`); :mod:`~rwkv_chat.daemon.branches` switches and deletes branches. A turn's
``idx`` is unique in its conversation and larger than its parent's, so a path is ordered by it. Older
databases are migrated in place (:data:`_MIGRATIONS`; version 3 makes each turn the child of the one before).

State files live in ``<data dir>/states/<conversation id>/<model fingerprint>/<turn>.safetensors`` where
``turn`` is the index of the reply after which the state was taken (the state of every reply is kept, so a
branch from any turn re-reads nothing before it): states are kept per model, so a conversation continued on
another model and then on the first again re-reads only what the first has not seen. Each file records the
digest of the transcript it consumed (:func:`transcript_digest`, metadata :data:`DIGEST_KEY`): a state whose
digest is not that of its path (a new system prompt, a crash between file and turns) is never used.

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
                                check_conversation_id, clip_bytes)

SCHEMA_VERSION = 4

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
    state_stale INTEGER NOT NULL DEFAULT 0,
    leaf INTEGER NOT NULL DEFAULT -1
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
    parent INTEGER NOT NULL DEFAULT -1,
    depth INTEGER NOT NULL DEFAULT 0,
    visited REAL NOT NULL DEFAULT 0,
    family TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (conversation_id, idx)
);
CREATE INDEX IF NOT EXISTS turns_parent ON turns(conversation_id, parent);
"""
#: schema version -> the statements that bring a database of the version before it there. Version 2: a turn
#: keeps why it ended (``reason``) and its decode speed (``tokens_per_s``).
_MIGRATIONS = {
    2: ("ALTER TABLE turns ADD COLUMN reason TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE turns ADD COLUMN tokens_per_s REAL NOT NULL DEFAULT 0"),
    3: ("ALTER TABLE turns ADD COLUMN parent INTEGER NOT NULL DEFAULT -1",
        "ALTER TABLE turns ADD COLUMN depth INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE turns ADD COLUMN visited REAL NOT NULL DEFAULT 0",
        "UPDATE turns SET parent=COALESCE((SELECT MAX(p.idx) FROM turns p WHERE p.conversation_id=turns.conversation_id"
        " AND p.idx<turns.idx),-1), depth=(SELECT COUNT(*) FROM turns p WHERE p.conversation_id=turns.conversation_id"
        " AND p.idx<turns.idx)",
        "ALTER TABLE conversations ADD COLUMN leaf INTEGER NOT NULL DEFAULT -1",
        "UPDATE conversations SET leaf=COALESCE((SELECT MAX(t.idx) FROM turns t WHERE t.conversation_id=conversations.id),-1)",
        "CREATE INDEX IF NOT EXISTS turns_parent ON turns(conversation_id, parent)"),
    4: ("ALTER TABLE turns ADD COLUMN family TEXT NOT NULL DEFAULT ''",),
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
        if 0 < version < 3:
            from .branches import rename_linear_states

            rename_linear_states(self)

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

    #: the turns of a conversation's chosen path (its leaf's depth + 1)
    _PATH_LEN = "COALESCE((SELECT t.depth+1 FROM turns t WHERE t.conversation_id=c.id AND t.idx=c.leaf),0)"
    _COLUMNS = ("c.id,c.title,c.created,c.updated,c.system_prompt,c.sampling,c.model_fingerprint,c.state_n,"
                f"c.state_stale,{_PATH_LEN},c.leaf")

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
        models = [] if row[8] or row[10] < 0 else self.state_models(cid, row[10])
        return msgspec.structs.replace(self._info(row), state_models=models)

    def leaf(self, cid: str) -> int:
        """The last turn of the chosen path of ``cid`` (-1: no turn). Raises NotFound, InvalidId."""
        row = self.db.execute("SELECT leaf FROM conversations WHERE id=?", (check_conversation_id(cid),)).fetchone()
        if row is None:
            raise NotFound(f"no conversation {cid}")
        return row[0]

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

    def revision(self) -> list:
        """A value that changes whenever the list of conversations does (one made or removed, a turn added, a
        rename, another branch chosen): ``[count, latest update time, sum of the chosen leaves]``, for clients
        that keep a list current by polling the status."""
        return list(self.db.execute("SELECT COUNT(*), MAX(updated), TOTAL(leaf) FROM conversations").fetchone())

    def list(self, offset: int = 0, limit: int = -1) -> list[ConversationInfo]:
        """Summaries of ``limit`` conversations (-1 = all) from the ``offset``-th, most recently updated first:
        title and system prompt cut to ``SUMMARY_CHARS`` characters (``truncated`` set when cut); one query,
        reading no more of the long texts than the summary holds."""
        n = SUMMARY_CHARS
        rows = self.db.execute(
            f"SELECT c.id,substr(c.title,1,{n}),c.created,c.updated,substr(c.system_prompt,1,{n}),c.sampling,"
            f"c.model_fingerprint,c.state_n,c.state_stale,{self._PATH_LEN},c.leaf,"
            f"length(c.title)>{n} OR length(c.system_prompt)>{n}"
            " FROM conversations c ORDER BY c.updated DESC, c.id LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [self._info(r[:11], truncated=bool(r[11])) for r in rows]

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
    #: the turn ids of a path: from the turn :a (the leaf when :a is NULL) up to the root
    _PATH = ("WITH RECURSIVE p(i) AS (SELECT COALESCE(:a,(SELECT leaf FROM conversations WHERE id=:c))"
             " UNION ALL SELECT t.parent FROM turns t, p WHERE t.conversation_id=:c AND t.idx=p.i AND t.parent>=0) ")
    _TURN = ("SELECT t.idx,t.role,t.text,t.tokens,t.created,t.finished,t.reason,t.tokens_per_s,t.parent,"
             "(SELECT COUNT(*) FROM turns s WHERE s.conversation_id=t.conversation_id AND s.parent=t.parent"
             " AND s.idx<t.idx),"
             "(SELECT COUNT(*) FROM turns s WHERE s.conversation_id=t.conversation_id AND s.parent=t.parent),"
             "t.family FROM turns t WHERE t.conversation_id=:c AND t.idx IN p")

    @staticmethod
    def _turn(r, text: str | None = None, truncated: bool = False) -> TurnInfo:
        return TurnInfo(index=r[0], role=r[1], text=r[2] if text is None else text, tokens=r[3], created=r[4],
                        finished=r[5], reason=r[6], tokens_per_s=r[7], truncated=truncated, parent=r[8],
                        branch=r[9], branches=r[10], family=r[11])

    def turns(self, cid: str, upto: int | None = None) -> list[TurnInfo]:
        """The turns of the conversation's chosen path (to its leaf), or of the path to the turn ``upto``,
        root first; each with its place among its siblings (``branch`` of ``branches``)."""
        rows = self.db.execute(self._PATH + self._TURN + " ORDER BY t.idx",
                               {"c": check_conversation_id(cid), "a": upto}).fetchall()
        return [self._turn(r) for r in rows]

    def turns_page(self, cid: str, offset: int, budget: int) -> list[TurnInfo]:
        """Turns of the chosen path of ``cid`` with index ``offset`` or more, as many as fit in ``budget`` bytes
        of UTF-8 text (at least one where any is left); a turn's text longer than ``MAX_TEXT`` bytes (stored by
        an older version) is cut there with ``truncated`` set. Reads rows only up to the first that does not fit."""
        out, used = [], 0
        cur = self.db.execute(self._PATH + self._TURN + " AND t.idx>=:o ORDER BY t.idx",
                              {"c": check_conversation_id(cid), "a": None, "o": offset})
        for r in cur:
            text, cut = clip_bytes(r[2], MAX_TEXT)
            size = len(text.encode("utf-8", "surrogatepass")) + 64
            if out and used + size > budget:
                break
            out.append(self._turn(r, text, cut))
            used += size
        cur.close()
        return out

    def choose(self, cid: str, leaf: int) -> None:
        """Make ``leaf`` the end of the chosen path of ``cid`` and mark the turns of that path visited now (a
        switch to a turn above them comes back down this path)."""
        self.db.execute("UPDATE conversations SET leaf=? WHERE id=?", (leaf, cid))
        self.db.execute(self._PATH + "UPDATE turns SET visited=:v WHERE conversation_id=:c AND idx IN p",
                        {"c": cid, "a": leaf, "v": time.time()})

    def commit_exchange(self, cid: str, user: TurnInfo, assistant: TurnInfo, state_n: int | None = None,
                        fingerprint: str = "", parent: int | None = None, user_index: int | None = None) -> int:
        """Atomically (one transaction): add ``user`` as a child of the turn ``parent`` (None: the conversation's
        leaf; -1: a first message) and ``assistant`` as its reply — or, with ``user_index`` (a regenerate), only
        ``assistant``, as another reply to that stored user turn — and make the reply the leaf; unless
        ``state_n`` is None (no state was saved), record that a state of model ``fingerprint`` covers
        ``state_n`` exchanges. An untitled conversation takes its title from the user's message
        (:func:`title_from`). Returns the reply's index. Raises NotFound (nothing changes) when the
        conversation, ``parent`` or ``user_index`` is gone (deleted while the reply was generated)."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT leaf FROM conversations WHERE id=?", (cid,)).fetchone()
            if row is None:
                raise NotFound(f"no conversation {cid}")
            n = db.execute("SELECT COALESCE(MAX(idx)+1,0) FROM turns WHERE conversation_id=?", (cid,)).fetchone()[0]
            rows = []
            if user_index is not None:
                u = db.execute("SELECT depth FROM turns WHERE conversation_id=? AND idx=? AND role='user'",
                               (cid, user_index)).fetchone()
                if u is None:
                    raise NotFound(f"conversation {cid} has no user turn {user_index}")
                rows.append((n, assistant, user_index, u[0] + 1))
            else:
                parent = row[0] if parent is None else parent
                depth = 0
                if parent >= 0:
                    p = db.execute("SELECT depth FROM turns WHERE conversation_id=? AND idx=?",
                                   (cid, parent)).fetchone()
                    if p is None:
                        raise NotFound(f"conversation {cid} has no turn {parent}")
                    depth = p[0] + 1
                rows += [(n, user, parent, depth), (n + 1, assistant, n, depth + 1)]
            for idx, t, par, dep in rows:
                db.execute("INSERT INTO turns(conversation_id,idx,role,text,tokens,created,finished,reason,"
                           "tokens_per_s,parent,depth,family) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                           (cid, idx, t.role, t.text, t.tokens, t.created, t.finished, t.reason, t.tokens_per_s,
                            par, dep, t.family))
            leaf = rows[-1][0]
            self.choose(cid, leaf)
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
        return leaf

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

    def state_path(self, cid: str, turn: int, fingerprint: str) -> Path:
        """The state file of ``cid`` after its reply ``turn`` (and the path above it) on the model ``fingerprint``."""
        return self.model_dir(cid, fingerprint) / f"{int(turn)}.safetensors"

    def make_model_dir(self, cid: str, fingerprint: str) -> Path:
        """Create (if needed) the folder of ``state_path(cid, turn, fingerprint)``: the conversation's folder and
        the model's inside it, each private (0700, owner checked) whatever the umask. Returns it. Raises
        UnsafeDirectory, OSError."""
        private_dir(self.state_dir(cid))
        return private_dir(self.model_dir(cid, fingerprint))

    def state_models(self, cid: str, turn: int) -> list[str]:
        """Names (fingerprints) of the models with a state file of ``cid`` after its reply ``turn``."""
        d = self.state_dir(cid)
        if not d.is_dir():
            return []
        return sorted(m.name for m in d.iterdir() if (m / f"{int(turn)}.safetensors").is_file())

    def drop_turn_states(self, cid: str, turns) -> None:
        """Delete the state files of ``cid`` after the replies ``turns`` on every model."""
        d = self.state_dir(cid)
        if not d.is_dir():
            return
        for m in d.iterdir():
            if m.is_dir():
                for t in turns:
                    (m / f"{int(t)}.safetensors").unlink(missing_ok=True)

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
