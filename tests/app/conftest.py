"""Fixtures of the UI tests: a real daemon (background process, tiny real model, ``cpu fp32``) in a
temporary ``RWKV_CHAT_HOME``, and helpers to wait on a running Textual app."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rwkv_chat.daemon.config import Config, save_config
from rwkv_chat.daemon.paths import Paths, ensure_dirs, get_paths
from rwkv_chat.daemon.client import Client, spawn_daemon

from ..conftest import link_kernel_cache

MAX_TOKENS = 24          # short replies keep the tests fast


@dataclass
class Daemon:
    paths: Paths
    pid: int
    client: Client
    model: Path

    def wait_loaded(self, timeout: float = 60.0) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            st = self.client.status()
            if (st.get("model") or {}).get("loaded"):
                return st
            time.sleep(0.1)
        raise TimeoutError("the daemon did not load its model")

    def clear_conversations(self) -> None:
        for c in self.client.conversations():
            self.client.delete(c.id)

    def kill(self) -> None:
        """SIGKILL (no clean-up, as a crash)."""
        os.kill(self.pid, signal.SIGKILL)
        _wait_gone(self.pid)

    def stop(self) -> None:
        try:
            self.client.shutdown()
        except Exception:  # noqa: BLE001 — already gone
            pass
        self.client.close()
        if not _wait_gone(self.pid, 10):
            os.kill(self.pid, signal.SIGKILL)
            _wait_gone(self.pid)


def _wait_gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
            # reap it if it is our child (spawn_daemon's Popen is dropped)
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return True
            except ChildProcessError:
                pass
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def make_home(root: Path, model: Path | None, max_tokens: int = MAX_TOKENS) -> Paths:
    """A home under ``root`` whose config samples greedily (temperature 0: deterministic replies)."""
    os.environ["RWKV_CHAT_HOME"] = str(root)
    paths = ensure_dirs(get_paths())
    link_kernel_cache(root)  # every test home shares the session's kernel build (tens of seconds on 2 cores)
    cfg = Config()
    cfg.sampling = cfg.sampling.updated(temperature=0.0, max_tokens=max_tokens)
    cfg.model.path = str(model) if model else ""
    cfg.model.strategy = "cpu fp32"
    save_config(cfg, paths.config_file)
    return paths


def start_daemon(paths: Paths, model: Path | None) -> Daemon:
    info = spawn_daemon(paths, model=str(model) if model else None, strategy="cpu fp32" if model else None)
    d = Daemon(paths, info.pid, Client(paths, autostart=False), model)
    if model:
        d.wait_loaded()
    return d


@pytest.fixture(scope="module")
def home_env():
    """Restores RWKV_CHAT_HOME after the module (the fixtures below set it)."""
    old = os.environ.get("RWKV_CHAT_HOME")
    yield
    if old is None:
        os.environ.pop("RWKV_CHAT_HOME", None)
    else:
        os.environ["RWKV_CHAT_HOME"] = old


@pytest.fixture(scope="session")
def daemon(tmp_path_factory, model_path):
    """A daemon serving the tiny RWKV-5.2 model (``cpu fp32``), shared by the UI tests (one start: seconds of
    imports on a small machine)."""
    old = os.environ.get("RWKV_CHAT_HOME")
    model = model_path("5.2")
    paths = make_home(tmp_path_factory.mktemp("home"), model)
    d = start_daemon(paths, model)
    if old is None:
        os.environ.pop("RWKV_CHAT_HOME", None)
    else:
        os.environ["RWKV_CHAT_HOME"] = old
    yield d
    d.stop()


@pytest.fixture
def fresh_daemon(daemon, home_env):
    """The shared daemon with no conversations (for tests that show the conversation list)."""
    os.environ["RWKV_CHAT_HOME"] = str(daemon.paths.data_dir.parent)
    daemon.clear_conversations()
    return daemon


async def wait_for(pilot, predicate, timeout: float = 20.0, what: str = "condition"):
    """Let the app run until ``predicate()`` is true; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def async_test(fn):
    """Run an ``async def`` test with ``asyncio.run`` (no asyncio pytest plugin needed)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper


def make_app(daemon, **kw):
    """A deterministic ChatApp (snapshot mode) on ``daemon``'s home, not starting a daemon of its own."""
    from rwkv_chat.app.chat_app import ChatApp

    return ChatApp(paths=daemon.paths, autostart=False, **{"snapshot": True, **kw})


@contextlib.asynccontextmanager
async def running(daemon, size: tuple[int, int] = (100, 30), **kw):
    """``make_app(daemon, **kw)`` under Pilot in a terminal of ``size`` (columns, rows), connected and mounted
    (``ready``): yields ``(pilot, app)``."""
    app = make_app(daemon, **kw)
    async with app.run_test(size=size) as pilot:
        await ready(pilot, app)
        yield pilot, app


async def ready(pilot, app):
    await wait_for(pilot, lambda: app.connected and app.chat.is_mounted, what="connection")
    await pilot.pause(0.1)


async def send(pilot, app, text: str):
    """Type ``text`` in the input, press Enter, wait for the reply to finish; returns the Done event."""
    before = app.chat.last_done
    app.chat.input.insert(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.chat.last_done is not before and app.chat.bubble is None, what="the reply")
    return app.chat.last_done
