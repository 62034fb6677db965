"""The prefix cache: model states after token prefixes, so a stateless chat request reads only what is new.

A ``ChatMessages`` request carries a whole conversation each time. Its prompt tokens are looked up here: the
longest prefix of them after which a state was stored is taken (a private copy of that state and of the logits
that followed it), and only the rest is prefilled. The generation stores the state at the end of its prompt
and after its reply (the reply's tokens and the template's stop, as the next turn's request renders them), so
the next turn of the same conversation prefills only its new message.

Keys are token prefixes, found through a hash chain over blocks of :data:`BLOCK` tokens (as vLLM's automatic
prefix caching keys its KV blocks): ``h[0] = b""``, ``h[b + 1] = blake2b(h[b] || tokens of block b)``, 128-bit
digests. An entry of length L is filed under ``h[L // BLOCK]`` with its last ``L % BLOCK`` tokens; a lookup
hashes the query's full blocks once (O(len / BLOCK) digests) and walks back from the longest to the first
bucket holding an entry that the query continues.

States are treated generically: anything with ``clone()`` and ``nbytes()`` (RWKV's recurrent
:class:`~rwkv_chat.models.state.State`, a transformer's KV cache state), kept where the model put them (its
devices). Entries are evicted least recently used first to stay within ``budget`` bytes (states, logits and
keys); a budget of 0 turns the cache off. Entries of another model (fingerprint) are never returned; the
whole cache is dropped when the model changes (:meth:`PrefixCache.clear`).

Thread-safe (a lock): the scheduler thread looks up and stores, the server thread reads :meth:`stats`.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

#: tokens per block of the hash chain
BLOCK = 64
#: bytes counted per token of a key (its tail is kept as a tuple of ints)
KEY_TOKEN_BYTES = 8


def chain(tokens: list[int], blocks: int) -> list[bytes]:
    """``h[0..blocks]`` of the module docstring for the first ``blocks`` full blocks of ``tokens``."""
    out = [b""]
    for b in range(blocks):
        block = array("q", tokens[b * BLOCK:(b + 1) * BLOCK]).tobytes()
        out.append(hashlib.blake2b(out[-1] + block, digest_size=16).digest())
    return out


def state_bytes(state: Any) -> int:
    """Bytes of a state: its ``nbytes()``, else the sum over its tensors (``layers`` of tuples)."""
    n = getattr(state, "nbytes", None)
    if callable(n):
        return int(n())
    return sum(t.numel() * t.element_size() for layer in getattr(state, "layers", ()) for t in layer)


@dataclass
class Entry:
    length: int                  # tokens of the prefix
    tail: tuple[int, ...]        # its tokens after the last full block
    head: bytes                  # h[length // BLOCK]
    fingerprint: str             # the model's
    state: Any                   # the state after the prefix (the cache's own copy)
    logits: Any                  # float32 [vocab]: the logits after the prefix's last token
    nbytes: int


@dataclass
class Hit:
    """What a lookup found: ``length`` tokens of the query are covered by ``state`` (a private copy) and
    ``logits`` (float32 [vocab], a private copy); ``length`` 0, ``state`` None when nothing is."""

    length: int = 0
    state: Any = None
    logits: Any = None


class PrefixCache:
    """States after token prefixes, LRU within ``budget`` bytes (see the module docstring).

    Args:
        budget: bytes of states, logits and keys kept at most; 0 = off (nothing stored, every lookup misses).
    """

    def __init__(self, budget: int):
        self.budget = max(0, int(budget))
        self._lock = threading.Lock()
        self._lru: OrderedDict[tuple[bytes, tuple[int, ...]], Entry] = OrderedDict()
        self._buckets: dict[bytes, dict[tuple[int, ...], Entry]] = {}
        self.bytes = 0
        self.hits = self.misses = 0
        self.cached_tokens = self.prefilled_tokens = 0

    def lookup(self, tokens: list[int], fingerprint: str) -> Hit:
        """The longest prefix of ``tokens`` (at most all of them) with a state of the model ``fingerprint``,
        as a :class:`Hit` holding copies (the caller may change them). Counts a hit or a miss and the tokens
        covered / left to read. O(len(tokens) / BLOCK) digests plus the entries of the buckets walked."""
        heads = chain(tokens, len(tokens) // BLOCK)
        with self._lock:
            best = None
            for b in range(len(heads) - 1, -1, -1):
                bucket = self._buckets.get(heads[b])
                if not bucket:
                    continue
                start = b * BLOCK
                for tail, e in bucket.items():
                    if (e.fingerprint == fingerprint and start + len(tail) <= len(tokens)
                            and (best is None or e.length > best.length)
                            and tuple(tokens[start:start + len(tail)]) == tail):
                        best = e
                if best is not None:
                    break                 # entries of earlier buckets are shorter
            if best is None:
                self.misses += 1
                self.prefilled_tokens += len(tokens)
                return Hit()
            self._lru.move_to_end((best.head, best.tail))
            self.hits += 1
            self.cached_tokens += best.length
            self.prefilled_tokens += len(tokens) - best.length
            return Hit(best.length, best.state.clone(), best.logits.clone())

    def store(self, tokens: list[int], fingerprint: str, state: Any, logits: Any, copy: bool = True) -> bool:
        """Keep ``state`` and ``logits`` (float32 [vocab]) as those after ``tokens`` on the model ``fingerprint``
        (copies of them unless ``copy`` is false: the cache then owns the objects given). Replaces an entry of
        the same tokens; evicts the least recently used ones beyond the budget. Returns False when the cache
        is off, ``tokens`` is empty or the entry alone exceeds the budget (nothing kept)."""
        if not self.budget or not tokens:
            return False
        size = state_bytes(state) + logits.numel() * logits.element_size() + len(tokens) % BLOCK * KEY_TOKEN_BYTES
        if size > self.budget:
            return False
        blocks = len(tokens) // BLOCK
        head = chain(tokens, blocks)[-1]
        tail = tuple(tokens[blocks * BLOCK:])
        if copy:
            state, logits = state.clone(), logits.clone()
        e = Entry(len(tokens), tail, head, fingerprint, state, logits, size)
        with self._lock:
            self._remove((head, tail))
            self._lru[(head, tail)] = e
            self._buckets.setdefault(head, {})[tail] = e
            self.bytes += size
            while self.bytes > self.budget and self._lru:
                self._remove(next(iter(self._lru)))
        return True

    def _remove(self, key) -> None:
        e = self._lru.pop(key, None)
        if e is None:
            return
        bucket = self._buckets.get(e.head)
        if bucket is not None:
            bucket.pop(e.tail, None)
            if not bucket:
                del self._buckets[e.head]
        self.bytes -= e.nbytes

    def clear(self) -> None:
        """Forget every entry (a new model was loaded, or the model was unloaded). The counters stay."""
        with self._lock:
            self._lru.clear()
            self._buckets.clear()
            self.bytes = 0

    def stats(self) -> dict:
        """``entries``, ``bytes``, ``budget``; ``hits``/``misses``: lookups that found a prefix / none;
        ``cached_tokens``/``prefilled_tokens``: prompt tokens taken from the cache / left to read, in all."""
        with self._lock:
            return {"entries": len(self._lru), "bytes": self.bytes, "budget": self.budget, "hits": self.hits,
                    "misses": self.misses, "cached_tokens": self.cached_tokens,
                    "prefilled_tokens": self.prefilled_tokens}
