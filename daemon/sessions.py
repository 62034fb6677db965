"""Conversation states held by the daemon, least-recently-used first out.

The newest ``resident`` states stay where the model's strategy puts them (its devices and dtypes); idle
ones beyond that spill to CPU memory (``cpu`` more of them), and beyond that they are dropped from memory:
every committed state is also on disk (``Store.state_path``), from where :meth:`Sessions.get` reloads it
with ``model.load_state`` (which checks it belongs to the model and raises ``StateError`` otherwise).

Used by the scheduler thread; :meth:`Sessions.drop` and :meth:`Sessions.clear` may come from the server
thread too (a lock guards the table).
"""

from __future__ import annotations

import base64
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rwkv_chat.models.state import State


SAMPLER_KEY = "rwkv_chat.sampler"


@dataclass
class Entry:
    state: State
    sampler: dict | None          # Sampler.state_dict() of the conversation so far
    n: int                        # completed exchanges the state covers
    placement: list = field(default_factory=list)   # [(device, dtype)] per tensor while spilled
    spilled: bool = False


def sampler_to_meta(sd: dict | None) -> dict[str, str]:
    """Sampler penalty/RNG state as a str -> str metadata entry (JSON; RNG bytes base64)."""
    if sd is None:
        return {}
    d = dict(sd)
    d["rng_state"] = base64.b64encode(d["rng_state"]).decode()
    return {SAMPLER_KEY: json.dumps(d)}


def sampler_from_meta(meta: dict[str, str]) -> dict | None:
    raw = meta.get(SAMPLER_KEY)
    if not raw:
        return None
    d = json.loads(raw)
    d["rng_state"] = base64.b64decode(d["rng_state"])
    return d


def _spill(state: State) -> tuple[State, list]:
    placement = [(t.device, t.dtype) for layer in state.layers for t in layer]
    return state.to("cpu"), placement


def _restore(state: State, placement: list) -> State:
    from rwkv_chat.models.state import State

    it = iter(placement)
    layers = []
    for layer in state.layers:
        tensors = []
        for t in layer:
            dev, dt = next(it)
            tensors.append(t.to(device=dev, dtype=dt))
        layers.append(tuple(tensors))
    return State(state.version, state.fingerprint, state.names, layers, state.token_count, state.metadata)


class Sessions:
    """LRU cache of conversation states (see module docstring)."""

    def __init__(self, store, resident: int = 8, cpu: int = 64):
        self.store = store
        self.resident = max(1, resident)
        self.cpu = max(0, cpu)
        self._lru: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.RLock()

    def clear(self) -> None:
        """Forget every in-memory state (a new model was loaded)."""
        with self._lock:
            self._lru.clear()

    def drop(self, cid: str) -> None:
        with self._lock:
            self._lru.pop(cid, None)

    def has(self, cid: str, n: int) -> bool:
        with self._lock:
            e = self._lru.get(cid)
            return e is not None and e.n == n

    def get(self, model, cid: str, n: int) -> tuple[State, dict | None]:
        """A private copy of the state of ``cid`` after ``n`` exchanges and its sampler state.

        ``n == 0`` without a file gives the model's zero state. Raises StateError (foreign or corrupt file,
        missing file).
        """
        with self._lock:
            e = self._lru.get(cid)
            if e is not None and e.n == n:
                self._lru.move_to_end(cid)
                if e.spilled:
                    e.state, e.spilled = _restore(e.state, e.placement), False
                    self._shrink()
                return e.state.clone(), e.sampler
        path = self.store.state_path(cid, n)
        if n == 0 and not path.exists():
            return model.zero_state(), None
        state = model.load_state(path)
        return state, sampler_from_meta(state.metadata)

    def put(self, cid: str, state: State, sampler: dict | None, n: int) -> None:
        """Remember ``state`` (the daemon's copy; callers keep using their own) as the newest of ``cid``."""
        with self._lock:
            self._lru[cid] = Entry(state.clone(), sampler, n)
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
            return {"resident": sum(not e.spilled for e in self._lru.values()),
                    "spilled": sum(e.spilled for e in self._lru.values())}
