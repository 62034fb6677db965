"""One real daemon (tiny v5.2 model) serving real clients over ZeroMQ."""

from __future__ import annotations

import json
import threading

import pytest
import zmq
from hypothesis import HealthCheck, given, settings, strategies as st

from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.daemon import protocol as p
from rwkv_chat.daemon.client import Client, DaemonError, GenerationFailed
from rwkv_chat.daemon.config import Config
from rwkv_chat.daemon.launcher import _secure

from .conftest import cli, greedy

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}


def _run(gen) -> tuple[list, m.Done]:
    events = list(gen)
    assert isinstance(events[-1], m.Done)
    return events, events[-1]


def test_cli_complete_equals_engine_greedy(daemon_home, model_path):
    r = cli(daemon_home, "complete", "The capital of", "--max-tokens", 24, "--temperature", 0,
            "--alpha-frequency", 0, "--alpha-presence", 0)
    assert r.stdout == greedy(model_path("5.2"), "The capital of", 24)
    assert "24 tokens" in r.stderr


def test_two_clients_get_independent_streams(daemon_home, model_path):
    prompts = ["Once upon a time", "In 1990, the"]
    out: dict = {}

    def worker(prompt):
        with Client(home_paths(daemon_home), autostart=False) as c:
            events, done = _run(c.complete(prompt, max_tokens=20, **GREEDY))
            out[prompt] = ("".join(e.text for e in events if isinstance(e, m.Token)), done)

    threads = [threading.Thread(target=worker, args=(pr,)) for pr in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for pr in prompts:
        text, done = out[pr]
        assert text == done.text == greedy(model_path("5.2"), pr, 20)


def test_watcher_sees_another_clients_generation_live(daemon_home, client):
    cid = "watched1"
    client.create_conversation(conversation_id=cid, title="w")
    seen: list = []
    ready = threading.Event()

    def watch():
        with Client(home_paths(daemon_home), autostart=False) as w:
            gen = w.subscribe(cid, watch_timeout=0.1)
            next(gen)                            # subscription is live
            ready.set()
            for ev in gen:
                if ev is not None:
                    seen.append(ev)
                if isinstance(ev, m.Done):
                    gen.close()
                    return

    t = threading.Thread(target=watch)
    t.start()
    assert ready.wait(30)
    events, done = _run(client.chat(cid, "Hello!", max_tokens=16, **GREEDY))
    t.join(60)
    assert isinstance(seen[0], m.Started) and seen[0].message == "Hello!"
    assert any(isinstance(e, m.Progress) and e.phase == "prefill" for e in seen)
    assert "".join(e.text for e in seen if isinstance(e, m.Token)) == "".join(
        e.text for e in events if isinstance(e, m.Token))
    assert seen[-1] == done


def test_cancel_stops_generation_and_keeps_the_reply_so_far(client):
    cid = "cancel1"
    gen = client.chat(cid, "Tell me a long story.", max_tokens=5000, temperature=1.0)
    for ev in gen:
        if isinstance(ev, m.Token):
            break
    client.cancel(conversation_id=cid)
    rest = list(gen)
    assert isinstance(rest[-1], m.Done) and rest[-1].reason == "cancelled"
    assert rest[-1].tokens < 5000
    turns = client.conversation(cid).turns
    assert [(t.text, t.reason) for t in turns] == [("Tell me a long story.", ""), (rest[-1].text, "cancelled")]
    assert client.status()["active"] == []


def test_closing_the_stream_cancels(client):
    gen = client.complete("Again and again", max_tokens=5000)
    for ev in gen:
        if isinstance(ev, m.Token):
            break
    gen.close()
    from .conftest import wait_for

    wait_for(lambda: client.status()["active"] == [], timeout=10)


def test_conversation_lifecycle_regenerate_and_edit(client):
    info = client.create_conversation(title="Greedy", system_prompt="You are terse.", **GREEDY)
    cid = info.id
    _, d1 = _run(client.chat(cid, "What is 2+2?", max_tokens=12))
    _, d2 = _run(client.chat(cid, "And 3+3?", max_tokens=12))
    detail = client.conversation(cid)
    assert [t.role for t in detail.turns] == ["user", "assistant"] * 2
    assert detail.turns[-1].text == d2.text
    _, r = _run(client.regenerate(cid, max_tokens=12))   # greedy from the restored state: the same reply
    assert r.text == d2.text
    assert len(client.conversation(cid).turns) == 4
    _, e = _run(client.edit_last_user(cid, "And 5+5?", max_tokens=12))
    turns = client.conversation(cid).turns
    assert [t.text for t in turns][2] == "And 5+5?" and turns[3].text == e.text and len(turns) == 4
    client.rename(cid, "Sums")
    client.set_sampling(cid, top_k=3)
    conv = client.conversation(cid).conversation
    assert conv.title == "Sums" and conv.sampling["top_k"] == 3 and conv.sampling["temperature"] == 0.0
    assert "**User:** And 5+5?" in client.export(cid, "md")
    assert json.loads(client.export(cid, "json"))["title"] == "Sums"
    meta, tensors = client.get_state(cid)
    assert meta["fingerprint"] == conv.model_fingerprint and tensors
    assert cid in [c.id for c in client.conversations()]
    client.delete(cid)
    with pytest.raises(DaemonError) as ei:
        client.conversation(cid)
    assert ei.value.kind == "NotFound"


def test_invalid_ids_and_failures_are_typed(daemon_home, client):
    with pytest.raises(DaemonError) as ei:
        client.conversation("../etc")
    assert ei.value.kind == "InvalidId"
    with pytest.raises(DaemonError):
        list(client.regenerate(client.create_conversation().id))      # nothing to regenerate
    with pytest.raises(GenerationFailed) as ei:
        list(client.load("/nonexistent/model.pth", "cpu fp32"))
    assert ei.value.kind == "NotFound" and "/nonexistent/model.pth" in str(ei.value)
    _, done = _run(client.complete("Still serving", max_tokens=3))        # the old model still serves
    assert done.tokens == 3


def _raw_socket(daemon_home):
    info = p.read_connection_file(home_paths(daemon_home).connection_file)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    _secure(s, info)                      # the transport of a client holding the connection file
    s.connect(info.request)
    return s, p.Codec(info.key_bytes), p.Codec(b"wrong key wrong key wrong key!!")


def test_tampered_replayed_and_foreign_frames_are_dropped(daemon_home, client):
    s, good, bad = _raw_socket(daemon_home)
    before = client.status()["home"]["dropped_frames"]
    frames = good.build(m.Ping(client_id=""))
    s.send_multipart(bad.build(m.Ping(client_id="")))                 # wrong key
    s.send_multipart([frames[0], frames[1], frames[2] + b"\x00"])     # tampered
    s.send_multipart(frames[:2])                                       # truncated
    s.send_multipart(frames)                                           # the genuine one: answered
    assert s.poll(5000)
    reply, _ = good.parse(s.recv_multipart())
    assert isinstance(reply, m.Pong)
    s.send_multipart(frames)                                           # replayed
    assert not s.poll(500)
    s.close()
    assert client.status()["home"]["dropped_frames"] == before + 4


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_fuzzed_frames_do_not_disturb_the_daemon(daemon_home, frames):
    s, good, _ = _raw_socket(daemon_home)
    if frames:
        s.send_multipart(frames)
    s.send_multipart(good.build(m.Ping(client_id="")))
    assert s.poll(5000)
    assert isinstance(good.parse(s.recv_multipart())[0], m.Pong)
    s.close()


def test_status_doctor_and_second_start(daemon_home, model_path):
    st_ = json.loads(cli(daemon_home, "daemon", "status", "--json").stdout)
    assert st_["running"] and st_["model"]["version"] == "5.2" and st_["model"]["strategy"] == "cpu fp32"
    assert st_["memory"]["rss_bytes"] > 0 and "cpu" in st_["devices"] and st_["uptime"] > 0
    human = cli(daemon_home, "daemon", "status").stdout
    assert "RWKV v5.2" in human and "cpu fp32" in human
    assert "  * cpu fp32, store" in human and "0-cpu-float32" not in human    # the stages, not every layer
    invariant = st_["model"]["batch_invariant"]                 # whether neighbours can change a conversation
    assert isinstance(invariant, bool)
    assert ("do not depend on the others" if invariant else "batch-invariant: no") in human
    prompts = st_["home"]["sessions"]["prompt_cache"]           # the three tiers of shared prompt states
    assert prompts["device_budget"] == Config().daemon.prompt_cache_device_bytes
    assert set(prompts["hits"]) == {"device", "ram", "disk"}
    assert "prompt states: 0 on the model's devices (0.0 MiB of " in human
    doc = json.loads(cli(daemon_home, "doctor", "--json").stdout)
    assert doc["daemon"]["running"] and doc["paths"]["data"].startswith(str(daemon_home))
    assert "version" in doc["torch"]
    families = ("wkv4", "wkv5", "wkv6", "wkv7", "mm8", "gemm")
    assert set(families) <= set(doc["kernels"]["cpu"]) and set(families) <= set(doc["kernels"]["cuda"])
    assert all(doc["kernels"]["cpu"][f] == "ok" for f in ("wkv4", "wkv5", "wkv6", "wkv7", "mm8"))
    assert all(doc["kernels"]["cuda"][f] != "ok" for f in families) or doc["torch"]["cuda_available"]
    assert doc["kernel_builds"]["cpu"]["dir"].startswith(str(daemon_home))
    text = cli(daemon_home, "doctor").stdout          # nested sections as lines, kernels of one status on one line
    assert "{" not in text and "  cpu:\n" in text
    cpu_kernels = {f for line in text.split("[kernels]")[1].split("  cuda:")[0].splitlines()[2:]
                   for f in line.strip().split(":")[0].split(", ") if line.startswith("    ")}
    assert set(families) <= cpu_kernels, text
    r = cli(daemon_home, "daemon", "start", "--foreground", check=False, timeout=60)
    assert r.returncode == 3 and f"pid {st_['pid']}" in r.stderr
    r = cli(daemon_home, "daemon", "start")
    assert "already running" in r.stderr


def test_cli_chat_and_conversations(daemon_home):
    r = cli(daemon_home, "chat", "--conversation", "cli1", "Hi", "--max-tokens", 8, "--temperature", 0)
    reply = r.stdout.strip()
    listing = cli(daemon_home, "conversations", "list").stdout
    assert "cli1" in listing
    shown = cli(daemon_home, "conversations", "show", "cli1").stdout
    assert "User: Hi" in shown and f"Assistant: {reply}" in shown
    exported = json.loads(cli(daemon_home, "conversations", "export", "cli1", "--format", "json").stdout)
    assert exported["turns"][1]["text"] == reply
    cli(daemon_home, "conversations", "rm", "cli1")
    assert "cli1" not in cli(daemon_home, "conversations", "list").stdout


def test_cli_names_conversations_by_id_prefix_or_title_and_refuses_bad_names(daemon_home, client):
    for args in (["chat", "--conversation", "my trip", "hi"], ["chat", "--conversation", "../../x", "hi"],
                 ["conversations", "show", "../etc"], ["conversations", "rm", "../etc"],
                 ["conversations", "export", "no such one"]):
        r = cli(daemon_home, *args, check=False)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (args, r.stderr)
        assert not r.stdout
    trip = client.create_conversation(title="my trip", conversation_id="trip0a1b2c", **GREEDY)
    client.create_conversation(title="other", conversation_id="trip0a9z")
    r = cli(daemon_home, "chat", "--conversation", "my trip", "Where to?", "--max-tokens", 4)
    assert [t.text for t in client.conversation(trip.id).turns][0] == "Where to?"
    assert "Where to?" in cli(daemon_home, "conversations", "show", "trip0a1").stdout      # an id prefix
    r = cli(daemon_home, "chat", "--conversation", "trip0a1", "More?", "--max-tokens", 4, check=False)
    assert r.returncode == 2 and "trip0a1b2c" in r.stderr and r.stderr.count("\n") == 1, r.stderr   # writes none
    assert len(client.conversation(trip.id).turns) == 2 and not client.find("trip0a1b")[1:]
    assert [c.id for c in client.find("trip0a1")] == ["trip0a1b2c"]                       # "trip0a1" not made
    r = cli(daemon_home, "conversations", "show", "trip0a", check=False)                   # two of them
    assert r.returncode == 2 and "trip0a1b2c" in r.stderr and "trip0a9z" in r.stderr
    cli(daemon_home, "conversations", "rm", "other")
    assert [c.id for c in client.find("trip0a")] == ["trip0a1b2c"]
    r = cli(daemon_home, "conversations", "rm", "tri", check=False)          # a short prefix removes nothing
    assert r.returncode == 2 and "at least 4 characters" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert [c.id for c in client.find("trip0a")] == ["trip0a1b2c"]
    client.create_conversation(title="ab", conversation_id="ab12cd34")
    cli(daemon_home, "conversations", "rm", "ab")                            # a short title is a title
    assert not client.find("ab12")


def test_ctrl_c_cancels_the_generation_in_the_daemon(daemon_home, client):
    import os
    import signal
    import subprocess

    from .conftest import CLI, env_for, wait_for

    proc = subprocess.Popen([*CLI, "complete", "Forever", "--max-tokens", "100000"], env=env_for(daemon_home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stdout.fileno(), False)
    wait_for(lambda: proc.stdout.read(1), timeout=60)
    assert client.status()["active"]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and b"cancelled" in err
    wait_for(lambda: client.status()["active"] == [], timeout=5)    # well before a heartbeat timeout


def test_changing_the_system_prompt_rebuilds_the_state_from_the_turns(client, model_path):
    """After a new system prompt, the next reply comes from a state rebuilt from the whole transcript
    under that prompt (the engine's greedy continuation of it), and the turn after that from the saved state."""
    from rwkv_chat.models.text.templates import RWKV_CHAT

    info = client.create_conversation(title="sys", system_prompt="You are terse.", **GREEDY)
    cid = info.id
    _, d1 = _run(client.chat(cid, "What is 2+2?", max_tokens=12))
    client.set_system_prompt(cid, "You answer in rhymes.")
    assert client.conversation(cid).conversation.system_prompt == "You answer in rhymes."
    _, d2 = _run(client.chat(cid, "And 3+3?", max_tokens=12))
    text = RWKV_CHAT.transcript("You answer in rhymes.", [("What is 2+2?", d1.text)]) + RWKV_CHAT.prompt("And 3+3?")
    assert d2.prompt_tokens == len(text.encode())                       # rebuilt: the whole transcript ran
    want = greedy(model_path("5.2"), text, 12)
    assert d2.text == want.split(RWKV_CHAT.stop)[0].strip()
    _, d3 = _run(client.chat(cid, "Thanks.", max_tokens=4))
    assert d3.prompt_tokens == len(RWKV_CHAT.prompt("Thanks.").encode())     # resumed from the new saved state
    assert [t.text for t in client.conversation(cid).turns] == ["What is 2+2?", d1.text, "And 3+3?", d2.text,
                                                                "Thanks.", d3.text]


def test_load_reports_layer_progress(daemon_home, client, model_path):
    """The load's progress events, layer by layer (``rwkv-chat load`` draws them as one bar on a terminal:
    ``tests/app/test_cli.py``)."""
    from rwkv_chat.models import RWKV

    events = list(client.load(str(model_path("5.2")), "cpu fp32"))
    done = [e.done for e in events if isinstance(e, m.Progress)]
    total = RWKV(model=str(model_path("5.2")), strategy="cpu fp32", verbose=False).n_layer + 1
    assert done[0] == 0 and done[-1] == total and done == sorted(done)
    assert isinstance(events[-1], m.Done) and events[-1].reason == "loaded"


def test_cli_closed_stdout_exits_quietly_and_cancels(daemon_home, client):
    import subprocess

    from .conftest import CLI, env_for, wait_for

    proc = subprocess.Popen([*CLI, "complete", "Forever", "--max-tokens", "100000"], env=env_for(daemon_home),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(5)
    proc.stdout.close()                                   # like `| head -c 5`
    err = proc.stderr.read()
    assert proc.wait(60) == 0 and b"Traceback" not in err and b"BrokenPipe" not in err
    wait_for(lambda: client.status()["active"] == [], timeout=10)


def test_cli_bench_dispatches_to_the_benchmark(daemon_home):
    r = cli(daemon_home, "bench", "--help")
    assert "--shape" in r.stdout and "--batch" in r.stdout
