"""Prompt states shared across conversations: the state after a prefix of tokens (a system prompt, a preset)
is computed once and reused by every conversation that starts with it.

Entries are keyed by :func:`prefix_key`: the model's fingerprint and a digest of the prefix's token ids (the
key a general token-prefix cache can share). Two tiers, each least-recently-used first out within a byte
budget (``[daemon] prompt_cache_ram_bytes``, ``prompt_cache_disk_bytes``; 0 turns a tier off):

* RAM — the state in CPU memory (``State.nbytes``: float32 per-layer tensors), restored to the model's
  devices and dtypes on a hit (:func:`~rwkv_chat.daemon.sessions._restore`);
* disk — ``<directory>/<key>.safetensors`` (``State.save``: atomic; metadata :data:`TOKENS_KEY`, the digest
  and count of the prefix), the file's modification time its last use; read with ``model.load_state``.

A hit hands out a private copy. A file that cannot be read (or whose metadata is not its key's) is removed and
counts as a miss. Used by the scheduler thread; a lock guards the tables all the same.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from .paths import private_dir
from .sessions import _restore, _spill

log = logging.getLogger("rwkv_chat.daemon")

#: metadata entry of a cached state file: "<token digest>:<token count>"
TOKENS_KEY = "rwkv_chat.prefix"


def token_digest(tokens: list[int]) -> str:
    """SHA-256 (hex, 32 characters) of the token ids as 4-byte little-endian unsigned integers."""
    return hashlib.sha256(b"".join(int(t).to_bytes(4, "little") for t in tokens)).hexdigest()[:32]


def prefix_key(fingerprint: str, tokens: list[int]) -> str:
    """The cache key of the state of model ``fingerprint`` after ``tokens``."""
    return hashlib.sha256(f"{fingerprint}:{token_digest(tokens)}:{len(tokens)}".encode()).hexdigest()[:40]


class PromptCache:
    """The two tiers of shared prefix states (see the module docstring).

    Args:
        directory: where the disk tier's files live (made 0700 on first write).
        ram_bytes: budget of the RAM tier, bytes (0: off).
        disk_bytes: budget of the disk tier, bytes (0: off).
    """

    def __init__(self, directory: Path, ram_bytes: int, disk_bytes: int):
        self.directory = Path(directory)
        self.ram_bytes, self.disk_bytes = max(0, int(ram_bytes)), max(0, int(disk_bytes))
        self._ram: OrderedDict[str, tuple] = OrderedDict()     # key -> (cpu state, placement, nbytes)
        self._used = 0
        self._lock = threading.RLock()
        self.hits = {"ram": 0, "disk": 0}
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, model, tokens: list[int]):
        """A private copy of the state of ``model`` after ``tokens`` (placed as the model places states), or
        None when neither tier holds it."""
        from rwkv_chat.models.errors import StateError

        key = prefix_key(model.fingerprint, tokens)
        with self._lock:
            hit = self._ram.get(key)
            if hit is not None:
                self._ram.move_to_end(key)
                self.hits["ram"] += 1
                return _restore(hit[0], hit[1]).clone()
        path = self._path(key)
        if self.disk_bytes and path.is_file():
            try:
                state = model.load_state(path)
                if state.metadata.get(TOKENS_KEY) != f"{token_digest(tokens)}:{len(tokens)}":
                    raise StateError(f"state file {path}: its prefix is not the one of its name")
                os.utime(path)
            except (StateError, OSError) as e:
                log.warning("prompt cache: %s; removed", e)
                path.unlink(missing_ok=True)
            else:
                self.hits["disk"] += 1
                self._keep(key, state)
                return state
        self.misses += 1
        return None

    def put(self, model, tokens: list[int], state) -> None:
        """Keep (a copy of) ``state``, the state of ``model`` after ``tokens``, in both tiers. A failure to
        write the file is logged (the RAM tier still has it)."""
        key = prefix_key(model.fingerprint, tokens)
        self._keep(key, state)
        if not self.disk_bytes or state.nbytes() > self.disk_bytes:
            return
        path = self._path(key)
        try:
            if not path.is_file():
                private_dir(self.directory)
                state.save(path, metadata={TOKENS_KEY: f"{token_digest(tokens)}:{len(tokens)}"})
            else:
                os.utime(path)
            self._trim_disk()
        except OSError as e:
            log.warning("prompt cache: could not write %s: %s", path, e)

    def _keep(self, key: str, state) -> None:
        size = state.nbytes()
        if size > self.ram_bytes:
            return
        with self._lock:
            old = self._ram.pop(key, None)
            if old is not None:
                self._used -= old[2]
            cpu, placement = _spill(state.clone())
            self._ram[key] = (cpu, placement, size)
            self._used += size
            while self._used > self.ram_bytes and self._ram:
                _, (_, _, n) = self._ram.popitem(last=False)
                self._used -= n

    def _trim_disk(self) -> None:
        """Remove the least recently used files (oldest modification time) while the tier is over budget."""
        files = []
        for f in self.directory.glob("*.safetensors"):
            try:
                st = f.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, f))
        total = sum(s for _, s, _ in files)
        for _, size, f in sorted(files, key=lambda x: x[0]):
            if total <= self.disk_bytes:
                break
            f.unlink(missing_ok=True)
            total -= size

    def stats(self) -> dict:
        """Entries and bytes per tier, hits per tier, misses."""
        disk = [f.stat().st_size for f in self.directory.glob("*.safetensors")] if self.directory.is_dir() else []
        with self._lock:
            return {"ram_entries": len(self._ram), "ram_bytes": self._used, "disk_entries": len(disk),
                    "disk_bytes": sum(disk), "hits": dict(self.hits), "misses": self.misses}
