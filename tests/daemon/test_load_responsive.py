"""The daemon answers while a model loads: a Qwen2 folder big enough to take seconds to load (the real 151k-token
Qwen tokenizer, a random 8-layer model of 47M parameters), loaded at startup (``daemon start --model``) and then
by a Load request, while another client asks for the status over and over with the configured
``daemon_timeout``: every request is answered, in less than that, and many while the load is under way."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from rwkv_chat.daemon.client import Client, DaemonUnavailable
from rwkv_chat.daemon.config import load_config
from rwkv_chat.daemon.paths import home_paths

from .conftest import CLI, env_for, make_home, stop_daemon, write_qwen_folder


@pytest.fixture(scope="module")
def big_qwen_folder(tmp_path_factory, shared_dir):
    import torch

    return write_qwen_folder(tmp_path_factory.mktemp("qwen") / "qwen2-47m", shared_dir, torch.bfloat16,
                             hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
                             num_key_value_heads=2)


class StatusPoller:
    """Asks for the status in a loop (a thread, its own Client with the config's timeouts) until stopped;
    ``replies``: (sent, seconds to the reply, model status) per request."""

    def __init__(self, paths, deadline: float = 120.0):
        self.paths, self.replies, self.error = paths, [], None
        self._stop = threading.Event()
        self._end = time.monotonic() + deadline
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set() and time.monotonic() < self._end:
                try:
                    with Client(self.paths, autostart=False) as c:
                        while not self._stop.is_set():
                            t0 = time.monotonic()
                            model = c.status()["model"]
                            self.replies.append((t0, time.monotonic() - t0, model))
                            time.sleep(0.02)
                except DaemonUnavailable:          # no connection file yet: the daemon is starting
                    if self.replies:
                        raise
                    time.sleep(0.05)
        except BaseException as e:  # noqa: BLE001 — reported by stop()
            self.error = e

    def stop(self) -> list:
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error
        return self.replies


def _check_answered_while_loading(replies, folder, timeout: float) -> None:
    loading = [r for r in replies if r[2].get("loading") == str(folder)]
    assert len(loading) >= 3, [(round(s, 2), m.get("loading")) for s, _, m in replies]
    worst = max(d for _, d, _ in replies)
    assert worst < timeout, f"a status took {worst:.2f} s"
    sent = [s for s, _, _ in replies]
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert max(gaps) < timeout, f"no status answered for {max(gaps):.2f} s"


def test_status_is_answered_while_a_qwen_folder_loads(tmp_path, big_qwen_folder):
    home = make_home(tmp_path / "h")
    paths = home_paths(home)
    timeout = load_config(paths.config_file).daemon.daemon_timeout
    try:
        poller = StatusPoller(paths)
        start = subprocess.run([*CLI, "daemon", "start", "--model", str(big_qwen_folder)], env=env_for(home),
                               capture_output=True, text=True, timeout=300)
        replies = poller.stop()
        assert start.returncode == 0, start.stderr
        assert start.stderr.strip().splitlines()[-1].startswith(f"loaded {big_qwen_folder}"), start.stderr
        _check_answered_while_loading(replies, big_qwen_folder, timeout)
        assert replies[-1][2]["loaded"] and replies[-1][2]["family"] == "qwen2"

        # the same folder again, by a Load request of a connected client: its Progress events arrive as well
        poller = StatusPoller(paths)
        with Client(paths, autostart=False) as c:
            events = list(c.load(str(big_qwen_folder), "cpu fp32"))
        replies = poller.stop()
        assert type(events[-1]).__name__ == "Done" and events[-1].reason == "loaded", events
        assert any(type(e).__name__ == "Progress" for e in events), events
        _check_answered_while_loading(replies, big_qwen_folder, timeout)
    finally:
        stop_daemon(home)
