"""Prompt states shared across conversations: the state after a prefix of tokens (a system prompt, a preset)
is computed once and reused by every conversation that starts with it.

Entries are keyed by :func:`prefix_key`: the model's fingerprint and a digest of the prefix's token ids (the
key a general token-prefix cache can share). Three tiers, each least-recently-used first out within a byte
budget (``[daemon] prompt_cache_device_bytes``, ``prompt_cache_ram_bytes``, ``prompt_cache_disk_bytes``; 0
turns a tier off). A tier's bytes are the exact sum of its states' per-layer tensor bytes (``State.nbytes``;
a KV cache's token ids, int64 on the CPU, are not counted):

* device — the state as the model places it (its devices and dtypes: GPU memory on CUDA); a hit is a clone
  on those devices, with no host-to-device copy. It holds the states that have a tensor off the CPU: a
  CPU-only model's states are in CPU memory already, and go to the RAM tier (the same memory; keeping them
  in two CPU tiers would only double the RAM used). ``cpu_device=True`` makes CPU-placed states device-tier
  entries too (the tier's logic, exercised on a machine without an accelerator);
* RAM — the state in CPU memory (``State.to("cpu")``, dtypes kept), placed on the loaded model's devices and
  dtypes on a hit (``model.place_state``: right after a reload with another strategy too);
* disk — ``<directory>/<key>.safetensors`` (``State.save``: atomic; metadata :data:`TOKENS_KEY`, the digest
  and count of the prefix), the file's modification time its last use; read with ``model.load_state``.

The device and RAM tiers are exclusive (a state is in at most one of them); the disk tier holds every state
that fits its budget (written when the state is put, so it survives a restart). A hit in RAM or on disk
promotes the state into the fastest tier that takes it; the least recently used entries a tier sheds
to make room are demoted into the next one (device -> RAM -> disk, where a state whose file is gone is
written again), so a state is lost only when no slower tier has room for it. :meth:`PromptCache.release_device`
demotes the whole device tier: the daemon calls it before a model load, after an unload, and when a step runs
out of memory.

A hit hands out a private copy. A file that cannot be read (or whose metadata is not its key's) is removed and
counts as a miss. Used by the scheduler thread; a lock guards the tables all the same (files are written
outside it).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .paths import private_dir

log = logging.getLogger("rwkv_chat.daemon")

#: metadata entry of a cached state file: "<token digest>:<token count>"
TOKENS_KEY = "rwkv_chat.prefix"

#: the tiers, fastest first (the keys of ``PromptCache.stats()["hits"]``)
TIERS = ("device", "ram", "disk")


def token_digest(tokens: list[int]) -> str:
    """SHA-256 (hex, 32 characters) of the token ids as 4-byte little-endian unsigned integers."""
    return hashlib.sha256(b"".join(int(t).to_bytes(4, "little") for t in tokens)).hexdigest()[:32]


def prefix_key(fingerprint: str, tokens: list[int]) -> str:
    """The cache key of the state of model ``fingerprint`` after ``tokens``."""
    return hashlib.sha256(f"{fingerprint}:{token_digest(tokens)}:{len(tokens)}".encode()).hexdigest()[:40]


@dataclass
class _Entry:
    state: object          # the State: placed as the model places it (device tier) or on the CPU (RAM tier)
    nbytes: int            # state.nbytes()
    meta: str              # "<token digest>:<token count>" (the file's TOKENS_KEY)
    used: float            # time.time() of its last put or hit (a rewritten file's modification time)


class _Tier:
    """An LRU table of entries within a byte budget."""

    def __init__(self, budget: int):
        self.budget = max(0, int(budget))
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.used = 0

    def take(self, key: str) -> _Entry | None:
        e = self.entries.pop(key, None)
        if e is not None:
            self.used -= e.nbytes
        return e

    def touch(self, key: str) -> _Entry | None:
        e = self.entries.get(key)
        if e is not None:
            self.entries.move_to_end(key)
        return e

    def add(self, key: str, entry: _Entry) -> list[tuple[str, _Entry]]:
        """Keep ``entry`` (of at most ``budget`` bytes) as the most recently used; the entries shed to keep to
        the budget, least recently used first."""
        self.take(key)
        self.entries[key] = entry
        self.used += entry.nbytes
        shed = []
        while self.used > self.budget:
            k, e = self.entries.popitem(last=False)
            self.used -= e.nbytes
            shed.append((k, e))
        return shed


def _off_cpu(state) -> bool:
    """Whether a tensor of ``state`` is on a device other than the CPU."""
    return any(t.device.type != "cpu" for layer in state.layers for t in layer)


class PromptCache:
    """The three tiers of shared prefix states (see the module docstring).

    Args:
        directory: where the disk tier's files live (made 0700 on first write).
        ram_bytes: budget of the RAM tier, bytes (0: off).
        disk_bytes: budget of the disk tier, bytes (0: off).
        device_bytes: budget of the device tier, bytes (0: off).
        cpu_device: whether states placed on the CPU only also go to the device tier (default: they go to RAM).
    """

    def __init__(self, directory: Path, ram_bytes: int, disk_bytes: int, device_bytes: int = 0, *,
                 cpu_device: bool = False):
        self.directory = Path(directory)
        self._device, self._ram = _Tier(device_bytes), _Tier(ram_bytes)
        self.disk_bytes = max(0, int(disk_bytes))
        self.cpu_device = bool(cpu_device)
        self._lock = threading.RLock()
        self.hits = dict.fromkeys(TIERS, 0)
        self.misses = 0

    @property
    def device_bytes(self) -> int:
        return self._device.budget

    @property
    def ram_bytes(self) -> int:
        return self._ram.budget

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, model, tokens: list[int]):
        """A private copy of the state of ``model`` after ``tokens`` (placed as the model places states), or
        None when no tier holds it. A RAM or disk hit is promoted into the fastest tier that takes it."""
        from rwkv_chat.models.errors import StateError

        key = prefix_key(model.fingerprint, tokens)
        path = self._path(key)
        writes: list[tuple[str, _Entry]] = []
        with self._lock:
            e = self._device.touch(key)
            if e is not None:
                self.hits["device"] += 1
                e.used = time.time()
                out = e.state.clone()
            elif (e := self._ram.take(key)) is not None:
                try:
                    placed = model.place_state(e.state)     # the tier's own tensors where already in place
                except StateError as err:                   # e.g. a context limit now lower than its length
                    log.warning("prompt cache: %s; dropped", err)
                    e = None
                else:
                    self.hits["ram"] += 1
                    out = placed.clone()
                    self._insert(key, placed, e.meta, writes)
        if e is not None:
            self._write(writes)
            _utime(path)                                     # the file's age is the state's last use
            return out
        meta = f"{token_digest(tokens)}:{len(tokens)}"
        if self.disk_bytes and path.is_file():
            try:
                state = model.load_state(path)
                if state.metadata.get(TOKENS_KEY) != meta:
                    raise StateError(f"state file {path}: its prefix is not the one of its name")
                os.utime(path)
            except (StateError, OSError) as err:
                log.warning("prompt cache: %s; removed", err)
                path.unlink(missing_ok=True)
            else:
                with self._lock:
                    self.hits["disk"] += 1
                    self._insert(key, state.clone(), meta, writes)
                self._write(writes)
                return state
        with self._lock:
            self.misses += 1
        return None

    def put(self, model, tokens: list[int], state) -> None:
        """Keep a copy of ``state``, the state of ``model`` after ``tokens``, in the fastest tier that takes it
        and on disk. A failure to write a file is logged (the memory tiers still have the state)."""
        key = prefix_key(model.fingerprint, tokens)
        meta = f"{token_digest(tokens)}:{len(tokens)}"
        writes: list[tuple[str, _Entry]] = []
        with self._lock:
            self._device.take(key)
            self._ram.take(key)
            self._insert(key, state.clone(), meta, writes)
        self._write(writes)
        if not self.disk_bytes or state.nbytes() > self.disk_bytes:
            return
        path = self._path(key)
        try:
            if not path.is_file():
                private_dir(self.directory)
                state.save(path, metadata={TOKENS_KEY: meta})
            else:
                os.utime(path)
            self._trim_disk()
        except OSError as e:
            log.warning("prompt cache: could not write %s: %s", path, e)

    def release_device(self) -> None:
        """Demote every device-tier state into RAM (and what RAM sheds to disk), least recently used first, so
        the model's devices hold none (the model is unloaded or replaced)."""
        writes: list[tuple[str, _Entry]] = []
        with self._lock:
            while self._device.entries:
                key, e = self._device.entries.popitem(last=False)
                self._device.used -= e.nbytes
                self._to_ram(key, e, writes)
        self._write(writes)

    # -- moves between tiers (under the lock; files are written after it by _write) -----------------------
    def _insert(self, key: str, state, meta: str, writes: list) -> None:
        """Keep ``state`` (the cache's own; placed as the model places it) in the fastest tier that takes it."""
        e = _Entry(state, state.nbytes(), meta, time.time())
        if (self.cpu_device or _off_cpu(state)) and e.nbytes <= self._device.budget:
            for k, shed in self._device.add(key, e):
                self._to_ram(k, shed, writes)
        else:
            self._to_ram(key, e, writes)

    def _to_ram(self, key: str, e: _Entry, writes: list) -> None:
        """Keep ``e`` in RAM (on the CPU, dtypes kept), or demote it to disk where it does not fit."""
        cpu = e.state.to("cpu")
        e = _Entry(cpu, cpu.nbytes(), e.meta, e.used)
        if e.nbytes <= self._ram.budget:
            writes.extend(self._ram.add(key, e))
        else:
            writes.append((key, e))

    def _write(self, writes: list[tuple[str, _Entry]]) -> None:
        """Demote states shed from RAM to disk: a state whose file is gone (trimmed, or never written) and that
        fits the disk budget is written again, its modification time its last use (so the disk tier's trim
        keeps the most recently used files); the others are dropped (their file, if any, stays)."""
        wrote = False
        for key, e in writes:
            path = self._path(key)
            if not self.disk_bytes or e.nbytes > self.disk_bytes or path.is_file():
                continue
            try:
                private_dir(self.directory)
                e.state.save(path, metadata={TOKENS_KEY: e.meta})
                os.utime(path, (e.used, e.used))
                wrote = True
            except OSError as err:
                log.warning("prompt cache: could not write %s: %s", path, err)
        if wrote:
            self._trim_disk()

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
        """Per tier (``device``, ``ram``, ``disk``): ``<tier>_entries``, ``<tier>_bytes`` (bytes held; the disk
        tier's: its files' sizes) and ``<tier>_budget`` (bytes); ``hits`` per tier; ``misses``."""
        disk = []
        if self.directory.is_dir():
            for f in self.directory.glob("*.safetensors"):
                try:
                    disk.append(f.stat().st_size)
                except OSError:
                    continue
        with self._lock:
            return {"device_entries": len(self._device.entries), "device_bytes": self._device.used,
                    "device_budget": self._device.budget,
                    "ram_entries": len(self._ram.entries), "ram_bytes": self._ram.used,
                    "ram_budget": self._ram.budget,
                    "disk_entries": len(disk), "disk_bytes": sum(disk), "disk_budget": self.disk_bytes,
                    "hits": dict(self.hits), "misses": self.misses}


def _utime(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass
