"""Frames: signing, tampering, replay, staleness, versions, bounds, fuzzing; connection files; binds."""

from __future__ import annotations

import os
import stat
import typing

import msgspec
import pytest
import torch
from hypothesis import given, settings, strategies as st

from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.daemon.protocol import codec as p
from rwkv_chat.daemon.protocol import connection

KEY = bytes(range(32))


def _frames(msg=None, codec=None, **kw):
    codec = codec or p.Codec(KEY)
    return codec.build(msg or m.Chat(client_id="k1", conversation_id="c1", message="hello"), **kw)


def test_roundtrip_request_and_event():
    c = p.Codec(KEY)
    msg, bufs = c.parse(_frames())
    assert msg == m.Chat(client_id="k1", conversation_id="c1", message="hello") and bufs == []
    topic, ev, _ = c.parse(_frames(m.Token(job_id="j", seq=1, text="é"), topic=b"c1"), topic=True)
    assert topic == b"c1" and ev.text == "é"


@pytest.mark.parametrize("index", [0, 1, 2])
def test_tampered_frame_is_rejected(index):
    frames = [bytearray(f) for f in _frames()]
    frames[index][len(frames[index]) // 2] ^= 0x01
    with pytest.raises(p.ProtocolError):
        p.Codec(KEY).parse([bytes(f) for f in frames])


def test_tampered_topic_and_buffer_are_rejected():
    frames = _frames(m.Token(job_id="j", seq=1, text="x"), topic=b"c1")
    with pytest.raises(p.ProtocolError, match="signature"):
        p.Codec(KEY).parse([b"c2"] + frames[1:], topic=True)
    frames = _frames(m.Ok(), buffers=[b"\x00" * 16])
    with pytest.raises(p.ProtocolError, match="signature"):
        p.Codec(KEY).parse(frames[:-1] + [b"\x01" * 16])


def test_wrong_key_unsigned_and_truncated():
    frames = _frames()
    with pytest.raises(p.ProtocolError, match="signature"):
        p.Codec(b"x" * 32).parse(frames)
    with pytest.raises(p.ProtocolError):
        p.Codec(KEY).parse([b""] + frames[1:])          # unsigned
    with pytest.raises(p.ProtocolError, match="truncated"):
        p.Codec(KEY).parse(frames[:2])
    with pytest.raises(p.ProtocolError):
        p.Codec(KEY).parse([frames[0], frames[1], frames[2][:-3]])


def test_replay_is_rejected():
    c = p.Codec(KEY)
    frames = _frames()
    c.parse(frames)
    with pytest.raises(p.ProtocolError, match="replayed"):
        c.parse(frames)


def test_stale_and_future_timestamps_are_rejected():
    old = _frames(codec=p.Codec(KEY, clock=lambda: 1_000.0))
    with pytest.raises(p.ProtocolError, match="window"):
        p.Codec(KEY).parse(old)
    import time

    future = _frames(codec=p.Codec(KEY, clock=lambda: time.time() + 3600))
    with pytest.raises(p.ProtocolError, match="window"):
        p.Codec(KEY).parse(future)


def _signed(header: bytes, body: bytes) -> list[bytes]:
    return [p._mac(KEY, [header, body]), header, body]


def test_unknown_version_and_unknown_message_are_rejected():
    import time

    body = msgspec.msgpack.encode(m.Ok())
    header = msgspec.msgpack.encode(p.Header(p.PROTOCOL_VERSION + 1, "a" * 32, time.time()))
    with pytest.raises(p.ProtocolError, match="version"):
        p.Codec(KEY).parse(_signed(header, body))
    header = msgspec.msgpack.encode(p.Header(p.PROTOCOL_VERSION, "b" * 32, time.time()))
    with pytest.raises(p.ProtocolError, match="bad body"):
        p.Codec(KEY).parse(_signed(header, msgspec.msgpack.encode({"t": "Exec", "cmd": "rm -rf /"})))
    with pytest.raises(p.ProtocolError, match="bad body"):
        p.Codec(KEY).parse(_signed(header, msgspec.msgpack.encode({"t": "Ping", "client_id": 5})))


def test_size_bounds():
    with pytest.raises(p.ProtocolError, match="exceeds"):
        _frames(m.Complete(client_id="k", topic="t", prompt="x" * (p.MAX_BODY + 1)))
    frames = _frames()
    with pytest.raises(p.ProtocolError, match="too many frames"):
        p.Codec(KEY).parse(frames + [b""] * (p.MAX_BUFFERS + 1))
    with pytest.raises(p.ProtocolError, match="oversized"):
        p.Codec(KEY).parse([frames[0], b"\x00" * (p.MAX_HEADER + 1), frames[2]])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzzed_frames_raise_only_protocol_error(frames):
    with pytest.raises(p.ProtocolError):
        p.Codec(KEY).parse(frames)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2), st.integers(0, 10_000), st.integers(1, 255))
def test_any_single_byte_flip_is_rejected(frame, pos, flip):
    frames = [bytearray(f) for f in _frames()]
    f = frames[frame]
    f[pos % len(f)] ^= flip
    with pytest.raises(p.ProtocolError):
        p.Codec(KEY).parse([bytes(x) for x in frames])


def test_tensor_frames_roundtrip_without_pickle():
    ts = {"a": torch.randn(2, 3), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(4).half()}
    metas, bufs = p.tensor_frames(ts)
    frames = _frames(m.StateReply(metadata={}, tensors=metas), buffers=bufs)
    reply, got = p.Codec(KEY).parse(frames)
    back = p.frames_to_tensors(reply.tensors, got)
    for k, v in ts.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    with pytest.raises(p.ProtocolError, match="do not fit"):
        p.frames_to_tensors(reply.tensors, [b"\x00"] * len(bufs))


def test_connection_file_permissions(tmp_path):
    d = tmp_path / "run"
    info = connection.ConnectionInfo(request="ipc:///x", events="ipc:///y", key=connection.new_key().hex(), pid=1)
    path = d / "daemon.json"
    connection.write_connection_file(path, info)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert connection.read_connection_file(path) == info
    os.chmod(path, 0o644)
    with pytest.raises(p.ProtocolError, match="other users"):
        connection.read_connection_file(path)


def test_tcp_beyond_loopback_needs_curve():
    connection.check_bind("tcp://127.0.0.1:5555", have_curve=False)
    connection.check_bind("tcp://[::1]:5555", have_curve=False)
    connection.check_bind("ipc:///tmp/x.sock", have_curve=False)
    for ep in ("tcp://0.0.0.0:5555", "tcp://192.168.1.5:5555", "tcp://example.com:5555"):
        with pytest.raises(p.ProtocolError, match="CURVE"):
            connection.check_bind(ep, have_curve=False)
        connection.check_bind(ep, have_curve=True)
    with pytest.raises(p.ProtocolError):
        connection.check_bind("udp://1.2.3.4:1", have_curve=True)


@pytest.mark.parametrize("ts", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_timestamps_are_outside_the_window(ts):
    with pytest.raises(p.ProtocolError, match="window"):
        p.Codec(KEY).parse(_frames(codec=p.Codec(KEY, clock=lambda: ts)))


def test_requests_beyond_the_limits_are_named_in_short():
    with pytest.raises(m.LimitError, match=r"stop has 17 strings; the limit is 16"):
        m.check_request(m.Complete(client_id="k", topic="t", prompt="", stop=["a"] * 17))
    with pytest.raises(m.LimitError, match="system prompt"):
        m.check_request(m.SetSystemPrompt(conversation_id="c", text="é" * (m.MAX_TEXT // 2 + 1)))
    m.check_request(m.SetSystemPrompt(conversation_id="c", text="é" * (m.MAX_TEXT // 2)))
    with pytest.raises(m.LimitError, match="offset must be >= 0"):
        m.check_request(m.ListConversations(offset=-1))
    assert len(m.quote("\x01" * 10**6)) < 4 * m.MAX_QUOTE + 40          # a repr of its first MAX_QUOTE


def test_every_message_is_in_its_union_and_in_any_message():
    """Each message struct of requests.py, replies.py and events.py is in that module's union and is reachable from
    messages; their unions together are AnyMessage, what the codec decodes, and no other struct derives from Msg."""
    from rwkv_chat.daemon.protocol import events, replies, requests

    def subclasses(cls):
        return {s for c in cls.__subclasses__() for s in {c} | subclasses(c)}

    seen = set()
    for mod, union in ((requests, m.Request), (replies, m.Reply), (events, m.Event)):
        defined = {v for v in vars(mod).values()
                   if isinstance(v, type) and issubclass(v, m.Msg) and v.__module__ == mod.__name__}
        assert defined and defined == set(typing.get_args(union)), mod.__name__
        assert all(getattr(m, t.__name__) is t for t in defined)
        seen |= defined
    assert seen == set(typing.get_args(m.AnyMessage)) == subclasses(m.Msg)
