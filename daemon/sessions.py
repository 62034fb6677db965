"""Conversation states held by the daemon, least-recently-used first out, and where a conversation resumes.

The newest ``resident`` states stay where the model's strategy puts them (its devices and dtypes); idle
ones beyond that spill to CPU memory (``cpu`` more of them), and beyond that they are dropped from memory:
every committed state is also on disk (``Store.state_path``, one folder per model), from where
:meth:`Sessions.resume` reloads it with ``model.load_state``.

:meth:`Sessions.resume` finds the newest state of a conversation on the loaded model that has consumed a prefix
of its stored exchanges (the digest it recorded is that prefix's, :func:`~rwkv_chat.daemon.store.transcript_digest`):
the caller feeds the rest of the transcript. A state file that cannot be read (corrupt, a field missing or of
the wrong type, another model's) is set aside with a warning and reported; the conversation then resumes from an
older state or the zero state, re-reading its history. :meth:`Sessions.peek` finds the same state without
loading it (the in-memory one, or a state file's header): the context a conversation has in use
(``rwkv_chat.daemon.context.conversation_used``).

:attr:`Sessions.prefix` is the :class:`~rwkv_chat.daemon.prefix_cache.PrefixCache` of stateless chat requests
(``[daemon] prefix_cache_bytes``), cleared with the rest.

Used by the scheduler thread; :meth:`Sessions.drop`, :meth:`Sessions.clear` and :meth:`Sessions.peek` may
come from the server thread too (a lock guards the table).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .prefix_cache import PrefixCache
from .store import DIGEST_KEY, transcript_digest

if TYPE_CHECKING:
    from rwkv_chat.models.state import State

log = logging.getLogger("rwkv_chat.daemon")

SAMPLER_KEY = "rwkv_chat.sampler"


@dataclass
class Entry:
    state: State
    sampler: dict | None          # Sampler.state_dict() of the conversation so far
    n: int                        # completed exchanges the state covers
    digest: str                   # transcript_digest of those exchanges
    placement: list = field(default_factory=list)   # [(device, dtype)] per tensor while spilled
    spilled: bool = False


@dataclass
class Resume:
    """Where a conversation resumes: ``state`` (None: from the model's zero state) after ``n`` exchanges, its
    sampler state, and the problems met on the way (unreadable state files, as user-facing sentences)."""

    state: State | None = None
    sampler: dict | None = None
    n: int = 0
    problems: list[str] = field(default_factory=list)


def sampler_to_meta(sd: dict | None) -> dict[str, str]:
    """Sampler penalty/RNG state as a str -> str metadata entry (JSON; RNG bytes base64)."""
    if sd is None:
        return {}
    d = dict(sd)
    d["rng_state"] = base64.b64encode(d["rng_state"]).decode()
    return {SAMPLER_KEY: json.dumps(d)}


def sampler_from_meta(meta: dict[str, str], path=None) -> dict | None:
    """The sampler state of a state file's metadata (None without one). Raises StateError naming ``path`` and
    the field when it is not what :func:`sampler_to_meta` writes."""
    from rwkv_chat.models.errors import StateError

    raw = meta.get(SAMPLER_KEY)
    if not raw:
        return None
    try:
        d = json.loads(raw)
        d["rng_state"] = base64.b64decode(d["rng_state"], validate=True)
    except (ValueError, TypeError, KeyError, binascii.Error) as e:
        raise StateError(f"state file {path}: metadata field {SAMPLER_KEY!r} is malformed ({type(e).__name__}: "
                         f"{e})") from None
    return d


def _spill(state: State) -> tuple[State, list]:
    placement = [(t.device, t.dtype) for layer in state.layers for t in layer]
    return state.to("cpu"), placement


def _restore(state: State, placement: list) -> State:
    it = iter(placement)
    layers = []
    for layer in state.layers:
        tensors = []
        for t in layer:
            dev, dt = next(it)
            tensors.append(t.to(device=dev, dtype=dt))
        layers.append(tuple(tensors))
    return state.with_layers(layers)


class Sessions:
    """LRU cache of conversation states (see module docstring)."""

    def __init__(self, store, resident: int = 8, cpu: int = 64, prefix_bytes: int = 0):
        self.store = store
        self.prefix = PrefixCache(prefix_bytes)     # states after token prefixes (stateless chat requests)
        self.resident = max(1, resident)
        self.cpu = max(0, cpu)
        self._lru: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.RLock()
        self.prompts = None           # the shared prompt states (daemon.prompt_cache.PromptCache), if any
        self.drafts = None            # the messages being typed (daemon.drafts.Drafts), if any

    def clear(self) -> None:
        """Forget every in-memory state, the prefix cache's too, and move the shared prompt states off the
        model's devices (``PromptCache.release_device``; the model was unloaded or another one loaded)."""
        with self._lock:
            self._lru.clear()
        self.prefix.clear()
        if self.prompts is not None:
            self.prompts.release_device()

    def drop(self, cid: str) -> None:
        with self._lock:
            self._lru.pop(cid, None)

    def resume(self, model, cid: str, system_prompt: str, pairs: list[tuple[str, str]],
               replies: list[int]) -> Resume:
        """The newest state of ``cid`` on ``model`` that consumed the first ``n <= len(pairs)`` of the exchanges
        ``pairs`` (user text, reply text) under ``system_prompt`` — a private copy — with its sampler state; an
        empty :class:`Resume` (start from the zero state) when there is none. ``replies``: the stored index of
        each exchange's reply (the state file after exchange ``n`` is that of reply ``replies[n - 1]``).
        Unreadable files are deleted and reported in ``problems`` (the conversation is then rebuilt from its
        turns)."""
        from rwkv_chat.models.errors import StateError

        with self._lock:
            e = self._entry(model.fingerprint, cid, system_prompt, pairs)
            if e is not None:
                if e.spilled:
                    e.state, e.spilled = _restore(e.state, e.placement), False
                    self._shrink()
                return Resume(e.state.clone(), e.sampler, e.n)
        out = Resume()

        def read(path):
            state = model.load_state(path)
            return (state, sampler_from_meta(state.metadata, path)), state.metadata

        def unreadable(path, err: StateError) -> None:
            log.warning("conversation %s: %s; set aside, the state is rebuilt from the turns", cid, err)
            out.problems.append(str(err))
            path.unlink(missing_ok=True)

        n, got = self._newest(model.fingerprint, cid, system_prompt, pairs, replies, read, unreadable)
        if got is not None:
            (out.state, out.sampler), out.n = got, n
        return out

    def peek(self, model, cid: str, system_prompt: str, pairs: list[tuple[str, str]],
             replies: list[int]) -> tuple[int, int] | None:
        """Where :meth:`resume` would resume ``cid`` on ``model`` (same arguments), without loading a state:
        ``(n, token_count)`` of the state it finds — the in-memory one, else the newest matching state file,
        of which only the metadata is read — or None (the zero state). A file whose metadata cannot be read is
        passed over (and left for :meth:`resume` to set aside); one whose tensors are damaged counts here
        though :meth:`resume` would pass over it. Any thread."""
        from rwkv_chat.models.errors import StateError
        from rwkv_chat.models.state import read_header

        fp = model.fingerprint
        with self._lock:
            e = self._entry(fp, cid, system_prompt, pairs, touch=False)
            if e is not None:
                return e.n, e.state.token_count

        def read(path):
            fingerprint, count, meta = read_header(path)
            if fingerprint != fp:
                raise StateError(f"state file {path} is another model's ({fingerprint})")
            return count, meta

        n, count = self._newest(fp, cid, system_prompt, pairs, replies, read, lambda path, err: None)
        return None if count is None else (n, count)

    def _entry(self, fp: str, cid: str, system_prompt: str, pairs: list[tuple[str, str]],
               touch: bool = True) -> Entry | None:
        """The in-memory state of ``cid`` when it is of the model ``fp`` and consumed a prefix of ``pairs``
        (moved to the newest end with ``touch``); None otherwise. Called with the lock held."""
        e = self._lru.get(cid)
        if (e is not None and e.state.fingerprint == fp and e.n <= len(pairs)
                and e.digest == transcript_digest(system_prompt, pairs[:e.n])):
            if touch:
                self._lru.move_to_end(cid)
            return e
        return None

    def _newest(self, fp: str, cid: str, system_prompt: str, pairs: list[tuple[str, str]], replies: list[int],
                read, unreadable) -> tuple[int, object]:
        """The newest state file of ``cid`` on the model ``fp`` whose digest is that of the exchanges before it:
        ``(n, read(path)[0])``, or ``(0, None)``. ``read(path) -> (value, metadata)`` raises StateError for a file
        it cannot use, which ``unreadable(path, error)`` is told of (the search goes on with older files)."""
        from rwkv_chat.models.errors import StateError

        for n in range(min(len(pairs), len(replies)), 0, -1):
            path = self.store.state_path(cid, replies[n - 1], fp)
            if not path.is_file():
                continue
            try:
                value, meta = read(path)
            except StateError as err:
                unreadable(path, err)
                continue
            if meta.get(DIGEST_KEY) != transcript_digest(system_prompt, pairs[:n]):
                continue                 # it consumed turns that were replaced since
            return n, value
        return 0, None

    def put(self, cid: str, state: State, sampler: dict | None, n: int, digest: str) -> None:
        """Remember ``state`` (the daemon's copy; callers keep using their own) as the newest of ``cid``: after
        ``n`` exchanges whose :func:`~rwkv_chat.daemon.store.transcript_digest` is ``digest``."""
        with self._lock:
            self._lru[cid] = Entry(state.clone(), sampler, n, digest)
            self._lru.move_to_end(cid)
            self._shrink()

    def _shrink(self) -> None:
        entries = list(self._lru.items())
        for i, (cid, e) in enumerate(reversed(entries)):
            if i >= self.resident + self.cpu:
                del self._lru[cid]
            elif i >= self.resident and not e.spilled:
                e.state, e.placement = _spill(e.state)
                e.spilled = True

    def stats(self) -> dict:
        with self._lock:
            out = {"resident": sum(not e.spilled for e in self._lru.values()),
                   "spilled": sum(e.spilled for e in self._lru.values())}
        if self.prompts is not None:
            out["prompt_cache"] = self.prompts.stats()
        if self.drafts is not None:
            out["drafts"] = self.drafts.stats()
        return out
