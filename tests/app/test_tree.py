"""Pilot test of the conversation tree in the TUI against a real daemon: regenerated replies and an edited
message become branches shown with ``‹ n/m ›``; the arrows (keys and clicks) show each branch, read nothing
again, and the daemon continues from the branch shown; a message is read while typed; a preset's state
comes from the shared cache."""

from __future__ import annotations

from rwkv_chat.app.screens.dialogs import Confirm, TextEditor
from rwkv_chat.app.widgets.chat_log import AssistantMessage, BranchArrow, Notice, UserMessage

from .conftest import async_test, running, send, wait_for


def label(w) -> str:
    return str(w.query_one(".branch").render()) if w.query_one(".branch").display else ""


async def redone(pilot, app, before, what: str):
    await wait_for(pilot, lambda: app.chat.last_done is not before and app.chat.bubble is None, what=what)
    await wait_for(pilot, lambda: all(w.turn is not None for w in app.chat.log_view.messages()), what="synced")
    return app.chat.last_done


@async_test
async def test_branch_arrows_walk_regenerated_replies_and_an_edit(fresh_daemon):
    client = fresh_daemon.client
    async with running(fresh_daemon, (100, 40)) as (pilot, app):
        first = await send(pilot, app, "Hello")
        second = await send(pilot, app, "Tell me a story")
        cid = app.chat.cid
        client.set_sampling(cid, temperature=1.0, top_p=1.0)     # three different replies
        done = second
        for k in range(2):
            await pilot.press("ctrl+r")
            done = await redone(pilot, app, done, f"regenerate {k}")
            assert app.chat.last_reuse.job_id == done.job_id and app.chat.last_reuse.reread_tokens == 0
        last = app.chat.log_view.last("assistant")
        await wait_for(pilot, lambda: label(last) == "3/3", what="‹ 3/3 ›")
        # one note, after the reply it is about: a regenerated reply's note goes with it
        notes = [w for w in app.chat.log_view.children if isinstance(w, Notice) and "re-read" in str(w.render())]
        assert len(notes) == 1 and "0 tokens re-read" in str(notes[0].render())
        shown = list(app.chat.log_view.children)
        assert shown.index(notes[0]) > shown.index(last)
        replies = [t.text for t in client.branches(cid).turns if t.parent == 2]
        assert len(replies) == 3 and replies[2] == last.text

        # ← on the focused reply, twice: the first reply; → back to the second; a click on ‹
        last.focus()
        for want in (1, 0):
            await pilot.press("left")
            await wait_for(pilot, lambda: client.branches(cid).leaf == [3, 4, 5][want]
                           and label(app.chat.log_view.last("assistant")) == f"{want + 1}/3", what=f"branch {want}")
            assert app.chat.log_view.last("assistant").text == replies[want]
        await pilot.press("right")
        await wait_for(pilot, lambda: label(app.chat.log_view.last("assistant")) == "2/3", what="branch 1")
        await pilot.pause(0.3)                                   # the redrawn view settles (scrolled to its end)
        arrow = app.chat.log_view.last("assistant").query(BranchArrow).first()
        await pilot.click(arrow)
        await wait_for(pilot, lambda: label(app.chat.log_view.last("assistant")) == "1/3", what="clicked ‹")
        assert app.chat.log_view.last("assistant").text == replies[0] == second.text

        # edit the first message (e on it): a branch at turn 0; Alt+← shows the original again
        await wait_for(pilot, lambda: app.focused is app.chat.log_view.last("assistant"), what="focus kept")
        app.chat.log_view.messages()[0].focus()
        await pilot.press("e")
        await wait_for(pilot, lambda: isinstance(app.screen, TextEditor), what="edit dialog")
        app.screen.query_one("TextArea").load_text("Hi")
        before = app.chat.last_done
        await pilot.press("ctrl+s")
        edited = await redone(pilot, app, before, "edit")
        assert app.chat.last_reuse.job_id == edited.job_id and app.chat.last_reuse.reread_tokens == 0
        assert [w.text for w in app.chat.log_view.query(UserMessage)] == ["Hi"]
        await wait_for(pilot, lambda: label(app.chat.log_view.messages()[0]) == "2/2", what="‹ 2/2 › on the edit")
        assert app.focused is app.chat.input                # the edited message is gone: typing goes on there
        await pilot.press("alt+left")
        await wait_for(pilot, lambda: [w.text for w in app.chat.log_view.query(UserMessage)] == ["Hello",
                                                                                                 "Tell me a story"],
                       what="the original branch")
        assert [w.text for w in app.chat.log_view.query(AssistantMessage)] == [first.text, replies[0]]
        # the daemon goes on from the branch shown, reading only the new message
        nxt = await send(pilot, app, "Go on")
        assert app.chat.last_reuse.reread_tokens == 0 and nxt.prompt_tokens == len("User: Go on\n\nAssistant:".encode())
        assert [t.text for t in client.conversation(cid).turns][:4] == ["Hello", first.text, "Tell me a story",
                                                                      replies[0]]
        # Delete on the first reply's branch: asked, deleted, the other replies stay
        await wait_for(pilot, lambda: label(app.chat.log_view.messages()[3]) == "1/3", what="the first reply shown")
        app.chat.log_view.messages()[3].focus()
        await pilot.press("delete")
        await wait_for(pilot, lambda: isinstance(app.screen, Confirm), what="confirm dialog")
        await pilot.press("y")
        await wait_for(pilot, lambda: len(app.chat.log_view.messages()) == 4
                       and label(app.chat.log_view.messages()[3]) == "1/2", what="the branch deleted")
        assert app.chat.log_view.messages()[3].text == replies[1]    # the reply shown last before it
        left = [t.text for t in client.branches(cid).turns if t.parent == 2]
        assert left == replies[1:] and "Go on" not in [t.text for t in client.branches(cid).turns]


@async_test
async def test_a_message_is_read_while_typed(fresh_daemon):
    client = fresh_daemon.client
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        await send(pilot, app, "Hello")
        cid = app.chat.cid
        for ch in "Tell me about cats":
            await pilot.press("space" if ch == " " else ch)

        def read_ahead():
            d = client.status()["home"]["sessions"]["drafts"].get(cid)
            return d if d and not d["pending"] and d["fed"] and d["fed"] == d["tokens"] else None

        d = await wait_for(pilot, read_ahead, what="the draft read ahead")
        before = app.chat.last_done
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.chat.last_done is not before and app.chat.bubble is None, what="reply")
        assert app.chat.last_reuse.job_id == app.chat.last_done.job_id
        assert app.chat.last_reuse.draft_tokens == d["fed"] > 0
        assert any("read while typing" in str(n.render()) for n in app.chat.log_view.query(Notice))


@async_test
async def test_a_preset_prompt_comes_from_the_shared_cache(fresh_daemon):
    client = fresh_daemon.client
    preset = "You are a patient teacher. Explain things simply, with one example."
    a = client.create_conversation(system_prompt=preset).id
    list(client.chat(a, "Hi"))                                   # reads the preset once
    b = client.create_conversation(system_prompt=preset).id
    async with running(fresh_daemon, (100, 30)) as (pilot, app):
        await wait_for(pilot, lambda: app.chat.cid == b, what="the newest conversation open")
        done = await send(pilot, app, "What is rain?")
        head = len((preset + "\n\n").encode())                   # the tiny model: one token per byte
        assert app.chat.last_reuse.job_id == done.job_id and app.chat.last_reuse.cached_tokens == head
        assert any(f"{head} tokens from cache" in str(n.render()) for n in app.chat.log_view.query(Notice))
