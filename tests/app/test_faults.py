"""Faults: the daemon killed mid-reply, a model-less daemon (first run: Esc keeps what was typed, a message
makes nothing and names the load key), huge pastes, control characters, a 40x12 terminal."""

from __future__ import annotations

import time

from rwkv_chat.app.chat_app import ChatApp
from rwkv_chat.daemon.config import load_config
from rwkv_chat.app.screens.dialogs import TextPrompt
from rwkv_chat.app.screens.first_run import ModelScreen
from rwkv_chat.app.screens.help import HelpScreen
from rwkv_chat.app.widgets.chat_log import Notice, UserMessage
from rwkv_chat.app.widgets.prompt_input import MAX_MESSAGE_CHARS

from .conftest import async_test, make_home, start_daemon, wait_for


def notices(app) -> list[str]:
    return [str(n.render()) for n in app.chat.log_view.query(Notice)]


async def send_and_wait(pilot, app, text: str | None = None):
    """Press Enter (after typing ``text`` unless None: what the input holds) and wait for the reply."""
    before = app.chat.last_done
    if text is not None and app.chat.input.text != text:
        app.chat.input.clear()
        app.chat.input.insert(text)
    await pilot.press("enter")
    await wait_for(pilot, lambda: app.chat.last_done is not before and app.chat.bubble is None, what="the reply")


@async_test
async def test_daemon_killed_mid_reply_then_back(tmp_path, model_path, home_env):
    model = model_path("5.2")
    paths = make_home(tmp_path, model, max_tokens=100000)
    daemon = start_daemon(paths, model)
    app = ChatApp(paths=paths, autostart=False, snapshot=True, lost_after=2.0)
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.connected, what="connection")
            app.chat.input.insert("Write forever")
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.chat.bubble is not None and len(app.chat.bubble.text) > 30,
                           what="streaming")
            bubble = app.chat.bubble
            daemon.kill()
            t0 = time.monotonic()
            await wait_for(pilot, lambda: not app.connected and app.chat.bubble is None, timeout=10,
                           what="the loss noticed")
            assert time.monotonic() - t0 < 8
            kept = bubble.text
            assert len(kept) > 30 and "interrupted" in bubble._footer
            assert "unreachable" in app.chat.status_bar.connection
            assert any("Daemon unreachable" in n for n in notices(app))
            await pilot.pause(1.5)                         # a few failed reconnection attempts: no crash
            daemon = start_daemon(paths, model)
            await wait_for(pilot, lambda: app.connected, timeout=20, what="reconnection")
            await wait_for(pilot, lambda: any("daemon is back" in n for n in notices(app)), what="back notice")
            assert bubble.text == kept
            # it works again: a new turn in the same conversation
            await wait_for(pilot, lambda: app._watched == app.chat.cid, what="watching again")
            app.chat.input.insert("Hello again")
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.chat.bubble is not None and len(app.chat.bubble.text) > 5,
                           timeout=40, what="streaming again")
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.chat.bubble is None, what="stopped")
    finally:
        daemon.stop()


@async_test
async def test_a_failed_startup_load_is_shown(tmp_path, home_env):
    from rwkv_chat.daemon.client import Client, spawn_daemon

    from .conftest import Daemon

    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint\n")
    paths = make_home(tmp_path / "h", None)
    info = spawn_daemon(paths, model=str(bad), strategy="cpu fp32")
    daemon = Daemon(paths, info.pid, Client(paths, autostart=False), bad)
    app = ChatApp(paths=paths, autostart=False, snapshot=True)
    try:
        async with app.run_test(size=(100, 34)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen) and app.screen.query("#model-error")
                           and "CheckpointError" in str(app.screen.query_one("#model-error").render()),
                           what="the load error on the model screen")
            assert str(bad) in str(app.screen.query_one("#model-error").render())
            assert app.screen.query_one("#model-path").value == str(bad)     # the form, to try again
            assert "load failed" in app.chat.status_bar.model
    finally:
        daemon.stop()


@async_test
async def test_first_run_screen_loads_a_model(tmp_path, model_path, home_env):
    paths = make_home(tmp_path, None)
    daemon = start_daemon(paths, None)
    app = ChatApp(paths=paths, autostart=False, snapshot=True)
    try:
        async with app.run_test(size=(100, 34)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen) and app.screen.query("#model-path"),
                           what="the first-run screen")
            explain = " ".join(str(s.render()) for s in app.screen.query("#strategy-help"))
            assert "DEVICE DTYPE" in explain and "->" in explain and "*N" in explain   # the syntax, explained
            # Esc first ("not now"): what was typed is kept; a message without a model makes nothing
            app.screen.query_one("#model-path").value = "/models/typed-but-not-loaded.pth"
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is app.chat, what="back to the chat")
            app.chat.input.insert("Hello?")
            await pilot.press("enter")
            await pilot.pause(0.3)
            assert daemon.client.conversations() == [] and app.chat.cid is None
            assert app.chat.input.text == "Hello?" and not app.chat.log_view.query(UserMessage)
            assert any("press Ctrl+L" in n and "rwkv-chat load" not in n for n in notices(app))
            await pilot.press("ctrl+l")
            await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen) and app.screen.query("#model-path"),
                           what="the load screen again")
            screen = app.screen
            assert screen.query_one("#model-path").value == "/models/typed-but-not-loaded.pth"
            assert "cpu fp32" in screen.strategies and "cpu bf16" in screen.strategies
            screen.query_one("#model-path").value = ""
            screen.query_one("#model-path").focus()
            await pilot.press("enter")                           # no path: an explanation, no load
            assert "path" in str(screen.query_one("#model-error").render())
            screen.query_one("#model-path").value = str(tmp_path / "missing.pth")
            screen.query_one("#model-path").focus()
            await pilot.press("enter")
            assert "does not exist" in str(screen.query_one("#model-error").render())
            screen.query_one("#model-path").value = str(model_path("5.2"))
            screen.query_one("#model-strategy").value = "cpu fp32"
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.screen is app.chat, timeout=60, what="the model loaded")
            assert (daemon.client.status()["model"]).get("loaded")
            assert load_config(paths.config_file).model.path == str(model_path("5.2"))
            await wait_for(pilot, lambda: "tiny-rwkv-5v2" in str(app.chat.status_bar.render()), what="status")
            await send_and_wait(pilot, app, "Hello?")            # the kept message goes once a model is in
            assert [t.text for t in daemon.client.conversation(app.chat.cid).turns][:1] == ["Hello?"]
    finally:
        daemon.stop()


@async_test
async def test_bad_strategy_is_reported(tmp_path, model_path, home_env):
    paths = make_home(tmp_path, None)
    daemon = start_daemon(paths, None)
    app = ChatApp(paths=paths, autostart=False, snapshot=True, status_every=1000)    # one status: at connection
    try:
        async with app.run_test(size=(100, 34)) as pilot:
            await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen) and app.screen.query("#model-path"),
                           what="the first-run screen")
            screen = app.screen
            screen.query_one("#model-path").value = str(model_path("5.2"))
            screen.query_one("#model-strategy").value = "cpu fp99"
            screen.query_one("#model-strategy").focus()
            await pilot.press("enter")
            await wait_for(pilot, lambda: "did not load" in str(screen.query_one("#model-error").render()),
                           what="the load error")
            assert isinstance(app.screen, ModelScreen) and screen.query_one("#model-form").display
            # a message sent on a stale status ("loaded") is refused by the daemon: it comes back, nothing made
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is app.chat, what="back to the chat")
            app.status = {**app.status, "model": {"loaded": True}}
            app.chat.input.insert("Anyone?")
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.chat.bubble is None and app.chat.input.text == "Anyone?",
                           what="the message back in the input")
            # (Textual removes widgets asynchronously: the message and its bubble leave the view a moment later)
            await wait_for(pilot, lambda: not app.chat.log_view.messages(), what="the message off the view")
            assert app.chat.cid is None and app.chat.input.text == "Anyone?"
            assert daemon.client.conversations() == [] and any("Ctrl+L" in n for n in notices(app))
    finally:
        daemon.stop()


@async_test
async def test_huge_paste_and_control_characters(fresh_daemon):
    app = ChatApp(paths=fresh_daemon.paths, autostart=False, snapshot=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.connected, what="connection")
        inp = app.chat.input
        from textual import events

        inp.post_message(events.Paste("a\x1b[31mred\x1b[0m\x00\x07 b\r\nc\x7f"))
        await pilot.pause(0.1)
        assert inp.text == "ared b\nc"
        inp.clear()
        inp.post_message(events.Paste("x" * (MAX_MESSAGE_CHARS + 1)))     # refused, no hang
        await pilot.pause(0.1)
        assert inp.text == ""
        big = ("All work and no play makes a dull model. " * 1000)[:30000]
        t0 = time.monotonic()
        inp.post_message(events.Paste(big))
        await wait_for(pilot, lambda: inp.text == big, what="the paste")
        prefill = []
        real = app.chat.link_event
        app.chat.link_event = lambda topic, e: (prefill.append(e) if type(e).__name__ == "Progress" else None,
                                                real(topic, e))
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.last_done is not None and app.chat.bubble is None, timeout=60,
                       what="the reply to a huge message")
        assert time.monotonic() - t0 < 60
        assert len(prefill) > 10 and prefill[-1].done == prefill[-1].total       # prefill progress shown
        user = app.chat.log_view.last("user")
        assert user.text == big and "more characters" in str(user.query_one(".body").render())
        assert fresh_daemon.client.conversation(app.chat.cid).turns[0].text == big


@async_test
async def test_tiny_terminal_40x12(fresh_daemon):
    app = ChatApp(paths=fresh_daemon.paths, autostart=False, snapshot=True)
    async with app.run_test(size=(40, 12)) as pilot:
        await wait_for(pilot, lambda: app.connected, what="connection")
        app.chat.input.insert("Hi")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.last_done is not None and app.chat.bubble is None, what="reply")
        for key, screen in (("f1", HelpScreen), ("f2", TextPrompt)):
            await pilot.press(key)
            await wait_for(pilot, lambda: isinstance(app.screen, screen), what=screen.__name__)
            await pilot.press("escape")
            await wait_for(pilot, lambda: app.screen is app.chat, what="back")
        for key in ("f4", "f9", "f4", "f9", "ctrl+t"):
            await pilot.press(key)
        await pilot.resize_terminal(30, 8)
        await pilot.pause(0.2)
        await pilot.resize_terminal(40, 12)
        assert [w.text for w in app.chat.log_view.query(UserMessage)] == ["Hi"]
