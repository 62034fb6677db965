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
(temporary file, fsync, rename), so a crash never leaves a half-written state. The file format and its
reader: :mod:`rwkv_chat.models.state_file`; :func:`read_header` reads what a state file records without its
tensors (any family's: a transformer's KV cache state too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rwkv_chat.models.errors import StateError
from rwkv_chat.models.state_file import FORMAT, merged_metadata, open_state_file, write_atomic


def read_header(path: str | os.PathLike) -> tuple[str, int, dict[str, str]]:
    """``(fingerprint, token_count, metadata)`` of the state file ``path`` — the model's fingerprint, the tokens
    the state consumed, all of its str -> str metadata — read without loading a tensor (any family's state file:
    ``State`` or a family's own, e.g. a KV cache). Raises StateError as ``open_state_file`` does (missing file,
    another format, a common metadata field missing or malformed, a corrupt header)."""
    with open_state_file(path) as sf:
        return sf.fingerprint, sf.token_count, dict(sf.meta)


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
        with open_state_file(path) as sf:
            def check(key: str, t: torch.Tensor) -> None:
                if t.dim() < 1 or t.shape[0] != sf.batch or not t.is_floating_point():
                    raise StateError(f"state file {sf.path}: tensor {key!r} has shape {tuple(t.shape)} and "
                                     f"dtype {t.dtype}; expected float with {sf.batch} sequence(s) first")

            layers = sf.layers(check)
        return cls(sf.version, sf.fingerprint, sf.names, layers, sf.token_count, sf.user())
