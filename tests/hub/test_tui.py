"""The model screen lists local models by name and pulls one from the Hub (the real app via Pilot, a real
daemon without a model, the Hub server on 127.0.0.1)."""

from __future__ import annotations

from rwkv_chat.app.screens.first_run import ModelScreen
from rwkv_chat.app.widgets.model_pull import LocalModels, PullPanel

from ..app.conftest import async_test, make_app, make_home, start_daemon, wait_for
from .conftest import TINY_REPO


@async_test
async def test_the_model_screen_pulls_a_model_and_loads_it_by_name(tmp_path, hub, monkeypatch):
    monkeypatch.setenv("RWKV_CHAT_HOME", str(tmp_path / "home"))     # make_home sets it; restored after
    paths = make_home(tmp_path / "home", None)
    # huggingface_hub's configuration for the `rwkv-chat pull` child process the screen runs
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    daemon = start_daemon(paths, None)
    try:
        app = make_app(daemon)
        async with app.run_test(size=(100, 40)) as pilot:
            screen = await wait_for(pilot, lambda: isinstance(app.screen, ModelScreen) and app.screen.query(PullPanel)
                                    and app.screen, what="the model screen")
            assert not screen.query_one(LocalModels).display                 # nothing pulled yet
            panel = screen.query_one(PullPanel)
            panel.collapsed = False
            await pilot.pause(0.1)
            screen.query_one("#pull-repo").value = TINY_REPO
            screen.query_one("#pull-repo").focus()
            await pilot.press("enter")
            files = screen.query_one("#pull-files")
            await wait_for(pilot, lambda: files.display and files.option_count == 2, timeout=60,
                           what="the repo's weight files")
            assert [files.get_option_at_index(i).id for i in range(2)] == ["tiny-rwkv-6v0-1m.pth",
                                                                         "tiny-rwkv-7v0-834K.pth"]
            files.highlighted = 1
            await pilot.press("enter")
            path = screen.query_one("#model-path")
            await wait_for(pilot, lambda: path.value == "tiny-rwkv-7v0-834k", timeout=60, what="the pull")
            local = screen.query_one("#local-models")
            assert screen.query_one(LocalModels).display and local.option_count == 1
            assert local.get_option_at_index(0).id == "tiny-rwkv-7v0-834k"
            screen.query_one("#model-strategy").value = "cpu fp32"
            await pilot.click("#model-load")
            await wait_for(pilot, lambda: not isinstance(app.screen, ModelScreen), timeout=60, what="the load")
            model = daemon.client.status()["model"]
            assert model["loaded"] and model["name"] == "tiny-rwkv-7v0-834k"
    finally:
        daemon.stop()
