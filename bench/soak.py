"""Soak of a real daemon (not a test; the CI's short versions are tests/daemon/test_robustness.py): concurrent chat
clients, a stream of fuzzed signed requests, and one long completion, for a while.

* ``--clients`` clients each chat in a conversation of their own, exchange after exchange (greedy, short
  replies); after every exchange the streamed Token text must equal the Done text and the stored transcript
  must be what was streamed. Every client must finish exchanges throughout (progress per interval).
* a fuzzer sends signed request bodies of every message type (but Shutdown) with hostile values (wrong types,
  huge/negative/NaN numbers, unicode and NUL, texts near a frame), each followed by a Ping that must be
  answered.
* one long ``complete`` with the longest stop strings allowed (none matching) reports its characters/s per
  tenth of the run: the cost of a token must not grow with the text before it.
* every 5 s: the daemon's RSS, active and queued generations.

Exits 1 if the daemon stopped answering, a client failed or stalled, a transcript differed, or RSS grew by more
than ``--rss-mb``.

    python bench/soak.py [--clients 20] [--seconds 120] [--long-tokens 60000] [MODEL]
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import typing
from pathlib import Path

GREEDY = dict(temperature=0.0, alpha_frequency=0.0, alpha_presence=0.0)
DEFAULT_MODEL = Path(__file__).resolve().parents[1].parent / "shared" / "models" / "tiny-rwkv-5v2-730K.pth"


def hostile(rng: random.Random, model: str):
    """A hostile value: any type, sizes from empty to near a frame."""
    return rng.choice([
        "", "\x00", "c1", "é" * 70, "\ud7ff\ue000\U0010ffff", "x" * 5000, "\x01" * 1_500_000, "cpu fp32", model,
        "cpu fp32 " + "\x01" * 400_000, 0, -1, 2**63 - 1, 2**64 - 1, -(2**63), 10**6, float("nan"), float("inf"),
        1.5, True, None, b"\x00\xff", [], ["a", 1], {"max_tokens": 10**9}, {"temperature": float("nan")}, {"x": "y"},
    ])


def fuzz(paths, model: str, stop: threading.Event, stats: dict) -> None:
    import secrets

    import msgspec
    import zmq

    from rwkv_chat.daemon import protocol as p
    from rwkv_chat.daemon.protocol import codec
    from rwkv_chat.daemon.protocol import messages as m

    info = p.read_connection_file(paths.connection_file)
    key, parse = info.key_bytes, p.Codec(info.key_bytes)
    rng = random.Random(1)
    types = [t for t in typing.get_args(m.AnyMessage) if t is not m.Shutdown]
    while not stop.is_set():
        cls = rng.choice(types)
        body = {"t": cls.__name__}
        for f in msgspec.structs.fields(cls):
            if rng.random() < 0.9:
                body[f.name] = hostile(rng, model)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(info.request)
        try:
            for b in (msgspec.msgpack.encode(body), msgspec.msgpack.encode(m.Ping(client_id="fuzz"))):
                header = msgspec.msgpack.encode(codec.Header(codec.PROTOCOL_VERSION, secrets.token_hex(16), time.time()))
                sock.send_multipart([codec._mac(key, [header, b]), header, b])
            while True:
                if not sock.poll(30_000):
                    stats["fuzz_dead"] = f"no answer after {str(body)[:200]}"
                    stop.set()
                    return
                if isinstance(parse.parse(sock.recv_multipart())[0], m.Pong):
                    break
            stats["fuzzed"] = stats.get("fuzzed", 0) + 1
        finally:
            sock.close(linger=0)                  # its jobs are cancelled with it


def chatter(paths, i: int, stop: threading.Event, stats: dict) -> None:
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.protocol import messages as m

    try:
        with Client(paths, autostart=False, timeout=60) as c:
            cid = f"soak{i}"
            c.create_conversation(conversation_id=cid, **GREEDY)
            expected: list[str] = []
            while not stop.is_set():
                msg = f"Client {i}, message {len(expected) // 2}"
                events = list(c.chat(cid, msg, max_tokens=24))
                done = events[-1]
                streamed = "".join(e.text for e in events if isinstance(e, m.Token)).strip()
                if not isinstance(done, m.Done) or streamed != done.text:
                    raise AssertionError(f"stream {streamed!r} != reply {getattr(done, 'text', done)!r}")
                expected += [msg, done.text]
                stored = [t.text for t in c.conversation(cid).turns]
                if stored != expected:
                    raise AssertionError(f"stored transcript differs after {len(expected) // 2} exchanges")
                stats.setdefault("exchanges", {})[i] = len(expected) // 2
                stats.setdefault("last", {})[i] = time.monotonic()
    except BaseException as e:  # noqa: BLE001
        stats.setdefault("errors", []).append((i, repr(e)[:300]))


def long_complete(paths, tokens: int, stop: threading.Event, stats: dict) -> None:
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.protocol import messages as m

    stops = [" " + "etaoinshrdlucmfw"[i] + "\x01" * (m.MAX_STOP_CHARS - 2) for i in range(m.MAX_STOPS)]
    times, chars = [], 0
    with Client(paths, autostart=False, timeout=60) as c:
        for ev in c.complete("Once upon a time", stop=stops, max_tokens=tokens, temperature=1.0, seed=1):
            if isinstance(ev, m.Token):
                chars += len(ev.text)
                times.append((time.perf_counter(), chars))
            if stop.is_set():
                break
    if len(times) > 20:
        tenth = len(times) // 10
        rates = []
        for k in range(10):
            a, b = times[k * tenth], times[min((k + 1) * tenth, len(times) - 1)]
            rates.append((b[1] - a[1]) / max(b[0] - a[0], 1e-9))
        stats["long_rates"] = rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(DEFAULT_MODEL))
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--long-tokens", type=int, default=60000)
    ap.add_argument("--rss-mb", type=float, default=512)
    args = ap.parse_args()

    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.paths import home_paths

    home = Path(tempfile.mkdtemp(prefix="rwkv-soak-"))
    env = {**os.environ, "RWKV_CHAT_HOME": str(home)}
    cli = [sys.executable, "-m", "rwkv_chat.app.cli"]
    r = subprocess.run([*cli, "load", args.model], env=env, capture_output=True, text=True)
    if r.returncode:
        subprocess.run([*cli, "daemon", "stop"], env=env, capture_output=True)
        print(f"the daemon could not load {args.model}: {r.stderr[-2000:]}")
        return 1
    paths = home_paths(home)
    stop, stats = threading.Event(), {}
    failed = []
    try:
        with Client(paths, autostart=False) as mon:
            rss0 = mon.status()["memory"]["rss_bytes"]
            threads = [threading.Thread(target=chatter, args=(paths, i, stop, stats)) for i in range(args.clients)]
            threads += [threading.Thread(target=fuzz, args=(paths, args.model, stop, stats)),
                        threading.Thread(target=long_complete, args=(paths, args.long_tokens, stop, stats))]
            for t in threads:
                t.start()
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds and not stop.is_set():
                time.sleep(5)
                s = mon.status()
                now = time.monotonic()
                stalled = [i for i, t in stats.get("last", {}).items() if now - t > 60]
                print(f"{now - t0:6.0f} s  rss {s['memory']['rss_bytes'] / 2**20:7.1f} MB  active {len(s['active']):2d}"
                      f"  queued {s['queued']:2d}  exchanges {sum(stats.get('exchanges', {}).values()):5d}"
                      f"  fuzzed {stats.get('fuzzed', 0):5d}  stalled {stalled}", flush=True)
                if stalled:
                    failed.append(f"clients {stalled} made no progress for 60 s")
                    break
            stop.set()
            for t in threads:
                t.join(120)
            rss = mon.status()["memory"]["rss_bytes"]
    except Exception as e:  # noqa: BLE001
        failed.append(f"the daemon stopped answering: {e!r}")
    finally:
        stop.set()
        subprocess.run([*cli, "daemon", "stop"], env=env, capture_output=True)
    failed += [f"client {i}: {e}" for i, e in stats.get("errors", [])]
    if "fuzz_dead" in stats:
        failed.append(stats["fuzz_dead"])
    if not failed and (rss - rss0) / 2**20 > args.rss_mb:
        failed.append(f"RSS grew by {(rss - rss0) / 2**20:.0f} MB")
    if stats.get("exchanges") and len(stats["exchanges"]) < args.clients:
        failed.append(f"only {len(stats['exchanges'])} of {args.clients} clients finished an exchange")
    if "long_rates" in stats:
        print("long complete, characters/s per tenth:", " ".join(f"{r:.0f}" for r in stats["long_rates"]))
    print(f"exchanges per client: {sorted(stats.get('exchanges', {}).values())}; fuzzed requests: {stats.get('fuzzed', 0)}")
    for f in failed:
        print("FAILED:", f)
    print("log:", paths.log_file)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
