"""One real daemon (tiny v5.2 model) against hostile and careless clients over real sockets: requests at and
beyond the protocol's limits, a store that outgrows one frame, silent and vanished connections, long stop
strings, non-finite timestamps, floods of bad frames, interrupted saves."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import msgspec
import pytest

from rwkv_chat.daemon import protocol as p
from rwkv_chat.daemon.client import Client, DaemonError
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import codec
from rwkv_chat.daemon.protocol import messages as m

from .conftest import Raw, cli, make_home, start_daemon, stop_daemon, wait_for


def _alive(home) -> None:
    r = Raw(home)
    try:
        assert isinstance(r.request(m.Ping(client_id="probe")), m.Pong), "the daemon does not answer"
    finally:
        r.close()


def _limit_error(reply, *words) -> None:
    assert isinstance(reply, m.Error) and reply.kind == "LimitError", reply
    assert len(reply.message) < 300 and all(w in reply.message for w in words), reply.message


def _active_ids(c: Client) -> set:
    return {j["job_id"] for j in c.status()["active"]}


# ---------------------------------------------------------------- 1: one valid request never kills the daemon
def test_requests_beyond_a_frame_get_a_typed_error_and_the_daemon_serves_on(daemon_home, client, model_path):
    raw = Raw(daemon_home)
    try:
        # a Chat whose body is just under the frame limit (its Started event, an echo, was over it)
        room = codec.MAX_BODY - len(msgspec.msgpack.encode(m.Chat(client_id="k", conversation_id="huge1",
                                                                    message=""))) - 16
        _limit_error(raw.request(m.Chat(client_id="k", conversation_id="huge1", message="x" * room)),
                     "message", f"{m.MAX_TEXT:,}")
        # a Load with a 4 MiB path (its Failed event echoed it)
        _limit_error(raw.request(m.Load(client_id="k", topic="t1", path="/" + "p" * ((4 << 20) - 100),
                                        strategy="cpu fp32")), "path", f"{m.MAX_PATH:,}")
    finally:
        raw.close()
    # the public client: a strategy of 400,000 control characters (an error quoting it thrice was 4.8 MB)
    with pytest.raises(DaemonError) as ei:
        list(client.load(model_path("5.2"), "cpu fp32 " + "\x01" * 400_000))
    assert ei.value.kind == "LimitError" and len(ei.value.message) < 300
    # within the limits, a bad strategy fails typed and its text is quoted in short
    with pytest.raises(DaemonError) as ei:
        list(client.load(model_path("5.2"), "cpu fp32 " + "\x01" * (m.MAX_STRATEGY - 9)))
    assert ei.value.kind == "StrategyError" and len(ei.value.message) <= 1100
    _alive(daemon_home)
    done = list(client.complete("Still here", max_tokens=4))[-1]
    assert isinstance(done, m.Done) and done.tokens == 4


# ---------------------------------------------------------------- 4: a store beyond one frame
def test_a_store_beyond_one_frame_is_listed_in_pages_and_limits_are_enforced(daemon_home, client):
    prompt = "Be kind. " * (900_000 // 9)                    # 0.9 MB each: 5.4 MB in all, over one frame
    ids = [client.create_conversation(conversation_id=f"big{i}", system_prompt=prompt).id for i in range(6)]
    try:
        listed = {c.id: c for c in client.conversations()}
        assert set(ids) <= set(listed)
        for cid in ids:
            assert listed[cid].truncated and listed[cid].system_prompt == prompt[:m.SUMMARY_CHARS]
        assert client.conversation(ids[0]).conversation.system_prompt == prompt      # whole where asked
        out = cli(daemon_home, "conversations", "list").stdout
        assert all(cid in out for cid in ids)
        # documented limits, enforced at the request with a clear error
        with pytest.raises(DaemonError) as ei:
            client.set_system_prompt(ids[0], "x" * (m.MAX_TEXT + 1))
        assert ei.value.kind == "LimitError" and "system prompt" in ei.value.message
        assert f"{m.MAX_TEXT + 1:,}" in ei.value.message and f"{m.MAX_TEXT:,}" in ei.value.message
        with pytest.raises(DaemonError) as ei:
            list(client.chat(ids[0], "é" * (m.MAX_TEXT // 2 + 1)))        # bytes count, not characters
        assert ei.value.kind == "LimitError" and "message" in ei.value.message
        with pytest.raises(DaemonError) as ei:
            client.rename(ids[0], "t" * (m.MAX_TITLE + 1))
        assert ei.value.kind == "LimitError" and "title" in ei.value.message
        assert client.conversation(ids[0]).conversation.turns == 0             # nothing half-done
    finally:
        for cid in ids:
            client.delete(cid)


def test_a_conversation_beyond_one_frame_comes_in_pages(daemon_home, client):
    """Turns that add up to 6 MB (one of them longer than the limit, as an older version could store) are
    read back whole, page by page, and exported whole."""
    cid = client.create_conversation(conversation_id="longconv", title="long").id
    texts = [f"{i}:" + chr(0x4e00 + i) * 300_000 for i in range(6)]          # 0.9 MB of UTF-8 each
    texts[3] = "L" * (m.MAX_TEXT + 5000)                                       # stored beyond the limit
    db = sqlite3.connect(home_paths(daemon_home).database, timeout=30)
    with db:
        db.executemany("INSERT INTO turns(conversation_id,idx,role,text,tokens,created,finished,parent,depth)"
                       " VALUES (?,?,?,?,?,?,?,?,?)",
                       [(cid, i, "user" if i % 2 == 0 else "assistant", t, 1, 1.0, 1.0, i - 1, i)
                        for i, t in enumerate(texts)])
        db.execute("UPDATE conversations SET leaf=5 WHERE id=?", (cid,))     # the path the turns make
    db.close()
    try:
        detail = client.conversation(cid)
        assert [t.index for t in detail.turns] == list(range(6))
        for i, t in enumerate(detail.turns):
            if i == 3:
                assert t.truncated and t.text == texts[3][:m.MAX_TEXT]
            else:
                assert not t.truncated and t.text == texts[i]
        exported = json.loads(client.export(cid, "json"))
        assert [t["text"] for t in exported["turns"]] == texts
    finally:
        client.delete(cid)


# ---------------------------------------------------------------- 7: ownership, reaping, max_tokens
def test_max_tokens_is_bounded_by_the_config(client):
    for call in (lambda: list(client.complete("x", max_tokens=10**6)),
                 lambda: client.create_conversation(max_tokens=10**6),
                 lambda: list(client.chat("maxtok", "hi", max_tokens=100_001))):
        with pytest.raises(DaemonError) as ei:
            call()
        assert ei.value.kind == "LimitError" and "max_tokens_limit" in ei.value.message
    cid = client.create_conversation(conversation_id="maxtok2").id
    with pytest.raises(DaemonError) as ei:
        client.set_sampling(cid, max_tokens=2**63)
    assert ei.value.kind == "LimitError"
    client.delete(cid)


def test_a_silent_connection_with_an_empty_client_id_is_reaped(daemon_home, client):
    raw = Raw(daemon_home)
    try:
        acc = raw.request(m.Complete(client_id="", topic="silent1", prompt="On and on",
                                     sampling={"max_tokens": 100_000}))
        assert isinstance(acc, m.Accepted)
        wait_for(lambda: acc.job_id in _active_ids(client), timeout=10)
        # the connection stays open and says nothing: cancelled after client_timeout (2 s here)
        t0 = time.monotonic()
        wait_for(lambda: acc.job_id not in _active_ids(client), timeout=8)
        assert time.monotonic() - t0 < 6
    finally:
        raw.close()


def test_a_closed_connection_loses_its_jobs_even_while_its_client_id_pings(daemon_home, client):
    owner, pinger = Raw(daemon_home), Raw(daemon_home)
    stop = threading.Event()

    def ping():                    # another connection keeps naming the same client id
        while not stop.is_set():
            pinger.send(m.Ping(client_id="kshared"))
            pinger.reply(1.0)
            stop.wait(0.2)

    t = threading.Thread(target=ping)
    t.start()
    try:
        acc = owner.request(m.Complete(client_id="kshared", topic="gone1", prompt="On and on",
                                       sampling={"max_tokens": 100_000}))
        assert isinstance(acc, m.Accepted)
        wait_for(lambda: acc.job_id in _active_ids(client), timeout=10)
        load = owner.request(m.Load(client_id="kshared", topic="gone1", path="/nonexistent/vanished.pth",
                                    strategy="cpu fp32"))
        assert isinstance(load, m.Accepted)             # queued behind the generation
        owner.close()                                   # the owner vanishes
        t0 = time.monotonic()
        wait_for(lambda: acc.job_id not in _active_ids(client), timeout=6)
        assert time.monotonic() - t0 < 1.5, "cancelled only by a timeout, not when the connection closed"
        time.sleep(0.5)
        assert "vanished.pth" not in home_paths(daemon_home).log_file.read_text(), "its queued load ran"
    finally:
        stop.set()
        t.join()
        pinger.close()


# ---------------------------------------------------------------- 9: the cost of a token and stop strings
def test_stop_strings_are_bounded_and_cost_no_more_than_the_new_text(client):
    for stop in (["\x01" * 3_000_000], ["s"] * (m.MAX_STOPS + 1), ["x" * (m.MAX_STOP_CHARS + 1)], [""]):
        with pytest.raises(DaemonError) as ei:
            list(client.complete("Once", stop=stop, max_tokens=4))
        assert ei.value.kind == "LimitError" and len(ei.value.message) < 200
    # the longest stop strings allowed, none of which matches (their start often does): about the same speed
    stops = [(" " + "etaoinshrd"[i % 10]) + "\x01" * (m.MAX_STOP_CHARS - 2) for i in range(m.MAX_STOPS)]

    def rate(stop) -> float:
        done = list(client.complete("Once upon a time", stop=stop, max_tokens=400, temperature=1.0, seed=3))[-1]
        assert done.reason == "length" and done.tokens == 400
        return done.tokens_per_s

    plain = max(rate([]), rate([]))
    with_stops = max(rate(stops), rate(stops))
    assert with_stops > 0.5 * plain, f"{with_stops:.0f} tok/s with stops, {plain:.0f} without"


# ---------------------------------------------------------------- 10: timestamps, floods, interrupted saves
def test_non_finite_timestamps_are_refused(daemon_home, client):
    before = client.status()["home"]["dropped_frames"]
    raw = Raw(daemon_home)
    try:
        for ts in (float("nan"), float("inf"), float("-inf")):
            raw.send(m.Ping(client_id="ts"), ts=ts)
            assert raw.reply(0.5) is None
    finally:
        raw.close()
    assert client.status()["home"]["dropped_frames"] == before + 3


def test_restart_removes_interrupted_saves_and_a_flood_is_logged_in_summary(tmp_path):
    home = make_home(tmp_path / "h")
    paths = home_paths(home)
    d = paths.states_dir / "c1"
    d.mkdir(parents=True)
    (d / "1.safetensors").write_bytes(b"kept")
    partial = d / ".2.safetensors.k3j9x.tmp"             # what a save killed before its rename leaves
    partial.write_bytes(b"\x00" * 4096)
    start_daemon(home, None)
    try:
        _alive(home)
        assert not partial.exists() and (d / "1.safetensors").read_bytes() == b"kept"
        raw = Raw(home)
        wrong = p.Codec(b"not the key, not the key, not it")
        for i in range(2000):
            raw.sock.send_multipart(wrong.build(m.Ping(client_id="flood")))
        assert isinstance(raw.request(m.Ping(client_id="after")), m.Pong)    # answered after the flood
        raw.close()
        with Client(paths, autostart=False) as c:
            assert c.status()["home"]["dropped_frames"] == 2000
    finally:
        stop_daemon(home)
    lines = [ln for ln in paths.log_file.read_text().splitlines() if "dropped" in ln]
    assert len(lines) <= 3, lines[:5]
    assert sum(int(ln.split("dropped ")[1].split()[0]) if "frames" in ln else 1 for ln in lines) == 2000
