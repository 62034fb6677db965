"""A real daemon (tiny v5.2 model) under fuzzed signed requests of every message type, and under a bounded load
of concurrent clients. The longer soak of both is ``bench/soak.py``."""

from __future__ import annotations

import threading
import typing

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.config import load_config, save_config
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.models.text.templates import RWKV_CHAT

from ..conftest import MODEL_NAMES, SHARED
from .conftest import Raw, greedy, make_home, start_daemon, stop_daemon, wait_for

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_path):
    """A daemon whose generations are short (max_tokens at most 48): fuzzed requests that are accepted end soon."""
    h = make_home(tmp_path_factory.mktemp("robust"))
    paths = home_paths(h)
    cfg = load_config(paths.config_file)
    cfg.sampling = cfg.sampling.updated(max_tokens=16)
    cfg.daemon.max_tokens_limit = 48
    save_config(cfg, paths.config_file)
    start_daemon(h, model_path("5.2"))
    with Client(paths, autostart=False) as c:
        wait_for(lambda: (c.status().get("model") or {}).get("loaded"), timeout=180, interval=0.2)
    yield h
    stop_daemon(h)


# ---------------------------------------------------------------- fuzzing: signed but malformed requests
REQUESTS = [t for t in typing.get_args(m.Request) if t is not m.Shutdown]
OTHERS = list(typing.get_args(m.Reply)) + list(typing.get_args(m.Event))       # not requests: refused

MODEL = str(SHARED / "models" / MODEL_NAMES["5.2"])
texts = st.one_of(
    st.text(max_size=24),                                                 # any unicode, NUL included
    st.sampled_from(["", "\x00", "c\x00", "../../etc/passwd", "~daemon", "c1", "ok-id", "é" * 70, " ",
                     "\ud7ff\ue000\U0010ffff", "x" * 5000]),
    st.sampled_from(["\x01" * 1_500_000, "é" * 600_000]),                 # over a frame when quoted thrice
)
#: values that get a request further, by field name (else hostile texts)
FIELDS = {
    "conversation_id": st.sampled_from(["fz1", "fz2", "c1"]),
    "topic": st.sampled_from(["t1", "fz1", "~daemon"]),
    "path": st.sampled_from([MODEL, "", "/", "/dev/zero", "/etc/passwd", MODEL + "\x00"]),
    "strategy": st.sampled_from(["cpu fp32", "cpu fp32 *1 -> cpu bf16", "cuda fp16", "cpu fp23", "cpu fp32 -> x"]),
    "fmt": st.sampled_from(["md", "json"]),
}
numbers = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63), 10**6]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(texts, numbers, st.booleans(), st.none(), st.binary(max_size=16))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(texts, inner, max_size=3), max_leaves=6)
sampling = st.dictionaries(st.sampled_from(["temperature", "top_p", "top_k", "max_tokens", "seed", "alpha_decay",
                                            "alpha_presence", "alpha_frequency", "bogus", "\x00"]),
                           st.one_of(numbers, st.none()), max_size=4)


def _typed(name: str, tp):
    """Values of the field's own type, with hostile contents."""
    origin = typing.get_origin(tp)
    if tp is str:
        return st.one_of(FIELDS[name], texts) if name in FIELDS else texts
    if tp is bool:
        return st.booleans()
    if tp in (int, float):
        return numbers
    if origin is dict:
        return sampling
    if origin is list:
        return st.lists(texts, max_size=20)
    return anything


@st.composite
def bodies(draw):
    """A message body: mostly a request with every field of its own type (hostile values), else one with a
    field missing, of another type or unknown, a reply or event (not a request), or no message at all."""
    kind = draw(st.sampled_from(["typed"] * 7 + ["malformed"] * 2 + ["other"]))
    cls = draw(st.sampled_from(OTHERS if kind == "other" else REQUESTS + [m.Load, m.Complete, m.Chat]))
    body = {"t": cls.__name__}
    for f in msgspec.structs.fields(cls):
        if f.required or draw(st.booleans()):
            body[f.name] = draw(_typed(f.name, f.type))
    if kind == "malformed":
        how = draw(st.sampled_from(["drop", "retype", "unknown"]))
        names = [f.name for f in msgspec.structs.fields(cls)]
        if how == "drop" and names:
            body.pop(draw(st.sampled_from(names)), None)
        elif how == "retype" and names:
            body[draw(st.sampled_from(names))] = draw(anything)
        else:
            body[draw(texts)] = draw(anything)
    return body


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=st.one_of(bodies(), bodies(), bodies(), anything))
# the reproductions: a Failed quoting a strategy thrice, a Failed echoing a path, a Started echoing a
# message, each over one frame
@example(body={"t": "Load", "client_id": "k", "topic": "t1", "path": MODEL, "strategy": "cpu fp32 " + "\x01" * 400_000})
@example(body={"t": "Load", "client_id": "k", "topic": "t1", "path": "/" + "p" * ((4 << 20) - 200),
               "strategy": "cpu fp32"})
@example(body={"t": "Chat", "client_id": "k", "conversation_id": "fz3", "message": "m" * ((4 << 20) - 200)})
def test_fuzzed_signed_requests_are_answered_or_refused(home, body):
    raw = Raw(home)
    try:
        raw.send(body)
        raw.send(m.Ping(client_id="after"))
        replies = []
        while True:
            r = raw.reply(20)
            assert r is not None, "the daemon stopped answering"
            if isinstance(r, m.Pong):
                break
            replies.append(r)
        assert len(replies) <= 1                  # an answer (a typed error or the request's reply), or none
        for r in replies:
            assert not (isinstance(r, m.Error) and r.kind == "Internal"), r
    finally:
        raw.close()                               # its jobs are cancelled with it


def test_the_daemon_serves_normally_after_the_fuzzing(home):
    with Client(home_paths(home), autostart=False) as c:
        wait_for(lambda: not c.status()["active"] and not c.status()["queued"], timeout=30)
        done = list(c.complete("After the storm", max_tokens=8, **GREEDY))[-1]
        assert done.tokens == 8 and c.status()["model"]["loaded"]


# ---------------------------------------------------------------- load: concurrent clients
def test_concurrent_clients_all_progress_with_intact_transcripts(home, model_path):
    n = 12
    paths = home_paths(home)
    with Client(paths, autostart=False) as c:
        rss0 = c.status()["memory"]["rss_bytes"]
    results: dict = {}
    errors: list = []
    start = threading.Barrier(n)

    def client(i: int) -> None:
        try:
            with Client(paths, autostart=False, timeout=60) as c:
                cid = f"load{i}"
                c.create_conversation(conversation_id=cid, **GREEDY)
                start.wait(60)
                out = []
                for msg in (f"Hello number {i}!", "And then?"):
                    events = list(c.chat(cid, msg, max_tokens=16))
                    tokens = "".join(e.text for e in events if isinstance(e, m.Token))
                    out.append((msg, tokens, events[-1]))
                results[i] = (out, c.conversation(cid).turns)
        except BaseException as e:  # noqa: BLE001
            errors.append((i, e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(n))                     # every client progressed to the end
    for i, (out, turns) in results.items():
        for msg, tokens, done in out:
            assert isinstance(done, m.Done) and done.reason in ("stop", "length") and done.tokens > 0
            assert tokens.strip() == done.text                   # the stream and the reply agree
        assert [t.text for t in turns] == [out[0][0], out[0][2].text, out[1][0], out[1][2].text]
        first = greedy(model_path("5.2"), RWKV_CHAT.transcript("", []) + RWKV_CHAT.prompt(out[0][0]), 16)
        assert out[0][2].text == first.split(RWKV_CHAT.stop)[0].strip()     # no other client's text in it
    with Client(paths, autostart=False) as c:
        assert c.status()["memory"]["rss_bytes"] - rss0 < 256 << 20
