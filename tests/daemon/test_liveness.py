"""Nothing waits unboundedly. Behind endless generations a queued request hears its position and runs within a
time slice, and a load times out with a typed error; with the default heartbeats a stopped daemon, a killed
client and a stopped stream are all noticed within about 3 s. One daemon (two places, short slices)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import pytest

from rwkv_chat.daemon.client import Client, DaemonLost, DaemonNotResponding, GenerationFailed
from rwkv_chat.daemon.config import DaemonConfig
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon import protocol as p
from rwkv_chat.daemon.protocol import messages as m

from .conftest import CLI, cli, env_for, make_home, start_daemon, stop_daemon, wait_for

DEFAULTS = DaemonConfig()
ENDLESS = {"max_tokens": 100000}


@pytest.fixture(scope="module")
def home(tmp_path_factory, model_path):
    # the default heartbeat and timeouts (what users get); two places; slices and queue waits short
    h = make_home(tmp_path_factory.mktemp("live"), heartbeat=DEFAULTS.heartbeat,
                  client_timeout=DEFAULTS.client_timeout, daemon_timeout=DEFAULTS.daemon_timeout,
                  max_active=2, max_batch=2, time_slice=1.0, queue_timeout=2.0)
    start_daemon(h, model_path("5.2"))
    yield h
    stop_daemon(h)


class Within:
    """Run ``fn`` in a thread; :meth:`result` waits ``seconds`` for it (then closes ``client`` so a stuck
    call ends, and fails) and returns ``(value or exception, seconds taken)``."""

    def __init__(self, fn, client: Client | None = None):
        self.client, self.out, self.t0 = client, None, time.monotonic()
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.out = fn()
        except BaseException as e:  # noqa: BLE001 — handed to the test
            self.out = e
        self.t = time.monotonic() - self.t0

    def result(self, seconds: float):
        self.thread.join(seconds)
        if self.thread.is_alive():
            if self.client is not None:
                self.client.close()
            raise AssertionError(f"still waiting after {seconds} s")
        return self.out, self.t


def _stream_starts(home, cid: str) -> subprocess.Popen:
    """A CLI chat that writes forever (to a file: never blocked by a full pipe), once its first text is out."""
    out = home / f"{cid}.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen([*CLI, "chat", "--conversation", cid, "Write forever.", "--max-tokens", "100000"],
                                env=env_for(home), stdout=f, stderr=subprocess.PIPE)
    wait_for(lambda: out.stat().st_size, timeout=60)
    return proc


def test_queued_request_hears_its_position_and_runs_within_a_slice(home, model_path):
    paths = home_paths(home)
    with Client(paths, autostart=False) as a, Client(paths, autostart=False) as b:
        endless = [a.request(m.Complete(client_id=a.client_id, topic=f"endless{i}", prompt="Once",
                                        sampling=ENDLESS)).job_id for i in range(2)]
        wait_for(lambda: len(a.status()["active"]) == 2, timeout=10)
        events, took = Within(lambda: list(b.complete("Hello", max_tokens=4, temperature=0)), b).result(8)
        assert isinstance(events, list), events
        queued = [e for e in events if isinstance(e, m.Queued)]
        assert queued and queued[0].position == 1 and queued[0].active == 2 and queued[0].queued == 1, events
        assert isinstance(events[-1], m.Done) and (events[-1].reason, events[-1].tokens) == ("length", 4)
        assert took < 1.0 + 2.5                                    # one time slice, and the run itself
        # the generation that yielded its place came back: both endless ones still run, and go on
        active = wait_for(lambda: (x := a.status()["active"]) and sorted(j["job_id"] for j in x) == sorted(endless)
                          and x, timeout=3)
        tokens = {x["job_id"]: x["tokens"] for x in active}
        wait_for(lambda: all(x["tokens"] > tokens[x["job_id"]] for x in a.status()["active"]), timeout=5)
        # a load waits for running generations: bounded by queue_timeout, with a typed error
        err, took = Within(lambda: list(b.load(str(model_path("5.2")), "cpu fp32")), b).result(8)
        assert isinstance(err, GenerationFailed) and err.kind == "QueueTimeout", err
        assert "queue_timeout" in err.message and 2.0 <= took < 4.0
        for job in endless:
            a.cancel(job_id=job)
        wait_for(lambda: a.status()["active"] == [] and a.status()["queued"] == 0, timeout=10)


def test_faults_noticed_within_3_s(home):
    paths = home_paths(home)
    pid = p.read_connection_file(paths.connection_file).pid
    # a killed client: its generation is cancelled
    proc = _stream_starts(home, "killed")
    proc.kill()
    proc.wait()
    t0 = time.monotonic()
    with Client(paths, autostart=False) as c:
        wait_for(lambda: c.status()["active"] == [], timeout=10)
        assert time.monotonic() - t0 < 3.5
    # a stopped daemon: a streaming client, a request of a connected client, a new client, `daemon status`
    watcher, asker = Client(paths, autostart=False), Client(paths, autostart=False)
    stream = watcher.chat("stopped", "Write forever.", **ENDLESS)
    next(e for e in stream if isinstance(e, m.Token))
    asker.connect()
    os.kill(pid, signal.SIGSTOP)
    try:
        streaming = Within(lambda: list(stream), watcher)
        request = Within(asker.status, asker)
        new = Within(lambda: Client(paths, autostart=True).connect())
        status = cli(home, "daemon", "status", check=False, timeout=30)
        assert status.returncode == 1 and f"not responding (the daemon (pid {pid})" in status.stdout, status.stdout
        for call, error in ((streaming, DaemonLost), (request, DaemonLost), (new, DaemonNotResponding)):
            err, took = call.result(8)
            assert isinstance(err, error) and took < 3.5, (err, took)
    finally:
        os.kill(pid, signal.SIGCONT)
        watcher.close()
        asker.close()
    with Client(paths, autostart=False) as c:             # it serves again
        assert c.ping()
    # `daemon stop` during a stream: the client hears a clean cancel, not a lost daemon
    proc = _stream_starts(home, "stopping")
    t0 = time.monotonic()
    cli(home, "daemon", "stop")
    err = proc.communicate(timeout=30)[1]
    assert proc.returncode == 130 and "cancelled by the daemon" in err.decode() and "lost" not in err.decode()
    assert time.monotonic() - t0 < 2.0
    assert "not running" in cli(home, "daemon", "status", check=False).stdout
