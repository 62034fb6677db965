"""Flows a new user met in the TUI: the view following a reply after a paste or a resize, pasted control
sequences, line breaks in replies, the sampling panel at common widths, switching conversations by keyboard
with a history per conversation, titles and reopened replies, the wording of a lost daemon. (Sending without
a model: ``test_faults.test_first_run_screen_loads_a_model``.)"""

from __future__ import annotations


from textual import events
from textual.app import App
from textual.widgets import Button, Input, Markdown

from rwkv_chat.app.chat_app import ChatApp
from rwkv_chat.app.screens.help import HelpScreen
from rwkv_chat.app.widgets.chat_log import AssistantMessage, ChatLog, Notice
from rwkv_chat.app.widgets.sampling_panel import SamplingPanel

from .conftest import async_test, make_app, make_home, ready, send, wait_for


def at_end(log: ChatLog) -> bool:
    return log.max_scroll_y > 0 and log.scroll_y >= log.max_scroll_y


def notices(app) -> list[str]:
    return [str(n.render()) for n in app.chat.log_view.query(Notice)]


@async_test
async def test_the_view_follows_a_reply_after_a_paste_and_a_resize(fresh_daemon):
    app = make_app(fresh_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        log = app.chat.log_view
        for i in range(3):
            await send(pilot, app, f"Tell me about {i}")
        await pilot.pause(0.2)
        assert at_end(log)
        app.chat.input.post_message(events.Paste("\n".join(f"pasted line {i}" for i in range(40))))
        await wait_for(pilot, lambda: app.chat.input.text.count("\n") == 39, what="the paste")
        await pilot.pause(0.2)                                   # the input grew: the log is shorter
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.bubble is None and len(log.query(AssistantMessage)) == 4,
                       what="the reply to the paste")
        await pilot.pause(0.3)
        assert at_end(log), (log.scroll_y, log.max_scroll_y)
        for size in ((60, 20), (100, 30)):                      # narrower (taller text), then wider
            await pilot.resize_terminal(*size)
            await pilot.pause(0.3)
            assert at_end(log), (size, log.scroll_y, log.max_scroll_y)


def test_a_paste_with_control_sequences_is_one_paste():
    """ESC sequences inside a bracketed paste are not keys (a pasted \\x0c opened the load screen)."""
    from rwkv_chat.app.terminal import PasteSafeParser

    data = "\x1b[200~abc\x0cdef\x1b[Aghi\x1b[31mred\x1b[0m and \x1b]0;title\x07more" + "x" * 40 + "\x1b[201~z"
    for cut in range(0, len(data), 3):                           # however the terminal's reads split it
        parser = PasteSafeParser()
        got = [e for part in (data[:cut], data[cut:]) if part for e in parser.feed(part)]
        assert [type(e).__name__ for e in got] == ["Paste", "Key"], (cut, got)
        assert got[0].text == "abc\x0cdefghired and more" + "x" * 40 and got[1].key == "z"


class _Reply(App):
    def compose(self):
        yield ChatLog()


@async_test
async def test_line_breaks_in_replies_are_kept():
    text = "First line\nsecond line\n\n- item one\n  still item one\n- item two\n\n```\ncode a\ncode b\n```"
    app = _Reply()
    async with app.run_test(size=(60, 20)) as pilot:
        for streamed in (False, True):
            msg = AssistantMessage("" if streamed else text, streaming=streamed)
            app.query_one(ChatLog).add(msg)
            await pilot.pause(0.1)
            if streamed:
                for i in range(0, len(text), 7):
                    msg.append(text[i:i + 7])

            def kept(m=msg) -> bool:
                blocks = [b.render().plain for b in m.query_one(Markdown).query("MarkdownBlock")]
                return "First line\nsecond line" in blocks and "item one\nstill item one" in blocks

            await wait_for(pilot, kept, timeout=10, what="the reply's line breaks, kept")


@async_test
async def test_sampling_panel_fits_and_tab_reaches_its_fields(fresh_daemon):
    app = make_app(fresh_daemon)
    async with app.run_test(size=(80, 24)) as pilot:
        await ready(pilot, app)
        panel = app.chat.query_one(SamplingPanel)
        for size in ((80, 24), (140, 40)):
            await pilot.resize_terminal(*size)
            if not panel.display:
                await pilot.press("f4")
            panel.query_one("#s-top_p", Input).value = "1.5"
            await pilot.click("#sampling-apply")
            await pilot.pause(0.2)
            area = panel.content_region
            error = panel.query_one("#sampling-error")
            message = str(error.render())
            assert message == "Top p must be between 0 and 1"
            assert area.x <= error.region.x and error.region.right <= area.right
            assert error.region.width * error.region.height >= len(message)          # all of it shown
            for button in panel.query(Button):
                label = str(button.label)
                assert button.region.width >= len(label) and button.region.right <= area.right, (size, label)
            for field in panel.query(Input):
                assert field.region.right <= area.right and field.region.width >= 6, (size, field.id)
        # Tab from the message input reaches the first field; focusing a field does not select its text
        app.chat.focus_input()
        await pilot.press("tab")
        field = app.focused
        assert field.id == "s-temperature" and field.selected_text == ""
        before = field.value
        await pilot.press("5")
        assert field.value == before + "5"


@async_test
async def test_switching_conversations_by_keyboard_with_their_own_history(fresh_daemon):
    client = fresh_daemon.client
    a = client.create_conversation()
    for _ in client.chat(a.id, "Apples are red"):
        pass
    app = make_app(fresh_daemon, snapshot=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: app.chat.cid == a.id, what="the conversation opened")
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: app.chat.cid not in (None, a.id), what="a new conversation")
        b = app.chat.cid
        await pilot.press("up")                                     # nothing sent here yet: nothing recalled
        assert app.chat.input.text == ""
        await send(pilot, app, "Bananas are yellow")
        await wait_for(pilot, lambda: app.chat.infos[b].title == "Bananas are yellow", what="the title")
        sidebar = app.chat.query_one("Sidebar")
        shown = [str(o.prompt).split("\n") for o in sidebar.query_one("OptionList").options]
        assert ["Bananas are yellow", f"{b} (1)"] in shown             # the title, then the id (exchanges)
        await pilot.press("ctrl+down")                              # the older conversation, below it
        await wait_for(pilot, lambda: app.chat.cid == a.id and len(app.chat.log_view.messages()) == 2,
                       what="switched down")
        await pilot.press("up")
        assert app.chat.input.text == "Apples are red"
        app.chat.input.clear()
        await pilot.press("ctrl+up")
        await wait_for(pilot, lambda: app.chat.cid == b and len(app.chat.log_view.messages()) == 2,
                       what="switched up")
        reply = app.chat.log_view.last("assistant")
        assert "tok/s" in reply._footer                            # a reopened reply keeps its speed
        assert client.conversation(b).turns[1].reason in ("stop", "length")
        await pilot.press("up")
        assert app.chat.input.text == "Bananas are yellow"
        # the keys are in the footer and in the help
        footer = " ".join(str(k.render()) for k in app.chat.query("FooterKey, FooterLabel"))
        assert "Conversation" in footer
        keys = list(app.chat.query("FooterKey"))            # the app's keys fit a 100-column terminal
        assert {"Model", "Help", "Quit"} <= {k.description for k in keys}
        assert all(k.region.right <= app.size.width == 100 for k in keys), [(k.description, k.region) for k in keys]
        label = app.chat.query_one("FooterLabel")            # "^↑^↓ Conversation ^r Regenerate": a space after it
        assert min(k.region.x for k in keys if k.region.x >= label.region.right) > label.region.right
        app.chat.input.clear()
        await pilot.press("f1")
        await wait_for(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        source = app.screen.query_one(Markdown).source
        assert "Ctrl+Up / Alt+Up" in source and "Previous conversation" in source and "Next conversation" in source


@async_test
async def test_a_lost_daemon_is_said_once(tmp_path, home_env):
    paths = make_home(tmp_path, None)
    app = ChatApp(paths=paths, autostart=False, snapshot=True)          # no daemon runs for this home
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: any("unreachable" in n for n in notices(app)), what="the notice")
        (notice,) = [n for n in notices(app) if "unreachable" in n]
        assert notice.lower().count("unreachable") == 1 and notice.startswith("Daemon unreachable: no daemon")


@async_test
async def test_the_sidebar_follows_conversations_other_clients_make_change_and_remove(fresh_daemon):
    """Another client (a script, the CLI) makes, renames and removes conversations while the window is open:
    the sidebar follows through the daemon's store revision in its status, with no event of the open one."""
    client = fresh_daemon.client
    a = client.create_conversation(title="open here")
    app = make_app(fresh_daemon, snapshot=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: app.chat.cid == a.id, what="the conversation opened")
        sidebar = app.chat.query_one("Sidebar")
        ids = lambda: [c.id for c in sidebar.items]                      # noqa: E731
        b = client.create_conversation(title="made elsewhere")
        await wait_for(pilot, lambda: b.id in ids(), what="the new conversation listed")
        client.rename(b.id, "renamed elsewhere")
        await wait_for(pilot, lambda: app.chat.infos[b.id].title == "renamed elsewhere", what="the new title")
        for _ in client.chat(b.id, "Hello"):
            pass
        await wait_for(pilot, lambda: app.chat.infos[b.id].turns == 2, what="its exchange counted")
        client.delete(b.id)
        await wait_for(pilot, lambda: b.id not in ids(), what="the removed conversation gone")
        assert app.chat.cid == a.id
