"""Daemon lifecycle: restart and resume, kill -9 of a client or the daemon, queue bound, autostart,
foreign states. Each test runs its own daemon(s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from rwkv_chat.daemon.config import load_config, save_config
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.daemon import protocol as p
from rwkv_chat.daemon.client import BusyError, Client
from rwkv_chat.models.text.templates import RWKV_CHAT

from .conftest import CLI, cli, env_for, make_home, start_daemon, stop_daemon, wait_for


def _chat(c: Client, cid: str, msg: str, **kw) -> m.Done:
    events = list(c.chat(cid, msg, **kw))
    return events[-1]


def test_resume_after_restart_equals_uninterrupted(tmp_path, model_path):
    home = make_home(tmp_path / "h")
    start_daemon(home, model_path("5.2"))
    paths = home_paths(home)
    try:
        turn1 = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=24)
        turn2 = dict(temperature=1.0, top_p=0.9, seed=8, max_tokens=24)   # the saved penalties go on; the seed
        with Client(paths, autostart=False) as c:
            u1 = _chat(c, "uninterrupted", "Hello there", **turn1)
            u2 = _chat(c, "uninterrupted", "What next?", **turn2)
            r1 = _chat(c, "resumed", "Hello there", **turn1)
        assert r1.text == u1.text
        stop_daemon(home)
        start_daemon(home, model_path("5.2"))
        with Client(paths, autostart=False) as c:
            r2 = _chat(c, "resumed", "What next?", **turn2)
            turns = c.conversation("resumed").turns
        assert r2.text == u2.text and r2.tokens == u2.tokens
        assert r2.prompt_tokens == len(RWKV_CHAT.prompt("What next?").encode())      # history not re-run
        assert [t.text for t in turns] == ["Hello there", r1.text, "What next?", r2.text]
    finally:
        stop_daemon(home)


def _streaming_chat(home, cid, *extra):
    proc = subprocess.Popen([*CLI, "chat", "--conversation", cid, "Write forever.", "--max-tokens", "100000",
                             *extra], env=env_for(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stdout.fileno(), False)
    wait_for(lambda: proc.stdout.read(1), timeout=60)     # the stream has begun
    return proc


def test_kill_9_of_a_client_cancels_its_turn_and_of_the_daemon_is_reported(tmp_path, model_path):
    home = make_home(tmp_path / "h")
    start_daemon(home, model_path("5.2"))
    paths = home_paths(home)
    try:
        first = cli(home, "chat", "--conversation", "k9", "Hi", "--max-tokens", 8, "--temperature", 0).stdout.strip()
        proc = _streaming_chat(home, "k9")
        proc.kill()
        proc.wait()
        with Client(paths, autostart=False) as c:
            wait_for(lambda: c.status()["active"] == [], timeout=15)     # heartbeats stopped -> cancelled
            turns = c.conversation("k9").turns                           # the reply so far is kept, marked
            assert [t.text for t in turns[:3]] == ["Hi", first, "Write forever."] and turns[3].reason == "cancelled"
        # now the daemon dies mid-stream: the client reports it
        pid = p.read_connection_file(paths.connection_file).pid
        proc = _streaming_chat(home, "k9")
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 4 and "daemon lost" in err.decode()
        assert f"the daemon (pid {pid}) is no longer running" in err.decode()        # not "sent nothing": it is gone
        # a new daemon cleans the stale socket/connection file; committed turns survive
        start_daemon(home, model_path("5.2"))
        assert p.read_connection_file(paths.connection_file).pid != pid
        r = cli(home, "chat", "--conversation", "k9", "Again", "--max-tokens", 4, "--temperature", 0)
        shown = cli(home, "conversations", "show", "k9").stdout
        assert f"Assistant: {first}" in shown and "User: Again" in shown and r.stdout.strip() in shown
    finally:
        stop_daemon(home)


def test_a_connected_client_tells_a_stopped_daemon_from_a_silent_one(tmp_path):
    """`daemon stop` under a connected client (the TUI's case): its next request says the daemon is no longer
    running; a daemon that holds its lock but sends nothing (SIGSTOP) is still 'sent nothing'."""
    from rwkv_chat.daemon.client import DaemonLost

    home = make_home(tmp_path / "h")
    start_daemon(home, None)
    paths = home_paths(home)
    pid = p.read_connection_file(paths.connection_file).pid
    c = Client(paths, autostart=False, heartbeat=0.25, lost_after=1.0)
    try:
        c.status()
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(DaemonLost, match=f"the daemon \\(pid {pid}\\) sent nothing for"):
                c.status()
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: c.ping(), timeout=10)
        stop_daemon(home)
        with pytest.raises(DaemonLost, match=f"the daemon \\(pid {pid}\\) is no longer running"):
            c.status()
    finally:
        c.close()
        stop_daemon(home)


def test_daemon_start_with_a_model_that_does_not_load_exits_1_with_the_reason(tmp_path):
    home = make_home(tmp_path / "h")
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint\n")
    try:
        r = cli(home, "daemon", "start", "--model", bad, "--strategy", "cpu fp32", check=False)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and "CheckpointError" in last and "Traceback" not in r.stderr, r.stderr
        st = json.loads(cli(home, "daemon", "status", "--json").stdout)
        assert not st["model"].get("loaded") and st["model"]["error"]["kind"] == "CheckpointError"
        assert st["model"]["error"]["path"] == str(bad)
        assert "last load failed" in cli(home, "daemon", "status").stdout
    finally:                     # (a start whose model loads returns once it is loaded: conftest.start_daemon)
        stop_daemon(home)


def test_autostart_queue_bound_and_foreign_state(tmp_path, model_path):
    home = make_home(tmp_path / "h", queue_limit=1, max_active=1)
    paths = home_paths(home)
    cfg = load_config(paths.config_file)
    cfg.model.path = str(model_path("5.2"))
    save_config(cfg, paths.config_file)
    try:
        with Client(paths, autostart=True) as c:          # no daemon yet: starts one with the default model
            done = list(c.complete("Hi", max_tokens=2, temperature=0))[-1]   # waits for the model to load
            assert done.tokens == 2
            long = {"max_tokens": 100000}
            a = c.request(m.Complete(client_id=c.client_id, topic="qa", prompt="a", sampling=long))
            wait_for(lambda: c.status()["active"], timeout=10)
            b = c.request(m.Complete(client_id=c.client_id, topic="qb", prompt="b", sampling=long))
            assert b.queued == 0
            with pytest.raises(BusyError) as ei:
                c.request(m.Complete(client_id=c.client_id, topic="qc", prompt="c", sampling=long))
            assert (ei.value.queued, ei.value.limit) == (1, 1)
            c.cancel(job_id=a.job_id)
            c.cancel(job_id=b.job_id)
            wait_for(lambda: c.status()["active"] == [] and c.status()["queued"] == 0, timeout=15)
            _chat(c, "foreign", "Hello", max_tokens=4)
            list(c.load(str(model_path("6")), "cpu fp32"))
            assert c.status()["model"]["version"] == "6"
            assert _chat(c, "foreign", "Still there?", max_tokens=4).tokens == 4   # re-read on this model
            assert _chat(c, "fresh", "Hello", max_tokens=3).tokens == 3
    finally:
        stop_daemon(home)


def test_daemon_start_with_a_model_loads_it_into_a_running_daemon_and_an_empty_strategy_is_refused(tmp_path,
                                                                                                  model_path):
    home = make_home(tmp_path / "h")
    try:
        start_daemon(home, model_path("5.2"))
        r = cli(home, "load", model_path("7"), "--strategy", "  ", check=False)
        assert r.returncode == 2 and "--strategy is empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = cli(home, "daemon", "start", "--model", model_path("7"), "--strategy", "cpu fp32")
        assert "already running" in r.stderr and r.stderr.strip().splitlines()[-1].startswith(
            f"loaded {model_path('7')}"), r.stderr
        st = json.loads(cli(home, "daemon", "status", "--json").stdout)
        assert st["model"]["loaded"] and st["model"]["path"] == str(model_path("7"))
    finally:
        stop_daemon(home)
