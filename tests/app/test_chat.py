"""Pilot tests of the chat screen against a real daemon (tiny RWKV-5.2, cpu fp32, greedy sampling)."""

from __future__ import annotations

import threading

from rwkv_chat.app.screens.dialogs import Confirm, ExportChoice, TextEditor, TextPrompt
from rwkv_chat.app.screens.help import HelpScreen
from rwkv_chat.app.widgets.chat_log import AssistantMessage, Notice, UserMessage
from rwkv_chat.app.widgets.sampling_panel import SamplingPanel
from rwkv_chat.daemon.protocol import messages as m

from .conftest import async_test, make_app, ready, running, send, wait_for


def texts(app, cls):
    return [w.text for w in app.chat.log_view.query(cls)]


@async_test
async def test_chat_turn_streams_markdown_and_saves(fresh_daemon):
    app = make_app(fresh_daemon, snapshot=False)             # shows the conversation's id (snapshots mask it)
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        tokens = []
        real = app.chat.link_event
        app.chat.link_event = lambda topic, e: (tokens.append(e) if isinstance(e, m.Token) else None, real(topic, e))
        done = await send(pilot, app, "Hello there")
        assert done.reason in ("stop", "length")
        assert len([t for t in tokens if t.job_id == done.job_id]) >= 2          # streamed, not one block
        assert texts(app, UserMessage) == ["Hello there"]
        reply = app.chat.log_view.last("assistant")
        assert reply.text == done.text and reply.text
        conv = fresh_daemon.client.conversation(app.chat.cid)
        assert [t.text for t in conv.turns] == ["Hello there", done.text]
        assert app.chat.input.text == ""
        assert app.chat.query_one("Sidebar").items[0].id == app.chat.cid
        option = app.chat.query_one("#conversation-list").get_option_at_index(0)
        assert app.chat.cid in str(option.prompt)           # the id the command line takes is shown


@async_test
async def test_switching_resumes_from_state_without_rereading(fresh_daemon):
    client = fresh_daemon.client
    a = client.create_conversation(title="first")
    for _ in client.chat(a.id, "One"):
        pass
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: app.chat.cid not in (None, a.id), what="a new conversation")
        await send(pilot, app, "Two")
        app.chat.query_one("Sidebar").post_message(app.chat.query_one("Sidebar").Selected(a.id))
        await wait_for(pilot, lambda: app.chat.cid == a.id and texts(app, UserMessage) == ["One"], what="switch")
        notices = [str(n.render()) for n in app.chat.log_view.query(Notice)]
        assert "resumed from state, 0 tokens re-read" in notices
        done = await send(pilot, app, "Three")
        turns = client.conversation(a.id).turns
        assert [t.text for t in turns[::2]] == ["One", "Three"]
        # the prompt fed to the model was only the new message: no history token re-read
        assert done.prompt_tokens == turns[-2].tokens


@async_test
async def test_new_rename_delete(fresh_daemon):
    client = fresh_daemon.client
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        await pilot.press("ctrl+n")
        await wait_for(pilot, lambda: app.chat.cid is not None, what="new conversation")
        cid = app.chat.cid
        await pilot.press("f2")
        await wait_for(pilot, lambda: isinstance(app.screen, TextPrompt), what="rename dialog")
        app.screen.query_one("Input").value = ""
        await pilot.press(*"Renamed chat", "enter")
        await wait_for(pilot, lambda: any(c.title == "Renamed chat" for c in client.conversations()), what="rename")
        await wait_for(pilot, lambda: app.chat.infos[cid].title == "Renamed chat", what="sidebar refresh")
        await pilot.press("f8")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="confirm dialog")
        await pilot.press("y")
        await wait_for(pilot, lambda: not client.conversations(), what="delete")
        await wait_for(pilot, lambda: app.chat.cid is None, what="no open conversation")


@async_test
async def test_regenerate_edit_copy_export(fresh_daemon):
    client = fresh_daemon.client
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        first = await send(pilot, app, "Tell me a story")
        cid = app.chat.cid
        await pilot.press("ctrl+r")
        await wait_for(pilot, lambda: app.chat.last_done is not first and app.chat.bubble is None, what="regen")
        turns = client.conversation(cid).turns
        assert len(turns) == 2 and turns[1].text == app.chat.last_done.text == first.text   # greedy: same reply
        assert len(texts(app, AssistantMessage)) == 1
        before = app.chat.last_done
        await pilot.press("f3")
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditor), what="edit dialog")
        app.screen.query_one("TextArea").load_text("Tell me a poem")
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.chat.last_done is not before and app.chat.bubble is None, what="edit")
        turns = client.conversation(cid).turns
        assert [t.text for t in turns] == ["Tell me a poem", app.chat.last_done.text]
        assert texts(app, UserMessage) == ["Tell me a poem"]
        # copy the last reply (F7) and a focused message (c)
        await pilot.press("f7")
        assert app.clipboard == turns[1].text
        app.chat.log_view.last("user").focus()
        await pilot.press("c")
        assert app.clipboard == "Tell me a poem"
        # export as Markdown into the data dir
        app.chat.focus_input()
        await pilot.press("f6")
        await wait_for(pilot, lambda: isinstance(app.screen, ExportChoice), what="export dialog")
        await pilot.click("#md")
        exports = fresh_daemon.paths.data_dir / "exports"
        await wait_for(pilot, lambda: exports.exists() and list(exports.glob("*.md")), what="export file")
        path = next(exports.glob("*.md"))
        assert path.read_text() == client.export(cid, "md")
        assert any(path.name in str(n.render()) for n in app.chat.log_view.query(Notice))


def shown_turns(app) -> list[tuple]:
    return [(w.role, w.text) for w in app.chat.log_view.messages()]


def stored_turns(client, cid) -> list[tuple]:
    return [(t.role, t.text) for t in client.conversation(cid).turns]


async def settled(pilot, app, client, before, what: str):
    """Wait until a generation after ``before`` ended and the view shows the stored turns, each knowing its
    index (what regenerate and edit name)."""
    await wait_for(pilot, lambda: app.chat.last_done is not before and app.chat.bubble is None, what=what)
    await wait_for(pilot, lambda: shown_turns(app) == stored_turns(client, app.chat.cid)
                   and all(getattr(w, "turn", None) is not None for w in app.chat.log_view.messages()),
                   timeout=5, what="the view to show the stored conversation")


@async_test
async def test_a_stopped_reply_is_shown_as_stored_and_redo_acts_on_it(fresh_daemon):
    client = fresh_daemon.client
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        await send(pilot, app, "Hello")
        cid = app.chat.cid
        client.set_sampling(cid, max_tokens=100000)
        before = app.chat.last_done
        app.chat.input.insert("Tell me a long story")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.bubble is not None and len(app.chat.bubble.text.strip()) > 10,
                       what="streaming")
        await pilot.press("escape")
        await settled(pilot, app, client, before, "stopped and stored")
        assert len(shown_turns(app)) == 4
        assert client.conversation(cid).turns[-1].reason == "cancelled"
        assert "stopped" in app.chat.log_view.last("assistant")._footer
        client.set_sampling(cid, max_tokens=8)
        before = app.chat.last_done
        await pilot.press("ctrl+r")                          # regenerates the stopped reply shown
        await settled(pilot, app, client, before, "regenerated")
        assert shown_turns(app)[2:] == [("user", "Tell me a long story"), ("assistant", app.chat.last_done.text)]
        await pilot.press("f3")                              # edits the message shown last
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditor), what="edit dialog")
        assert app.screen.query_one("TextArea").text == "Tell me a long story"
        app.screen.query_one("TextArea").load_text("Tell me a short story")
        before = app.chat.last_done
        await pilot.press("ctrl+s")
        await settled(pilot, app, client, before, "edited")
        assert [t for _, t in shown_turns(app)][::2] == ["Hello", "Tell me a short story"]


@async_test
async def test_stop_and_a_second_client_watching(fresh_daemon):
    """A script's generation in the open conversation shows live; Esc in the UI stops it."""
    client = fresh_daemon.client
    conv = client.create_conversation(title="shared")
    client.set_sampling(conv.id, max_tokens=100000)
    app = make_app(fresh_daemon)
    events = []
    async with app.run_test(size=(100, 30)) as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: app.chat.cid == conv.id and app._watched == conv.id, what="watching")

        def other_window():
            from rwkv_chat.daemon.client import Client

            with Client(fresh_daemon.paths, autostart=False) as other:
                events.extend(other.chat(conv.id, "Hi from elsewhere"))

        t = threading.Thread(target=other_window)
        t.start()
        await wait_for(pilot, lambda: app.chat.bubble is not None and len(app.chat.bubble.text) > 20, what="live")
        assert texts(app, UserMessage) == ["Hi from elsewhere"]
        await pilot.press("escape")
        await wait_for(pilot, lambda: app.chat.bubble is None, what="stopped")
        t.join(20)
        assert isinstance(events[-1], m.Done) and events[-1].reason == "cancelled"
        assert "stopped" in app.chat.log_view.last("assistant")._footer
        # this window's own generation stops with Ctrl+C too
        app.chat.input.insert("Again")
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.bubble is not None and len(app.chat.bubble.text) > 5, what="own")
        await pilot.press("ctrl+c")
        await wait_for(pilot, lambda: app.chat.bubble is None and app.chat.last_done.reason == "cancelled",
                       what="own stopped")


@async_test
async def test_sampling_panel_saves_per_conversation(fresh_daemon):
    from rwkv_chat.daemon.config import SAMPLING_KEYS, load_config

    client = fresh_daemon.client
    conv = client.create_conversation(title="s")
    async with running(fresh_daemon, (120, 40)) as (pilot, app):
        await wait_for(pilot, lambda: app.chat.cid == conv.id, what="open")
        await pilot.press("f4")
        panel = app.chat.query_one(SamplingPanel)
        assert panel.display
        cfg = load_config(fresh_daemon.paths.config_file).sampling
        assert panel.values() == {**{k: getattr(cfg, k) for k in SAMPLING_KEYS}, "seed": None}
        panel.query_one("#s-top_p").value = "1.5"
        await pilot.click("#sampling-apply")
        assert "Top p" in str(panel.query_one("#sampling-error").render())
        panel.query_one("#s-top_p").value = "0.5"
        panel.query_one("#s-seed").value = "7"
        panel.query_one("#s-seed").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: client.conversation(conv.id).conversation.sampling.get("top_p") == 0.5,
                       what="saved")
        assert client.conversation(conv.id).conversation.sampling["seed"] == 7


@async_test
async def test_input_history_newlines_and_empty(fresh_daemon):
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        inp = app.chat.input
        await pilot.press("enter")                     # empty: nothing sent
        assert app.chat.bubble is None and not texts(app, UserMessage)
        await pilot.press(*"line1", "ctrl+j", *"line2")
        assert inp.text == "line1\nline2"
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.bubble is None and app.chat.last_done is not None, what="reply")
        assert texts(app, UserMessage) == ["line1\nline2"]
        await pilot.press(*"draft")
        await pilot.press("up")
        assert inp.text == "line1\nline2"
        await pilot.press("down", "down")
        assert inp.text == "draft"


@async_test
async def test_help_and_theme(fresh_daemon):
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        md = app.screen.query_one("Markdown")
        assert "Regenerate" in md.source and "Ctrl+R" in md.source
        await pilot.press("escape")
        assert app.screen is app.chat
        dark = app.current_theme.dark
        await pilot.press("ctrl+t")
        assert app.current_theme.dark is not dark


@async_test
async def test_the_editor_opens_with_the_cursor_after_the_text():
    from textual.app import App

    class Host(App):
        result = None

        def on_mount(self) -> None:
            self.push_screen(TextEditor("Edit", "Second message\nline two"), self._done)

        def _done(self, value) -> None:
            self.result = value

    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        await pilot.press("!")
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
    assert app.result == "Second message\nline two!"


@async_test
async def test_the_system_prompt_editor_takes_typing_beside_its_presets():
    """With a preset selector the text still has the focus: what is typed is what Ctrl+S saves."""
    from textual.app import App

    from rwkv_chat.app.screens.dialogs import PRESETS

    class Host(App):
        result = None

        def on_mount(self) -> None:
            self.push_screen(TextEditor("System prompt", "", PRESETS), self._done)

        def _done(self, value) -> None:
            self.result = value

    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        await pilot.press(*"You are a pirate.")
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
    assert app.result == "You are a pirate."


@async_test
async def test_the_editor_saves_text_typed_just_before_ctrl_s():
    """Keys that arrive in one read (fast typing, a terminal's burst) reach the text before Ctrl+S saves it."""
    from textual import events
    from textual.app import App

    class Host(App):
        result = None

        def on_mount(self) -> None:
            self.push_screen(TextEditor("Edit", "Hello"), self._done)

        def _done(self, value) -> None:
            self.result = value

    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause(0.1)
        for ch in " again":
            app.post_message(events.Key(ch, ch))
        app.post_message(events.Key("ctrl+s", None))
        await pilot.pause(0.3)
    assert app.result == "Hello again"


@async_test
async def test_control_characters_of_a_reply_are_shown_not_sent_to_the_terminal():
    """A model may write ESC, shift-out and other C0 codes: the reply and user views show stand-ins, the text
    kept for copying stays as generated."""
    from textual.app import App
    from textual.widgets import Markdown

    from rwkv_chat.app.widgets.chat_log import ChatLog

    raw = "a\x1b[2Jb\x0ec\x9b\x07d\ne\tf"

    class Host(App):
        def compose(self):
            yield ChatLog()

    app = Host()
    async with app.run_test(size=(80, 24)) as pilot:
        log = app.query_one(ChatLog)
        user, reply = UserMessage(raw), AssistantMessage(streaming=True)
        log.add(user)
        log.add(reply)
        await pilot.pause(0.1)
        reply.append(raw[:4])
        reply.append(raw[4:])
        await pilot.pause(0.3)                          # streamed chunks flushed
        streamed = reply.query_one(Markdown).source
        reply.finish(None, "done")
        await pilot.pause(0.1)
        final = reply.query_one(Markdown).source
        shown_user = str(user.query_one(".body").render())
    for shown in (streamed, final, shown_user):
        assert not any(ord(ch) < 0x20 and ch not in "\n\t" or 0x7F <= ord(ch) < 0xA0 for ch in shown), repr(shown)
        assert "\u241b[2Jb" in shown and "e\tf" in shown
    assert reply.text == raw and user.text == raw
