"""First use: a home without built kernels answers at once on the pure-torch path while the kernels build in
the background, then moves to them between two steps with the same output; status, doctor say so."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from rwkv_chat.daemon.config import Config, save_config
from rwkv_chat.daemon.generation import Job
from rwkv_chat.daemon.host import Host
from rwkv_chat.daemon.paths import ensure_dirs, home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.models.kernels import CPU_FAMILIES, CPU_GEMM_REASON, CPU_SOURCES
from rwkv_chat.daemon.scheduler import Scheduler
from rwkv_chat.daemon.sessions import Sessions
from rwkv_chat.daemon.store import Store

from .conftest import cli, greedy, stop_daemon, wait_for

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}


class SlowBuild:
    """A kernel build (as ``kernels.BackgroundBuild`` looks to the host) that ends once it has been asked
    ``polls`` times whether it is done: the scheduler asks between steps, so the switch lands mid-reply."""

    def __init__(self, polls: int):
        self.left, self.state, self.error = polls, "building", ""

    @property
    def done(self) -> bool:
        self.left -= 1
        if self.left <= 0:
            self.state = "built"
        return self.left <= 0

    def progress(self) -> dict:
        return {"device": "cpu", "state": self.state, "compiled": 3, "total": 7, "seconds": 1.0, "error": ""}

    def cancel(self) -> None:
        pass


class NotBuiltYet:
    """The engine's kernel loader as the host sees it on a fresh home: nothing built, one build running."""

    def __init__(self, build):
        self.build = build

    def ready(self, device: str) -> bool:
        return False

    def build_in_background(self, device: str, nice: int = 10):
        return self.build


def test_the_switch_between_steps_keeps_the_output(tmp_path, model_path):
    model, prompt, n = model_path("5.2"), "Once upon a time", 120
    host = Host(kernels=NotBuiltYet(SlowBuild(polls=40)))
    store = Store(tmp_path / "db.sqlite3", tmp_path / "states")
    config = Config()
    events: list = []
    done = threading.Event()

    def emit(topic, ev):
        events.append(ev)
        if isinstance(ev, (m.Done, m.Failed)) and ev.job_id == "j1":
            done.set()

    sched = Scheduler(host, store, Sessions(store, config.daemon.resident_states, config.daemon.cpu_states),
                      config, emit)
    switched_at: list[list[int]] = []
    real_switch = host.use_kernels

    def switch():
        switched_at.append([len(g.out_tokens) for g in sched.active])
        real_switch()

    host.use_kernels = switch
    sched.start()
    try:
        sched.submit(Job(id="load", kind="load", client_id="", topic=m.DAEMON_TOPIC,
                         request=m.Load(client_id="", topic=m.DAEMON_TOPIC, path=str(model), strategy="cpu fp32")))
        wait_for(lambda: host.info().get("loaded"), timeout=60)
        info = host.info()
        assert info["backend"].startswith("torch") and info["kernel_build"][0]["state"] == "building"
        sched.submit(Job(id="j1", kind="complete", client_id="t", topic="job-t",
                         request=m.Complete(client_id="t", topic="job-t", prompt=prompt,
                                            sampling={**GREEDY, "max_tokens": n})))
        assert done.wait(60)
    finally:
        sched.stop()
    (result,) = [e for e in events if isinstance(e, m.Done) and e.job_id == "j1"]
    assert switched_at and 0 < switched_at[0][0] < n, switched_at        # moved in the middle of the reply
    assert host.model.backend.name == "fused-cpu" and host.info()["backend"].startswith("fused-cpu")
    assert "kernel_build" not in host.info()
    assert result.tokens == n and result.text == greedy(model, prompt, n)


def _running_builds(cache: Path) -> list[int]:
    """Processes building kernels into ``cache`` (the daemon's background build and its compilers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(cache) in cmd:
                pids.append(int(proc.name))
    return pids


def test_a_fresh_home_answers_at_once_and_says_what_serves(tmp_path, model_path):
    home = tmp_path / "fresh"
    paths = ensure_dirs(home_paths(home))              # its own kernel cache: empty (no shared test build)
    cfg = Config()
    cfg.daemon.heartbeat = 0.25
    save_config(cfg, paths.config_file)
    cache = paths.cache_dir / "kernels"
    t0 = time.monotonic()
    try:
        cli(home, "daemon", "start", "--model", model_path("5.2"), "--strategy", "cpu fp32")
        r = cli(home, "chat", "Hi", "--max-tokens", 8, "--temperature", 0)
        assert r.stdout.strip() and time.monotonic() - t0 < 60          # no minute of kernel build first
        status = json.loads(cli(home, "daemon", "status", "--json").stdout)["model"]
        assert status["backend"].startswith("torch")
        (build,) = status["kernel_build"]
        assert build["device"] == "cpu" and build["state"] == "building" and build["total"] == len(CPU_SOURCES)
        human = cli(home, "daemon", "status").stdout
        assert "serving: torch" in human and "CPU kernels building" in human and "sources compiled" in human
        doctor = json.loads(cli(home, "doctor", "--json").stdout)
        assert doctor["daemon"]["backend"].startswith("torch")
        assert doctor["daemon"]["kernel_build"][0]["state"] == "building"
        cpu = doctor["kernels"]["cpu"]           # what has a CPU kernel is not built yet; the rest says why none
        assert all(cpu[f].startswith("not built yet") for f in CPU_FAMILIES), cpu
        assert cpu["gemm"] == CPU_GEMM_REASON and "CUDA only" in cpu["v7fused"]
        assert _running_builds(cache)
    finally:
        stop_daemon(home)
    wait_for(lambda: not _running_builds(cache), timeout=10)             # the daemon took its build along
