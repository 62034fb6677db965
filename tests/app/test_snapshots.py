"""SVG snapshots (pytest-textual-snapshot) of the main screens with deterministic content: greedy sampling
(temperature 0) on the tiny model, and the app's snapshot mode (no timings, speeds, memory or paths)."""

from __future__ import annotations

import time

import pytest

from rwkv_chat.app.chat_app import ChatApp
from rwkv_chat.app.screens.first_run import ModelScreen

from .conftest import make_home, start_daemon


async def settle(pilot, predicate, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("the app did not reach the state to snapshot")
        await pilot.pause(0.05)
    await pilot.pause(0.3)


def chat_app(daemon) -> ChatApp:
    return ChatApp(paths=daemon.paths, autostart=False, snapshot=True)


async def one_turn(pilot) -> None:
    app = pilot.app
    await settle(pilot, lambda: app.connected and app.chat.is_mounted)
    app.chat.input.insert("Tell me about **RWKV**")
    await pilot.press("enter")
    await settle(pilot, lambda: app.chat.last_done is not None and app.chat.bubble is None)
    app.chat.focus_input()
    await pilot.pause(0.2)
    app.chat.log_view.scroll_end(animate=False)
    await pilot.pause(0.3)


def test_snapshot_chat_after_one_turn(fresh_daemon, snap_compare):
    assert snap_compare(chat_app(fresh_daemon), terminal_size=(100, 30), run_before=one_turn)


def test_snapshot_sampling_panel_light_theme(fresh_daemon, snap_compare):
    async def before(pilot):
        await one_turn(pilot)
        await pilot.press("f4", "ctrl+t")
        pilot.app.chat.focus_input()
        await pilot.pause(0.3)

    assert snap_compare(chat_app(fresh_daemon), terminal_size=(120, 34), run_before=before)


def test_snapshot_help(fresh_daemon, snap_compare):
    async def before(pilot):
        await settle(pilot, lambda: pilot.app.connected)
        await pilot.press("f1")
        await pilot.pause(0.3)

    assert snap_compare(chat_app(fresh_daemon), terminal_size=(100, 34), run_before=before)


def test_snapshot_40x12(fresh_daemon, snap_compare):
    assert snap_compare(chat_app(fresh_daemon), terminal_size=(40, 12), run_before=one_turn)


@pytest.fixture
def modelless(tmp_path, home_env):
    paths = make_home(tmp_path, None)
    d = start_daemon(paths, None)
    yield d
    d.stop()


def test_snapshot_first_run(modelless, snap_compare):
    async def before(pilot):
        await settle(pilot, lambda: isinstance(pilot.app.screen, ModelScreen))

    assert snap_compare(chat_app(modelless), terminal_size=(100, 34), run_before=before)


def test_snapshot_sampling_panel_80_columns_with_an_error(fresh_daemon, snap_compare):
    """The panel at 80 columns: every field, both buttons and the whole error message in view."""
    async def before(pilot):
        await one_turn(pilot)
        await pilot.press("f4")
        pilot.app.chat.query_one("#s-top_p").value = "1.5"
        await pilot.click("#sampling-apply")
        pilot.app.chat.focus_input()
        await pilot.pause(0.3)

    assert snap_compare(chat_app(fresh_daemon), terminal_size=(80, 24), run_before=before)
