"""The ``rwkv-chat-state/1`` state file: what ``State`` and the families' own states (``KVState``) share on disk.

A state file is a safetensors file whose tensors are ``layers.{i}.{name}`` (``i`` from 0 to ``n_layer - 1``,
``name`` one of a layer's tensor names, each with the batch B first), plus whatever a family adds, and whose
metadata (str -> str) records :data:`RESERVED`: ``format`` (:data:`FORMAT`), the model's ``version`` and
``fingerprint``, ``token_count``, ``names`` (a JSON list), ``n_layer`` and ``batch``; a family may reserve
more (``kind``, ...). Every other entry is the caller's own.

* :func:`write_atomic` writes a file so that a crash never leaves half of it;
* :func:`merged_metadata` checks the caller's entries;
* :func:`open_state_file` opens a file, checks its format and reads the metadata every state file records
  (:class:`StateFile`), then the tensors, turning every failure into a ``StateError`` that names the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rwkv_chat.models.errors import StateError

if TYPE_CHECKING:
    import torch

FORMAT = "rwkv-chat-state/1"
#: the metadata entries every state file writes itself (a caller's metadata may not use them)
RESERVED = ("format", "version", "fingerprint", "token_count", "names", "n_layer", "batch")


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename, fsync of the
    folder), so a crash never leaves a half-written file. Returns the path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def merged_metadata(own: dict[str, str], extra: dict[str, str] | None,
                    reserved: tuple[str, ...] = RESERVED) -> dict[str, str]:
    """``own`` updated with ``extra``: the caller's metadata of a state file. Raises StateError for a key in
    ``reserved`` (the fields the file format writes itself) or an entry that is not str -> str."""
    meta = {**own, **(extra or {})}
    for k, v in meta.items():
        if k in reserved or not isinstance(k, str) or not isinstance(v, str):
            raise StateError(f"metadata entry {k!r} is reserved or not str -> str")
    return meta


@dataclass(frozen=True)
class StateFile:
    """An open state file (see :func:`open_state_file`) and the metadata every state file records.

    Attributes:
        path: the file.
        handle: its open ``safetensors.safe_open`` handle (tensors on the CPU).
        meta: all of its metadata, str -> str.
        version, fingerprint: the model's (non-empty).
        names: a layer's tensor names (from the metadata, or as the opener gave them).
        n_layer, batch, token_count: non-negative integers.
        keys: the names of its tensors.
    """

    path: Path
    handle: Any
    meta: dict[str, str]
    version: str
    fingerprint: str
    names: tuple[str, ...]
    n_layer: int
    batch: int
    token_count: int
    keys: frozenset[str]

    def tensor(self, key: str) -> "torch.Tensor":
        """The tensor ``key`` as stored; StateError naming the file and the key when it is missing."""
        if key not in self.keys:
            raise StateError(f"state file {self.path}: tensor {key!r} is missing")
        return self.handle.get_tensor(key)

    def layers(self, check: Callable[[str, "torch.Tensor"], None]) -> list[tuple["torch.Tensor", ...]]:
        """The tensors ``layers.{i}.{name}`` per layer in the order of :attr:`names`; ``check(key, tensor)``
        raises StateError for a tensor of the wrong kind. StateError naming the file and the key of a missing
        tensor."""
        layers = []
        for i in range(self.n_layer):
            layer = []
            for n in self.names:
                key = f"layers.{i}.{n}"
                t = self.tensor(key)
                check(key, t)
                layer.append(t)
            layers.append(tuple(layer))
        return layers

    def user(self, reserved: tuple[str, ...] = RESERVED) -> dict[str, str]:
        """The caller's own metadata: every entry but those in ``reserved``."""
        return {k: v for k, v in self.meta.items() if k not in reserved}


@contextmanager
def open_state_file(path: str | os.PathLike, *, what: str = "an rwkv-chat state file", kind: str | None = None,
                    names: tuple[str, ...] | None = None) -> Iterator[StateFile]:
    """Open the state file ``path`` and read its common metadata, for a ``with`` block that reads the rest.

    Args:
        path: the file.
        what: what the file must be, for the message when it is not (e.g. "a KV cache state file").
        kind: the metadata ``kind`` the file must have too (None: any).
        names: a layer's tensor names when the family fixes them (the ``names`` metadata is then not read);
            None reads them from the metadata (a non-empty JSON list of non-empty str).
    Yields:
        A :class:`StateFile`, open for the block.
    Raises:
        StateError: the file is missing; it is not ``what`` (its ``format``, and ``kind`` when given, differ);
            a metadata field is missing or does not parse (the message names the file and the field); and,
            for the block too, safetensors' own errors (truncated or corrupt file) as "cannot read state file
            PATH: ..." and a StateError whose message does not name the file with "state file PATH: " before it.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StateError(f"state file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT or (kind is not None and meta.get("kind") != kind):
                got = f"format {meta.get('format')!r}" + ("" if kind is None else f", kind {meta.get('kind')!r}")
                raise StateError(f"{path} is not {what} ({got})")
            version, fingerprint = _field(path, meta, "version"), _field(path, meta, "fingerprint")
            names = tuple(names) if names is not None else _field(path, meta, "names", _names)
            n_layer, batch = _field(path, meta, "n_layer", _count), _field(path, meta, "batch", _count)
            token_count = _field(path, meta, "token_count", _count)
            yield StateFile(path, f, meta, version, fingerprint, names, n_layer, batch, token_count,
                            frozenset(f.keys()))
    except StateError as e:
        if str(path) in str(e):
            raise
        raise StateError(f"state file {path}: {e}") from None
    except Exception as e:  # safetensors' own errors (truncated header, bad offsets, ...)
        raise StateError(f"cannot read state file {path}: {e}") from e


def _names(text: str) -> tuple[str, ...]:
    names = json.loads(text)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("not a list of tensor names")
    return tuple(names)


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError("not a non-negative integer")
    return int(text)


def _field(path: Path, meta: dict[str, str], name: str, parse=None):
    """Metadata field ``name`` of the state file ``path``, parsed by ``parse``; StateError naming the file and
    the field when it is missing or does not parse."""
    if name not in meta:
        raise StateError(f"state file {path}: metadata field {name!r} is missing")
    value = meta[name]
    if parse is None:
        if not value:
            raise StateError(f"state file {path}: metadata field {name!r} is empty")
        return value
    try:
        return parse(value)
    except (ValueError, TypeError) as e:      # json.JSONDecodeError is a ValueError
        raise StateError(f"state file {path}: metadata field {name!r} has the wrong type "
                         f"({value[:40]!r}: {e})") from None
