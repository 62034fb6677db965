"""The KV cache as a conversation's state: ``KVState``, a ``State`` whose per-layer tensors are keys and values.

Per layer ``names = ("k", "v")``: k, v [B, K, L, D] in the layer's activation dtype on the layer's device (K key/value
heads, L = ``token_count`` cached positions, D head size, RoPE already applied to k), and the token ids
``tokens`` int64 [B, L] (CPU) that produced them.

Growth without a copy per token: a forward writes the new positions into a preallocated ``Buffer`` (capacity
``CHUNK · 2^k`` positions, at most the model's context limit) and the new state's tensors are views of its
first L + T positions; the state it came from still sees its first L (positions below a buffer's ``filled`` mark
are never written again). A second forward from that older state (a branch) finds ``filled`` past its length and
copies into a new buffer. ``clone()`` gives compact tensors (capacity = length).

On disk (``save``/``load``): the ``rwkv-chat-state/1`` safetensors layout of ``State`` (``layers.{i}.k``,
``layers.{i}.v``, only the filled positions, in the cache's dtype, not float32) plus ``tokens`` and the metadata
``kind = "kv-cache"`` and ``dtype``; ``State.load`` reads such a file too (the daemon's state export).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rwkv_chat.models.errors import StateError
from rwkv_chat.models.state import State
from rwkv_chat.models.state_file import FORMAT, RESERVED, merged_metadata, open_state_file, write_atomic

KIND = "kv-cache"
NAMES = ("k", "v")
#: positions of the smallest buffer; buffers double from there (``span``)
CHUNK = 256
_RESERVED = RESERVED + ("kind", "dtype")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def span(need: int, limit: int) -> int:
    """Positions to allocate (or attend over) for ``need``: the smallest ``CHUNK · 2^k >= need``, at most ``limit``
    (but never below ``need``). Doubling keeps the copies of a growing cache linear in its length in all."""
    cap = CHUNK
    while cap < need:
        cap *= 2
    return max(need, min(limit, cap))


class Buffer:
    """Preallocated keys/values of B sequences: per layer k, v [B, K, capacity, D]; ``tokens`` int64 [B, capacity]
    (CPU); ``filled``: positions written so far (those below are never written again)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], tokens: torch.Tensor, filled: int):
        self.layers, self.tokens, self.filled = layers, tokens, filled

    @property
    def capacity(self) -> int:
        return int(self.tokens.shape[1])

    @classmethod
    def grown(cls, state: "KVState", need: int, limit: int) -> "Buffer":
        """A new buffer for ``need`` positions (``span(need, limit)``) holding ``state``'s. The positions past the
        state's are left uninitialised (no fill kernel per layer): every reader stops at ``filled`` or at the
        positions a forward wrote first."""
        cap = span(need, limit)
        L, B = state.token_count, state.batch_size
        layers = []
        for k, v in state.layers:
            nk = k.new_empty(B, k.shape[1], cap, k.shape[3])
            nv = v.new_empty(B, v.shape[1], cap, v.shape[3])
            nk[:, :, :L].copy_(k)
            nv[:, :, :L].copy_(v)
            layers.append((nk, nv))
        tokens = torch.zeros(B, cap, dtype=torch.long)
        tokens[:, :L].copy_(state.tokens)
        return cls(layers, tokens, L)


class KVState(State):
    """A KV cache (see the module docstring).

    Args: as ``State`` (``names`` must be ``("k", "v")``, every k/v of length ``token_count`` on dim 2), and
        tokens: int64 [B, token_count] token ids (CPU), or None for zeros (ids unknown).
        buffer: the ``Buffer`` the tensors are views of, or None (compact tensors).
    Raises:
        StateError: other names, or tensors or tokens whose length is not ``token_count``.
    """

    __slots__ = ("tokens", "buffer")

    def __init__(self, version: str, fingerprint: str, names: tuple[str, ...], layers: list[tuple],
                 token_count: int = 0, metadata: dict[str, str] | None = None, *,
                 tokens: torch.Tensor | None = None, buffer: Buffer | None = None):
        super().__init__(version, fingerprint, names, layers, token_count, metadata)
        if self.names != NAMES:
            raise StateError(f"a KV cache has the tensors {NAMES}, got {self.names}")
        B = self.batch_size if self.layers else 1
        if tokens is None:
            tokens = torch.zeros(B, self.token_count, dtype=torch.long)
        if tuple(tokens.shape) != (B, self.token_count):
            raise StateError(f"token ids of shape {tuple(tokens.shape)}; expected {(B, self.token_count)}")
        for i, (k, v) in enumerate(self.layers):
            if k.dim() != 4 or k.shape != v.shape or k.shape[2] != self.token_count:
                raise StateError(f"layer {i}: keys {tuple(k.shape)} and values {tuple(v.shape)} do not hold "
                                 f"{self.token_count} positions [B, K, L, D]")
        self.tokens, self.buffer = tokens, buffer

    # -- what State's methods build ---------------------------------------------------------------
    def _replace(self, layers, token_count=None) -> "KVState":
        same = all(a is b for la, lb in zip(layers, self.layers) for a, b in zip(la, lb))
        return KVState(self.version, self.fingerprint, self.names, layers,
                       self.token_count if token_count is None else token_count, self.metadata,
                       tokens=self.tokens, buffer=self.buffer if same else None)

    def clone(self) -> "KVState":
        """A deep copy with compact tensors (capacity = length), on the same devices."""
        return self._make([tuple(t.clone() for t in layer) for layer in self.layers], self.tokens.clone())

    def to(self, device=None, dtype: torch.dtype | None = None) -> "KVState":
        """Every key/value moved to ``device`` and ``dtype`` (None: unchanged)."""
        return self._replace([tuple(t.to(device=device, dtype=dtype) for t in layer) for layer in self.layers])

    def _make(self, layers, tokens: torch.Tensor, buffer: Buffer | None = None) -> "KVState":
        return KVState(self.version, self.fingerprint, self.names, layers, int(tokens.shape[1]), self.metadata,
                       tokens=tokens, buffer=buffer)

    @staticmethod
    def stack(states: list["KVState"]) -> "KVState":
        """Concatenate caches of one model and one length along the batch dimension (StateError otherwise)."""
        if not states or len({s.token_count for s in states}) != 1:
            raise StateError("only KV caches of the same length stack into one batch")
        first = states[0]
        if any((s.fingerprint, s.version, s.n_layer) != (first.fingerprint, first.version, first.n_layer)
               for s in states):
            raise StateError("cannot stack states of different models")
        layers = [tuple(torch.cat([s.layers[i][j].to(first.layers[i][j].device) for s in states]) for j in range(2))
                  for i in range(first.n_layer)]
        return first._make(layers, torch.cat([s.tokens for s in states]))

    def unbind(self) -> list["KVState"]:
        """Split into B caches of batch 1 (views)."""
        return [self._make([tuple(t[b:b + 1] for t in layer) for layer in self.layers], self.tokens[b:b + 1])
                for b in range(self.batch_size)]

    def writable(self, need: int, limit: int) -> Buffer:
        """A buffer to write positions ``token_count .. need - 1`` into: this state's own when nothing was written
        past its length and it is large enough, else a new one (``Buffer.grown``)."""
        buf = self.buffer
        if buf is not None and buf.filled == self.token_count and buf.capacity >= need:
            return buf
        return Buffer.grown(self, need, limit)

    def __repr__(self) -> str:
        return (f"KVState(qwen{self.version}, {self.n_layer} layers, batch={self.batch_size}, "
                f"tokens={self.token_count}, model={self.fingerprint})")

    # -- disk -----------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
        """Write the filled positions (in the cache's dtype), the token ids and the metadata as safetensors,
        atomically. Raises StateError for a reserved or non-str metadata entry."""
        from safetensors.torch import save

        meta = merged_metadata(self.metadata, metadata, _RESERVED)
        dtype = self.layers[0][0].dtype if self.layers else torch.float32
        meta.update(format=FORMAT, kind=KIND, version=self.version, fingerprint=self.fingerprint,
                    token_count=str(self.token_count), names=json.dumps(self.names), n_layer=str(self.n_layer),
                    batch=str(self.batch_size), dtype=str(dtype).replace("torch.", ""))
        tensors = {f"layers.{i}.{n}": t.detach().to("cpu").contiguous()
                   for i, layer in enumerate(self.layers) for n, t in zip(self.names, layer)}
        tensors["tokens"] = self.tokens.to(torch.long).contiguous()
        return write_atomic(path, save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "KVState":
        """Read a KV cache file written by ``save`` (CPU, its saved dtype).

        Raises:
            StateError: missing, truncated or corrupt file, not a KV cache file, or a field or tensor missing or
                of the wrong type or shape; the message names the file and the field.
        """
        with open_state_file(path, what="a KV cache state file", kind=KIND, names=NAMES) as sf:
            path, batch, count = sf.path, sf.batch, sf.token_count
            dtype = _DTYPES.get(sf.meta.get("dtype", ""))
            if dtype is None:
                raise StateError(f"state file {path}: metadata field 'dtype' is {sf.meta.get('dtype')!r}")
            def check(key: str, t: torch.Tensor) -> None:
                if t.dtype != dtype or t.dim() != 4 or t.shape[0] != batch or t.shape[2] != count:
                    raise StateError(f"state file {path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}; "
                                     f"expected {dtype} [{batch}, K, {count}, D]")

            layers = sf.layers(check)
            tokens = sf.tensor("tokens")
            if tokens.dtype != torch.long:
                raise StateError(f"state file {path}: tensor 'tokens' is {tokens.dtype}, expected int64")
            return cls(sf.version, sf.fingerprint, NAMES, layers, count, sf.user(_RESERVED), tokens=tokens)
