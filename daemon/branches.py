"""A conversation's tree of turns: choosing a branch, deleting one, listing and exporting every branch.

The store keeps the tree (each turn's ``parent``, the conversation's ``leaf``: see
:mod:`~rwkv_chat.daemon.store`). A user turn's children are the replies to it (a regenerate adds one), a
reply's children the messages after it (an edit adds a sibling message under the same reply). Choosing a
turn chooses the path below it that was chosen last (``visited``; the newest child where none was), down to
a leaf.

Every function takes the :class:`~rwkv_chat.daemon.store.Store`; ids are checked by it. Raises
:class:`~rwkv_chat.daemon.store.NotFound` for a conversation or turn that does not exist. :func:`redo_target`
finds where a regenerate or an edit branches off.
"""

from __future__ import annotations

import json
import logging

import msgspec

from .protocol.messages import SUMMARY_CHARS, ConversationInfo, TurnInfo, check_conversation_id, quote
from .store import NotFound

log = logging.getLogger("rwkv_chat.daemon")

_SUBTREE = ("WITH RECURSIVE s(i) AS (SELECT :t UNION ALL SELECT t.idx FROM turns t, s"
            " WHERE t.conversation_id=:c AND t.parent=s.i) SELECT i FROM s")


def _row(store, cid: str, turn: int):
    r = store.db.execute("SELECT idx,role,parent FROM turns WHERE conversation_id=? AND idx=?",
                         (check_conversation_id(cid), int(turn))).fetchone()
    if r is None:
        store.get(cid)                                   # NotFound for the conversation first
        raise NotFound(f"conversation {cid} has no turn {turn}")
    return r


def _children(db, cid: str, parent: int) -> list[int]:
    return [r[0] for r in db.execute("SELECT idx FROM turns WHERE conversation_id=? AND parent=? ORDER BY idx",
                                     (cid, parent))]


def chosen_leaf(store, cid: str, turn: int) -> int:
    """The leaf of the path below ``turn`` chosen last (``turn`` itself when it has no child; -1: from the
    root)."""
    db = store.db
    while True:
        kid = db.execute("SELECT idx FROM turns WHERE conversation_id=? AND parent=? ORDER BY visited DESC, idx DESC"
                         " LIMIT 1", (cid, turn)).fetchone()
        if kid is None:
            return turn
        turn = kid[0]


def switch_branch(store, cid: str, turn: int, step: int = 0) -> int:
    """Choose the sibling ``step`` places from ``turn`` (clamped to the first / last) and the path below it
    chosen last; returns the new leaf."""
    _, _, parent = _row(store, cid, turn)
    sibs = _children(store.db, cid, parent)
    target = sibs[max(0, min(len(sibs) - 1, sibs.index(int(turn)) + int(step)))]
    leaf = chosen_leaf(store, cid, target)
    store.choose(cid, leaf)
    return leaf


def delete_branch(store, cid: str, turn: int) -> list[int]:
    """Delete ``turn`` and every turn below it, and the state files of the replies among them; a reply that is
    the only one of its message takes the message along. When the chosen path went through them, the path
    chosen last among what is left under their parent is chosen. Returns the indices deleted."""
    idx, role, parent = _row(store, cid, turn)
    db = store.db
    if role == "assistant" and parent >= 0 and len(_children(db, cid, parent)) == 1:
        idx, _, parent = _row(store, cid, parent)
    db.execute("BEGIN IMMEDIATE")
    try:
        gone = [r[0] for r in db.execute(_SUBTREE, {"t": idx, "c": cid})]
        leaf = db.execute("SELECT leaf FROM conversations WHERE id=?", (cid,)).fetchone()[0]
        db.executemany("DELETE FROM turns WHERE conversation_id=? AND idx=?", [(cid, i) for i in gone])
        if leaf in gone:
            store.choose(cid, chosen_leaf(store, cid, parent))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    store.drop_turn_states(cid, gone)
    return gone


def tree_page(store, cid: str, offset: int = 0, limit: int = 200,
              chars: int = SUMMARY_CHARS) -> tuple[list[TurnInfo], int]:
    """Every turn of ``cid`` with index ``offset`` or more (at most ``limit``, -1: all), texts cut to ``chars``
    characters (``truncated`` set when cut), and how many turns the conversation has in all."""
    cid = check_conversation_id(cid)
    store.get(cid)
    db = store.db
    n = int(chars)
    rows = db.execute(
        f"SELECT t.idx,t.role,substr(t.text,1,{n}),t.tokens,t.created,t.finished,t.reason,t.tokens_per_s,t.parent,"
        "(SELECT COUNT(*) FROM turns s WHERE s.conversation_id=t.conversation_id AND s.parent=t.parent"
        " AND s.idx<t.idx),"
        "(SELECT COUNT(*) FROM turns s WHERE s.conversation_id=t.conversation_id AND s.parent=t.parent),t.family,"
        f"length(t.text)>{n} FROM turns t WHERE t.conversation_id=? AND t.idx>=? ORDER BY t.idx LIMIT ?",
        (cid, offset, limit)).fetchall()
    total = db.execute("SELECT COUNT(*) FROM turns WHERE conversation_id=?", (cid,)).fetchone()[0]
    return [store._turn(r[:12], truncated=bool(r[12])) for r in rows], total


def leaves(turns: list[TurnInfo]) -> list[list[TurnInfo]]:
    """Every root-to-leaf path of the tree ``turns`` (all of a conversation's turns), in index order of leaves."""
    by = {t.index: t for t in turns}
    parents = {t.parent for t in turns}
    out = []
    for t in turns:
        if t.index not in parents:
            path = [t]
            while path[-1].parent >= 0 and path[-1].parent in by:
                path.append(by[path[-1].parent])
            out.append(path[::-1])
    return out


class Conflict(ValueError):
    """A regenerate or edit names a turn that is not a reply / user message of the conversation (it changed
    since the client showed it)."""


def redo_target(store, cid: str, mode: str, turn: int = -1):
    """For a ``mode`` "regenerate" or "edit" of the conversation ``cid``: the user turn it answers again or
    replaces (``TurnInfo``) and the path above that turn (the turns a new branch keeps). ``turn``: the reply
    (regenerate) or user message (edit) meant, -1 for the last of the chosen path. Raises ValueError (nothing
    to redo), Conflict (``turn`` is not such a turn), NotFound."""
    role = "assistant" if mode == "regenerate" else "user"
    what = "reply" if mode == "regenerate" else "user message"
    if turn == -1:
        path = store.turns(cid)
        if len(path) < 2 or path[-1].role != "assistant" or path[-2].role != "user":
            raise ValueError(f"the conversation has no reply to {mode}")
        path = path if mode == "regenerate" else path[:-1]
    else:
        path = store.turns(cid, upto=turn) if 0 <= turn else []
        if not path or path[-1].index != turn or path[-1].role != role:
            raise Conflict(f"turn {turn} is not a {what} of the conversation: it changed since it was shown; "
                           "reload it")
    if mode == "regenerate":           # the path to the reply: its message answered again
        path = path[:-1]
    return path[-1], path[:-1]


def rename_linear_states(store) -> None:
    """After the migration to trees: a state file named by exchanges consumed (``<n>.safetensors``, the
    linear layout) is renamed after its reply's index (``<turn>.safetensors``); ``0.safetensors`` (no exchange)
    is removed. A file that cannot be renamed is left; its digest keeps it from being used wrongly."""
    root = store.states_dir
    if not root.is_dir():
        return
    for conv in root.iterdir():
        if not conv.is_dir():
            continue
        try:
            replies = [t.index for t in store.turns(conv.name) if t.role == "assistant"]
        except (NotFound, ValueError):
            continue
        for model in conv.iterdir():
            if not model.is_dir():
                continue
            files = sorted(((int(f.stem), f) for f in model.glob("*.safetensors") if f.stem.isdigit()), reverse=True)
            for n, f in files:                 # largest n first: a new name is never one still to be renamed
                try:
                    if 1 <= n <= len(replies):
                        f.rename(model / f"{replies[n - 1]}.safetensors")
                    else:
                        f.unlink()
                except OSError as e:
                    log.warning("state file %s not renamed: %s", f, e)


def export_conversation(conv: ConversationInfo, turns: list[TurnInfo], fmt: str,
                        tree: list[TurnInfo] | None = None) -> str:
    """``fmt`` "md" (Markdown transcript) or "json" (conversation fields and turns). ``turns``: the chosen path;
    ``tree``: every turn, or None for the chosen path only (json: a "tree" list of every turn with its parent;
    md: one section per branch, its path from the first message). Raises ValueError."""
    leaf = turns[-1].index if turns else -1
    if fmt == "json":
        data = {k: v for k, v in msgspec.structs.asdict(conv).items() if k not in ("state_n", "state_stale")}
        data["turns"] = [msgspec.structs.asdict(t) for t in turns]
        if tree is not None:
            data["leaf"], data["tree"] = leaf, [msgspec.structs.asdict(t) for t in tree]
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if fmt == "md":
        out = [f"# {conv.title or conv.id}", ""]
        if conv.system_prompt:
            out += ["**System:** " + conv.system_prompt, ""]
        paths = [turns] if tree is None else leaves(tree)
        for k, path in enumerate(paths, 1):
            if tree is not None:
                current = " (current)" if path and path[-1].index == leaf else ""
                out += [f"## Branch {k} of {len(paths)}{current}", ""]
            for t in path:
                out += [f"**{t.role.capitalize()}:** {t.text}", ""]
        return "\n".join(out)
    raise ValueError(f"unknown export format {quote(fmt)} (md or json)")
