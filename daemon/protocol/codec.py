"""The one module that builds, signs and parses rwkv-chat daemon frames.

Frame layout (one ZeroMQ multipart message; a ROUTER prepends the peer identity, a PUB a topic)::

    [signature, header, body, *buffers]

* ``header`` — msgpack of :class:`Header` (``v`` = :data:`PROTOCOL_VERSION`, ``id`` = 128-bit random hex,
  ``ts`` = sender's wall clock, seconds since the epoch).
* ``body`` — msgpack of one struct of :mod:`rwkv_chat.daemon.protocol.messages` (tagged union, tag field ``t``).
* ``buffers`` — raw tensor bytes (states), described by ``TensorMeta`` entries in the body; never pickled.
* ``signature`` — HMAC-SHA256 (RFC 2104) with the key from the connection file over
  ``topic? || header || body || buffers``, each part prefixed with its length as 8-byte big-endian.

:meth:`Codec.parse` drops (raises :class:`ProtocolError`) anything unsigned, tampered, truncated,
oversized, of another protocol version, outside the timestamp window (a NaN or infinite timestamp is
outside it), or replayed (ids seen within the window are remembered).

The key and the endpoints come from the connection file (:mod:`rwkv_chat.daemon.protocol.connection`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict

import msgspec
import zmq

from . import messages as m

PROTOCOL_VERSION = 1
MAX_HEADER = 256                 # bytes
MAX_BODY = 4 * 1024 * 1024       # bytes of msgpack body
MAX_BUFFERS = 1024               # raw tensor frames per message
MAX_MESSAGE = 512 * 1024 * 1024  # bytes of one whole message (the ROUTER's ZMQ_MAXMSGSIZE too)
TIME_WINDOW = 60.0               # seconds a message's timestamp may differ from the receiver's clock
MAX_REMEMBERED = 200_000         # replay-protection ids kept
SIG_LEN = 32


class ProtocolError(Exception):
    """A frame is unsigned, tampered, truncated, oversized, replayed, stale or of another version,
    or a connection file / endpoint is unusable. The message says which."""


class Header(msgspec.Struct, array_like=True):
    v: int
    id: str
    ts: float


_HEADER_ENC = msgspec.msgpack.Encoder()
_HEADER_DEC = msgspec.msgpack.Decoder(Header)
_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(m.AnyMessage)


def _mac(key: bytes, parts) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        p = memoryview(p)
        h.update(p.nbytes.to_bytes(8, "big"))
        h.update(p)
    return h.digest()


class Codec:
    """Builds and parses signed frames with one key; remembers recent message ids (replay protection).

    Not thread-safe: give each thread (or socket owner) its own Codec with the same key.
    """

    def __init__(self, key: bytes, *, window: float = TIME_WINDOW, clock=time.time):
        if len(key) < 16:
            raise ProtocolError("signing key shorter than 16 bytes")
        self.key = key
        self.window = window
        self.clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    # -- building
    def build(self, msg: m.Msg, buffers=(), topic: bytes | None = None) -> list:
        """Frames for ``msg`` (with ``topic`` first when given, for PUB). Raises ProtocolError if too big."""
        header = _HEADER_ENC.encode(Header(PROTOCOL_VERSION, secrets.token_hex(16), self.clock()))
        body = _ENC.encode(msg)
        if len(body) > MAX_BODY:
            raise ProtocolError(f"message body of {len(body)} bytes exceeds {MAX_BODY}")
        if len(buffers) > MAX_BUFFERS:
            raise ProtocolError(f"{len(buffers)} buffers exceed {MAX_BUFFERS}")
        parts = [header, body, *buffers]
        sig = _mac(self.key, ([topic] if topic is not None else []) + parts)
        return ([topic] if topic is not None else []) + [sig] + parts

    # -- parsing
    def parse(self, frames, topic: bool = False):
        """Verify and decode ``frames`` -> ``(msg, buffers)`` (``(topic, msg, buffers)`` with ``topic``).

        ``frames`` are bytes or zmq Frames, without the ROUTER identity. Raises :class:`ProtocolError`.
        """
        frames = [f.buffer if isinstance(f, zmq.Frame) else f for f in frames]
        head = 1 if topic else 0
        if len(frames) < head + 3:
            raise ProtocolError(f"truncated message: {len(frames)} frames")
        if len(frames) > head + 3 + MAX_BUFFERS:
            raise ProtocolError(f"too many frames: {len(frames)}")
        total = sum(memoryview(f).nbytes for f in frames)
        if total > MAX_MESSAGE:
            raise ProtocolError(f"oversized message: {total} bytes")
        sig, header, body = frames[head], frames[head + 1], frames[head + 2]
        if memoryview(header).nbytes > MAX_HEADER or memoryview(body).nbytes > MAX_BODY:
            raise ProtocolError("oversized header or body")
        if memoryview(sig).nbytes != SIG_LEN:
            raise ProtocolError("missing or malformed signature")
        want = _mac(self.key, list(frames[:head]) + list(frames[head + 1:]))
        if not hmac.compare_digest(bytes(sig), want):
            raise ProtocolError("bad signature")
        try:
            h = _HEADER_DEC.decode(header)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProtocolError(f"bad header: {e}") from e
        if h.v != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {h.v}, this side speaks {PROTOCOL_VERSION}")
        now = self.clock()
        if not math.isfinite(h.ts) or not abs(now - h.ts) <= self.window:     # NaN/inf never pass
            raise ProtocolError(f"timestamp {h.ts:.3f} outside the {self.window:.0f} s window")
        if h.id in self._seen:
            raise ProtocolError(f"replayed message {h.id}")
        try:
            msg = _DEC.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ProtocolError(f"bad body: {e}") from e
        self._remember(h.id, now)
        buffers = frames[head + 3:]
        if topic:
            return bytes(frames[0]), msg, buffers
        return msg, buffers

    def _remember(self, msg_id: str, now: float) -> None:
        self._seen[msg_id] = now
        while self._seen:
            oldest_id, t = next(iter(self._seen.items()))
            if now - t > 2 * self.window or len(self._seen) > MAX_REMEMBERED:
                self._seen.popitem(last=False)
            else:
                break


def tensor_frames(tensors: dict) -> tuple[list[m.TensorMeta], list]:
    """Describe and serialise named CPU tensors as raw frames (contiguous bytes, no pickling)."""
    import torch

    metas, bufs = [], []
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        metas.append(m.TensorMeta(name, str(t.dtype).removeprefix("torch."), list(t.shape)))
        bufs.append(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return metas, bufs


def frames_to_tensors(metas: list[m.TensorMeta], buffers) -> dict:
    """Inverse of :func:`tensor_frames`. Raises ProtocolError if a frame's size disagrees with its meta."""
    import torch

    if len(metas) != len(buffers):
        raise ProtocolError(f"{len(metas)} tensor descriptions for {len(buffers)} frames")
    out = {}
    for meta, buf in zip(metas, buffers):
        dtype = getattr(torch, meta.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ProtocolError(f"unknown dtype {meta.dtype!r}")
        t = torch.frombuffer(bytearray(buf), dtype=torch.uint8)
        n = 1
        for s in meta.shape:
            n *= s
        if t.numel() != n * torch.empty((), dtype=dtype).element_size():
            raise ProtocolError(f"tensor {meta.name}: {t.numel()} bytes do not fit shape {meta.shape}")
        out[meta.name] = t.view(dtype).reshape(meta.shape)
    return out
