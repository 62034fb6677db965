"""The recurrent state of an RWKV model: typed, batched, movable, and saved as safetensors.

A ``State`` holds, for each layer, the tensors named by its generation's ``STATE_NAMES`` with a leading
batch dimension B (B = 1 for one conversation):

* v4: ``att_x`` [B, C], ``att_a``/``att_b``/``att_p`` float32 [B, n_att], ``ffn_x`` [B, C];
* v5, v5.1, v5.2, v6: ``att_x`` [B, C], ``att_kv`` float32 [B, H, N, N] ([key, value]), ``ffn_x`` [B, C];
* v7: ``att_x`` [B, C], ``att_kv`` float32 [B, H, N, N] ([value, key]), ``ffn_x`` [B, C].

``att_x``/``ffn_x`` are in the layer's activation dtype on the layer's device. For code written against
the ``rwkv`` pip package, a State also behaves as that package's flat list of tensors (``state[i]``,
``len(state)``, iteration) in its order, without the batch dimension when B = 1.

On disk (``save``/``load``) every tensor is float32 in a safetensors file whose metadata records the
format, RWKV version, model fingerprint, token count and the caller's own entries; the write is atomic
(temporary file, fsync, rename), so a crash never leaves a half-written state.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from rwkv_chat.models.errors import StateError

FORMAT = "rwkv-chat-state/1"
_RESERVED = ("format", "version", "fingerprint", "token_count", "names", "n_layer", "batch")


class State:
    """Per-layer recurrent tensors of one model, for a batch of B sequences.

    Attributes:
        version: RWKV version string of the model ("4" … "7").
        fingerprint: the model's fingerprint (see ``loader.fingerprint``).
        names: tensor names of one layer, e.g. ("att_x", "att_kv", "ffn_x").
        layers: list of tuples of tensors, one tuple per layer, each tensor with leading dim B.
        token_count: tokens consumed since the zero (or tuned) state; per sequence when B > 1 (max).
        metadata: free-form str -> str entries that travel with the state on disk.
    """

    __slots__ = ("version", "fingerprint", "names", "layers", "token_count", "metadata")

    def __init__(self, version: str, fingerprint: str, names: tuple[str, ...], layers: list[tuple],
                 token_count: int = 0, metadata: dict[str, str] | None = None):
        self.version = version
        self.fingerprint = fingerprint
        self.names = tuple(names)
        self.layers = list(layers)
        self.token_count = int(token_count)
        self.metadata = dict(metadata or {})

    # -- shape and movement ------------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        return len(self.layers)

    @property
    def batch_size(self) -> int:
        return int(self.layers[0][0].shape[0])

    def _replace(self, layers, token_count=None) -> "State":
        return State(self.version, self.fingerprint, self.names, layers,
                     self.token_count if token_count is None else token_count, self.metadata)

    def with_layers(self, layers: list[tuple]) -> "State":
        """The same state (class, version, fingerprint, token count, metadata) holding other per-layer tensors of
        the same shapes, e.g. the same tensors moved to other devices."""
        return self._replace(layers)

    def clone(self) -> "State":
        """A deep copy (new tensors on the same devices)."""
        return self._replace([tuple(t.clone() for t in layer) for layer in self.layers])

    def to(self, device=None, dtype: torch.dtype | None = None) -> "State":
        """Move every tensor to ``device``; ``dtype`` applies to the activation-dtype tensors only
        (``att_x``, ``ffn_x``); the WKV tensors stay float32."""
        def move(name, t):
            return t.to(device=device, dtype=dtype if name.endswith("_x") else None)
        return self._replace([tuple(move(n, t) for n, t in zip(self.names, layer)) for layer in self.layers])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)

    @staticmethod
    def stack(states: list["State"]) -> "State":
        """Concatenate states of one model along the batch dimension.

        Raises:
            StateError: empty list, or states of different models.
        """
        if not states:
            raise StateError("cannot stack an empty list of states")
        first = states[0]
        for s in states[1:]:
            if (s.fingerprint, s.version, s.names, s.n_layer) != (first.fingerprint, first.version, first.names,
                                                                first.n_layer):
                raise StateError("cannot stack states of different models")
        layers = [tuple(torch.cat([s.layers[i][j].to(first.layers[i][j].device) for s in states])
                        for j in range(len(first.names))) for i in range(first.n_layer)]
        return first._replace(layers, max(s.token_count for s in states))

    def unbind(self) -> list["State"]:
        """Split a batched state into B states of batch 1 (views)."""
        return [self._replace([tuple(t[b:b + 1] for t in layer) for layer in self.layers])
                for b in range(self.batch_size)]

    # -- compatibility with the rwkv pip package's flat list -----------------------------------
    def _flat(self) -> list[torch.Tensor]:
        squeeze = self.batch_size == 1
        return [t[0] if squeeze else t for layer in self.layers for t in layer]

    def __len__(self) -> int:
        return self.n_layer * len(self.names)

    def __getitem__(self, i):
        return self._flat()[i]

    def __iter__(self):
        return iter(self._flat())

    def __repr__(self) -> str:
        return (f"State(v{self.version}, {self.n_layer} layers × {self.names}, batch={self.batch_size}, "
                f"tokens={self.token_count}, model={self.fingerprint})")

    # -- disk ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write the state as float32 safetensors, atomically.

        Args:
            path: destination file (its directory must exist).
            metadata: extra str -> str entries (merged over ``self.metadata``); reserved names
                ("format", "version", "fingerprint", "token_count", "names", "n_layer", "batch") are refused.
        Returns:
            The path written.
        Raises:
            StateError: a reserved metadata key or a non-str value.
        """
        from safetensors.torch import save

        meta = merged_metadata(self.metadata, metadata)
        meta.update(format=FORMAT, version=self.version, fingerprint=self.fingerprint,
                    token_count=str(self.token_count), names=json.dumps(self.names),
                    n_layer=str(self.n_layer), batch=str(self.batch_size))
        tensors = {f"layers.{i}.{name}": t.detach().to("cpu", torch.float32).contiguous()
                   for i, layer in enumerate(self.layers) for name, t in zip(self.names, layer)}
        return write_atomic(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "State":
        """Read a state file written by ``save`` (float32, on the CPU).

        Raises:
            StateError: missing, truncated or corrupt file, not a state file of this format, or a metadata
                field or tensor missing or of the wrong type; the message names the file and the field.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StateError(f"state file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                if meta.get("format") != FORMAT:
                    raise StateError(f"{path} is not an rwkv-chat state file (format {meta.get('format')!r})")
                version, fingerprint = _field(path, meta, "version"), _field(path, meta, "fingerprint")
                names = _field(path, meta, "names", _names)
                n_layer = _field(path, meta, "n_layer", _count)
                batch = _field(path, meta, "batch", _count)
                token_count = _field(path, meta, "token_count", _count)
                def check(key: str, t: torch.Tensor) -> None:
                    if t.dim() < 1 or t.shape[0] != batch or not t.is_floating_point():
                        raise StateError(f"state file {path}: tensor {key!r} has shape {tuple(t.shape)} and "
                                         f"dtype {t.dtype}; expected float with {batch} sequence(s) first")

                layers = read_layers(f, path, n_layer, names, check)
        except StateError:
            raise
        except Exception as e:  # safetensors' own errors (truncated header, bad offsets, ...)
            raise StateError(f"cannot read state file {path}: {e}") from e
        user = {k: v for k, v in meta.items() if k not in _RESERVED}
        return cls(version, fingerprint, names, layers, token_count, user)


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


def _names(text: str) -> tuple[str, ...]:
    names = json.loads(text)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError("not a list of tensor names")
    return tuple(names)


def _count(text: str) -> int:
    if not text.isdigit():
        raise ValueError("not a non-negative integer")
    return int(text)


def merged_metadata(own: dict[str, str], extra: dict[str, str] | None,
                    reserved: tuple[str, ...] = _RESERVED) -> dict[str, str]:
    """``own`` updated with ``extra``: the caller's metadata of a state file. Raises StateError for a key in
    ``reserved`` (the fields the file format writes itself) or an entry that is not str -> str."""
    meta = {**own, **(extra or {})}
    for k, v in meta.items():
        if k in reserved or not isinstance(k, str) or not isinstance(v, str):
            raise StateError(f"metadata entry {k!r} is reserved or not str -> str")
    return meta


def read_layers(f, path: Path, n_layer: int, names, check) -> list[tuple[torch.Tensor, ...]]:
    """The tensors ``layers.{i}.{name}`` of an open safetensors file ``f`` (``safe_open``), per layer in the
    order of ``names``; ``check(key, tensor)`` raises StateError for a tensor of the wrong kind. Raises
    StateError naming ``path`` and the key of a missing tensor."""
    keys = set(f.keys())
    layers = []
    for i in range(n_layer):
        layer = []
        for n in names:
            key = f"layers.{i}.{n}"
            if key not in keys:
                raise StateError(f"state file {path}: tensor {key!r} is missing")
            t = f.get_tensor(key)
            check(key, t)
            layer.append(t)
        layers.append(tuple(layer))
    return layers


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
