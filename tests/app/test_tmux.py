"""The real ``rwkv-chat`` binary in tmux: it starts the daemon (model from the config), a whole chat turn
(type, Enter, the reply appears), a paste with control and escape sequences (text, not keys), then Ctrl+Q
quits with status 0."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rwkv_chat.daemon.client import Client

from .conftest import make_home

BINARY = Path(sys.executable).parent / "rwkv-chat"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def wait_pane(session: str, predicate, timeout: float, what: str) -> str:
    end = time.monotonic() + timeout
    text = ""
    while time.monotonic() < end:
        text = tmux("capture-pane", "-p", "-t", session)
        if predicate(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; the pane shows:\n{text}")


@pytest.mark.slow
def test_rwkv_chat_binary_in_tmux(tmp_path, model_path, home_env):
    if shutil.which("tmux") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("tmux is missing")
        pytest.skip("tmux is not installed")
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: install the project (pip install -e .)")
    paths = make_home(tmp_path, model_path("5.2"))
    session = f"rwkv-chat-test-{os.getpid()}"
    status = tmp_path / "exit-status"
    cmd = f"{BINARY}; echo $? > {status}"
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-e", f"RWKV_CHAT_HOME={tmp_path}", cmd)
    try:
        wait_pane(session, lambda t: "tiny-rwkv-5v2-730K.pth" in t and "daemon connected" in t, 90,
                  "the UI connected to a daemon with the model loaded")
        tmux("send-keys", "-t", session, "-l", "Hello from tmux")
        tmux("send-keys", "-t", session, "Enter")
        with Client(paths, autostart=False) as c:
            end = time.monotonic() + 60
            while time.monotonic() < end and not any(x.turns == 2 for x in c.conversations()):
                time.sleep(0.2)
            (conv,) = c.conversations()
            turns = c.conversation(conv.id).turns
        assert [t.text for t in turns][0] == "Hello from tmux"
        head = turns[1].text.splitlines()[0].strip()[:20]
        assert head
        wait_pane(session, lambda t: head in t and f"{turns[1].tokens} tokens" in t, 30, "the reply on screen")
        # a paste holding a form feed (Ctrl+L: the load screen) and colour codes is text, not keys
        clip = tmp_path / "clip.txt"
        clip.write_bytes(b"pasted\x0c text \x1b[31mred\x1b[0m \x1b[Aend")
        tmux("load-buffer", "-b", "clip", str(clip))
        tmux("paste-buffer", "-p", "-b", "clip", "-t", session)
        pane = wait_pane(session, lambda t: "pasted text red end" in t, 10, "the pasted text in the input")
        assert "Load a model" not in pane and "Checkpoint path" not in pane
        tmux("send-keys", "-t", session, "C-q")
        end = time.monotonic() + 20
        while not status.exists() and time.monotonic() < end:
            time.sleep(0.1)
        assert status.exists() and status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        try:
            with Client(paths, autostart=False, timeout=3) as c:
                c.shutdown()
        except Exception:  # noqa: BLE001 — no daemon left
            pass
