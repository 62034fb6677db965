"""The TUI with a model that has a context limit (``[model] context_limit`` on the tiny RWKV-7, bytes
vocabulary): the status bar shows the tokens used of the limit, and a reply whose oldest turns were left out
says so (``context_policy = "truncate"``)."""

from __future__ import annotations

import os

from rwkv_chat.app.widgets.status_bar import StatusBar
from rwkv_chat.daemon.config import load_config, save_config

from .conftest import async_test, make_app, make_home, ready, send, start_daemon, wait_for

LIMIT = 200


@async_test
async def test_the_status_bar_shows_used_of_the_limit_and_truncation(tmp_path, model_path, home_env):
    model = model_path("7")
    paths = make_home(tmp_path / "home", model, max_tokens=16)
    cfg = load_config(paths.config_file)
    cfg.model.context_limit, cfg.model.context_policy = LIMIT, "truncate"
    save_config(cfg, paths.config_file)
    daemon = start_daemon(paths, model)
    try:
        os.environ["RWKV_CHAT_HOME"] = str(tmp_path / "home")
        app = make_app(daemon)
        async with app.run_test(size=(140, 30)) as pilot:
            await ready(pilot, app)
            bar = app.chat.query_one(StatusBar)
            await wait_for(pilot, lambda: bar.context == f"ctx ?/{LIMIT}", what="the limit in the status bar")
            done = await send(pilot, app, "Hello there")
            assert done.context_limit == LIMIT and 0 < done.context_used <= LIMIT
            assert bar.context == f"ctx {done.context_used}/{LIMIT}"
            assert f"ctx {done.context_used}/{LIMIT}" in str(bar.render())
            for i in range(12):
                done = await send(pilot, app, f"Tell me more, part {i}.")
                if done.dropped_turns:
                    break
            assert done.dropped_turns, "the conversation never reached the limit"
            footer = app.chat.log_view.last("assistant").footer
            assert f"the {2 * done.dropped_turns} oldest turns were left out" in footer
            assert bar.context == f"ctx {done.context_used}/{LIMIT}" and done.context_used <= LIMIT
    finally:
        daemon.stop()


@async_test
async def test_the_sampling_panel_shows_the_models_defaults_under_the_configs(fresh_daemon):
    from textual.widgets import Input

    from rwkv_chat.app.widgets.sampling_panel import SamplingPanel

    app = make_app(fresh_daemon)
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(pilot, app)
        status = fresh_daemon.client.status()
        assert status["model"]["sampling_defaults"] == {}             # RWKV: none
        status["model"]["sampling_defaults"] = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}   # a Qwen2 folder's
        app.chat.link_status(status)
        panel = app.chat.query_one(SamplingPanel)
        shown = {k: panel.query_one(f"#s-{k}", Input).value for k in ("temperature", "top_p", "top_k")}
        assert shown == {"temperature": "0.0", "top_p": "0.8", "top_k": "20"}   # the test config sets temperature


def qwen_daemon(tmp_path, shared_dir):
    """(the folder, the home's paths, the folder's context limit, a daemon started on a tiny Qwen2 folder with
    replies of 8 tokens)."""
    from ..daemon.conftest import TINY_QWEN, write_qwen_folder

    folder = write_qwen_folder(tmp_path / "qwen", shared_dir)
    paths = make_home(tmp_path / "home", folder, max_tokens=8)
    return folder, paths, TINY_QWEN["max_position_embeddings"], start_daemon(paths, folder)


@async_test
async def test_a_qwen2_folder_in_the_tui(tmp_path, shared_dir, home_env):
    """The TUI on a Hugging Face Qwen2 folder: replies labelled by the model's family, the context used of the
    folder's own limit (its max_position_embeddings) in the status bar."""
    from rwkv_chat.app.widgets.chat_log import AssistantMessage

    folder, paths, limit, daemon = qwen_daemon(tmp_path, shared_dir)
    try:
        app = make_app(daemon)
        async with app.run_test(size=(140, 30)) as pilot:
            await ready(pilot, app)
            bar = app.chat.query_one(StatusBar)
            await wait_for(pilot, lambda: bar.context == f"ctx ?/{limit}", what="the folder's limit")
            done = await send(pilot, app, "Hello there")
            assert done.context_limit == limit and 0 < done.context_used <= limit
            assert bar.context == f"ctx {done.context_used}/{limit}"
            reply = app.chat.log_view.last("assistant")
            assert isinstance(reply, AssistantMessage) and reply.who == "Qwen"
    finally:
        daemon.stop()


@async_test
async def test_an_opened_conversation_shows_its_context_in_use(tmp_path, shared_dir, home_env):
    """After a restart of the daemon, the conversation the TUI opens (and one switched to) shows the context its
    last reply's Done reported, before any new reply."""
    folder, paths, limit, daemon = qwen_daemon(tmp_path, shared_dir)
    try:
        app = make_app(daemon)
        last = {}
        async with app.run_test(size=(140, 30)) as pilot:
            await ready(pilot, app)
            for first, second in (("Hello there", "What next?"), ("Hi", "And then?")):
                await pilot.press("ctrl+n")                     # a new conversation
                await wait_for(pilot, lambda: app.chat.cid is not None and app.chat.cid not in last,
                               what="a new conversation")
                await send(pilot, app, first)
                done = await send(pilot, app, second)
                last[app.chat.cid] = done.context_used
        assert len(last) == 2 and all(last.values())
        daemon.stop()
        daemon = start_daemon(paths, folder)
        app = make_app(daemon)
        async with app.run_test(size=(140, 30)) as pilot:
            await ready(pilot, app)
            bar = app.chat.query_one(StatusBar)
            await wait_for(pilot, lambda: app.chat.cid in last, what="the last conversation opened")
            opened = app.chat.cid
            app_cids = [opened]
            for step in (1, None):
                cid = app.chat.cid
                shown = f"ctx {last[cid]:,}/{limit:,}"
                await wait_for(pilot, lambda: bar.context == shown, what=f"{shown} in the status bar")
                assert shown in str(bar.render()) and app.chat.last_done is None     # no reply since
                if step is not None:                            # switch to the other conversation
                    app.chat.action_switch_conversation(step)
                    await wait_for(pilot, lambda: app.chat.cid != cid, what="the other conversation")
                    app_cids.append(app.chat.cid)
            assert sorted(app_cids) == sorted(last) and last[app_cids[0]] != last[app_cids[1]]
        # opened before the model loads: shown once it has
        daemon.stop()
        cfg = load_config(paths.config_file)
        cfg.model.path = ""
        save_config(cfg, paths.config_file)
        daemon = start_daemon(paths, None)
        app = make_app(daemon)
        async with app.run_test(size=(140, 30)) as pilot:
            await ready(pilot, app)
            bar = app.chat.query_one(StatusBar)
            await wait_for(pilot, lambda: app.chat.cid in last, what="the last conversation opened")
            await pilot.pause(0.3)
            assert "ctx" not in bar.context
            list(daemon.client.load(str(folder), "cpu fp32"))
            shown = f"ctx {last[app.chat.cid]:,}/{limit:,}"
            await wait_for(pilot, lambda: bar.context == shown, what=f"{shown} once the model loaded")
    finally:
        daemon.stop()


@async_test
async def test_no_context_part_for_a_model_without_a_limit(fresh_daemon):
    """The RWKV model (no context limit): an opened conversation with exchanges shows no ctx part."""
    from rwkv_chat.app.widgets.chat_log import AssistantMessage

    for message in ("Hello there", "What next?"):
        assert list(fresh_daemon.client.chat("rwkv", message))[-1].context_limit is None
    app = make_app(fresh_daemon)
    async with app.run_test(size=(140, 30)) as pilot:
        await ready(pilot, app)
        await wait_for(pilot, lambda: app.chat.cid == "rwkv" and isinstance(app.chat.log_view.last("assistant"),
                                                                           AssistantMessage),
                       what="the conversation opened")
        await pilot.pause(0.3)
        bar = app.chat.query_one(StatusBar)
        assert bar.context == "" and "ctx" not in str(bar.render())
