"""Streaming layer weights from (pinned) host memory to a device, double-buffered.

A strategy's ``*N+`` stage keeps N layers resident and the rest of the model's matrices in pinned CPU
memory. ``LayerStreamer`` serves those streamed layers to the layer loop of any model family:

* two slots of device buffers, allocated once (one buffer per tensor of one layer's streamed weights, per
  slot: the layers of a model share their shapes, so two slots hold any streamed layer, no allocation per
  layer or per token);
* ``acquire(i)`` returns layer i's streamed weights in a slot (copied there if that slot does not hold it
  already) and at once issues the copy of the next streamed layer (in the order of the forward, wrapping
  around to the first one for the next forward) into the other slot, on a side stream, so that the copy
  runs while layer i computes;
* events order everything: the compute stream waits for a slot's copy before using it, and a copy into a
  slot waits for the compute that last read that slot (recorded when the next layer is acquired, by which
  time that compute is enqueued).

With at most two streamed layers both stay in the slots after the first forward: nothing is copied per
token. With three or more every streamed layer is copied once per forward, one layer ahead of the compute.

On a device without streams (the CPU: tests run the same logic there) the copy is a plain synchronous
``copy_`` and the events are skipped.

Weights are plain tensors or packed weights of a format (``rwkv_chat.models.formats``): dataclasses
whose tensor fields are copied field by field into buffers of the same size, strides and dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch


def tensors_of(w: Any) -> list[tuple[str | None, torch.Tensor]]:
    """The tensors a weight consists of: ``[(None, w)]`` for a tensor, ``[(field, tensor), ...]`` for a
    packed weight (a dataclass with tensor fields)."""
    if isinstance(w, torch.Tensor):
        return [(None, w)]
    if dataclasses.is_dataclass(w):
        return [(f.name, getattr(w, f.name)) for f in dataclasses.fields(w)
                if isinstance(getattr(w, f.name), torch.Tensor)]
    raise TypeError(f"cannot stream a {type(w).__name__}: neither a tensor nor a packed weight")


def _rebuild(w: Any, parts: list[torch.Tensor]) -> Any:
    if isinstance(w, torch.Tensor):
        return parts[0]
    names = [n for n, _ in tensors_of(w)]
    return dataclasses.replace(w, **dict(zip(names, parts)))


def _signature(name: str, field: str | None, t: torch.Tensor) -> tuple:
    return (name, field, tuple(t.shape), tuple(t.stride()), t.dtype)


def _nbytes_strided(t: torch.Tensor) -> int:
    """Bytes of the storage a dense tensor of t's size and strides spans."""
    if t.numel() == 0:
        return 0
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return span * t.element_size()


def slot_bytes(layers: list[dict[str, Any]]) -> int:
    """Bytes of one slot's buffers for the streamed weights ``layers`` (per layer: name -> tensor or packed
    weight; any device, meta included): one buffer per distinct (name, field, shape, strides, dtype)."""
    seen: dict[tuple, int] = {}
    for layer in layers:
        for name, w in layer.items():
            for field, t in tensors_of(w):
                seen[_signature(name, field, t)] = _nbytes_strided(t)
    return sum(seen.values())


def host_bytes(layer: dict[str, Any]) -> int:
    """Bytes copied to stream one layer: its streamed weights' tensors."""
    return sum(t.numel() * t.element_size() for w in layer.values() for _, t in tensors_of(w))


class LayerStreamer:
    """Double-buffered streaming of some layers' weights to ``device`` (see the module docstring).

    Args:
        device: the device the streamed layers compute on (a CUDA device, or the CPU for the same logic
            with plain copies).
        host: layer index -> {name: tensor or packed weight} in host memory (pinned for asynchronous copies),
            the weights to stream; the order of the forward is the order of the indices.
    Attributes:
        order: the streamed layer indices in forward order.
        copies: layers copied so far (a counter, for tests and benchmarks). copied_bytes: bytes copied so far.
        buffer_bytes: bytes of the two slots' buffers on ``device`` (allocated at the first copy).
    Raises:
        ValueError: ``host`` is empty.
    """

    def __init__(self, device: torch.device, host: dict[int, dict[str, Any]]):
        if not host:
            raise ValueError("nothing to stream: no layers given")
        self.device = torch.device(device)
        self.host = host
        self.order = sorted(host)
        self._next = {i: self.order[(k + 1) % len(self.order)] for k, i in enumerate(self.order)}
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._bufs: list[dict[tuple, torch.Tensor]] = [{}, {}]    # slot -> signature -> buffer
        self._holds: list[int | None] = [None, None]              # layer index in each slot
        self._params: list[dict | None] = [None, None]            # its weights as views of the buffers
        self._ready: list[Any] = [None, None]                     # event: the slot's copy is done
        self._free: list[Any] = [None, None]                      # event: the compute reading the slot is done
        self._last: int | None = None                             # slot handed out last
        self.buffer_bytes = 2 * slot_bytes(list(host.values()))
        self.copies = 0
        self.copied_bytes = 0

    def _buffer(self, slot: int, key: tuple, like: torch.Tensor) -> torch.Tensor:
        buf = self._bufs[slot].get(key)
        if buf is None:
            buf = self._bufs[slot][key] = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype,
                                                               device=self.device)
        return buf

    def _copy(self, i: int, slot: int) -> None:
        """Issue the copy of layer i's weights into ``slot`` (after the compute that last read it)."""
        # buffers first (allocated once, outside the side stream: they belong to the compute stream's pool)
        plan = [(name, w, [(t, self._buffer(slot, _signature(name, field, t), t)) for field, t in tensors_of(w)])
                for name, w in self.host[i].items()]
        with torch.cuda.stream(self._stream) if self._cuda else contextlib.nullcontext():
            if self._cuda and self._free[slot] is not None:
                self._stream.wait_event(self._free[slot])
            for _, _, pairs in plan:
                for t, buf in pairs:
                    buf.copy_(t, non_blocking=self._cuda)
            if self._cuda:
                ev = torch.cuda.Event()
                ev.record(self._stream)
                self._ready[slot] = ev
        params = {name: _rebuild(w, [buf for _, buf in pairs]) for name, w, pairs in plan}
        self._holds[slot], self._params[slot] = i, params
        self.copies += 1
        self.copied_bytes += host_bytes(self.host[i])

    def acquire(self, i: int) -> dict[str, Any]:
        """Layer i's streamed weights on the device, ready for the compute stream, valid until the
        acquire after next; issues the copy of the next streamed layer into the other slot.

        Raises:
            KeyError: layer i is not streamed here.
        """
        if i not in self.host:
            raise KeyError(f"layer {i} is not streamed")
        if self._last is not None and self._cuda:      # the compute of the layer handed out last is enqueued
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._free[self._last] = ev
        if i in self._holds:
            slot = self._holds.index(i)
        else:
            slot = 1 - self._last if self._last is not None else 0
            self._copy(i, slot)
        if self._cuda:
            torch.cuda.current_stream(self.device).wait_event(self._ready[slot])
        self._last = slot
        nxt = self._next[i]
        if nxt not in self._holds:
            self._copy(nxt, 1 - slot)
        return self._params[slot]
