"""The model screen's strategy list comes from the planner once a checkpoint path is typed."""

from __future__ import annotations

import asyncio

from textual.app import App
from textual.widgets import Label, OptionList

from rwkv_chat.app.screens.first_run import ModelScreen, suggest_strategies

#: what the daemon reported: the list before a path is typed differs from what the planner finds here
DEVICES = ["cpu", "cuda:0 Some GPU"]


class Host(App):
    """An app showing only the model screen."""

    def on_mount(self) -> None:
        self.push_screen(ModelScreen(DEVICES))


def test_model_screen_lists_strategies_that_fit(model_path):
    from rwkv_chat.models.plan import suggest

    path = model_path("7")
    want = suggest(path)                        # the planner in this process: this machine's devices

    async def run() -> None:
        app = Host()
        async with app.run_test() as pilot:
            await pilot.pause()
            screen = app.screen
            options = screen.query_one("#strategy-list", OptionList)
            shown = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
            assert shown == suggest_strategies(DEVICES) != want
            screen.query_one("#model-path").value = str(path)
            for _ in range(600):                # the planner runs in a child process (imports torch)
                await asyncio.sleep(0.1)
                if screen.strategies == want:
                    break
            assert screen.strategies == want
            await pilot.pause()
            assert [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)] == want
            assert path.name in str(screen.query_one("#strategy-fit", Label).render())
            screen.query_one("#model-path").value = str(path) + "x"       # another (unfinished) path
            await pilot.pause()
            assert path.name not in str(screen.query_one("#strategy-fit", Label).render())

    asyncio.run(run())


def test_a_failed_load_puts_the_cursor_in_the_field_it_is_about():
    """Typing after a failed load corrects what failed: the strategy after a strategy or device mistake, the
    model path after any other."""

    async def run() -> None:
        app = Host()
        async with app.run_test() as pilot:
            await pilot.pause()
            screen = app.screen
            for message, kind, field in (
                    ("unknown dtype 'fp64' in strategy 'cpu fp64'", "StrategyError", "model-strategy"),
                    ("CUDA is not available in this torch build", "DeviceError", "model-strategy"),
                    ("/cuda-models/y.pth with strategy 'cuda fp16': checkpoint not found", "CheckpointError",
                     "model-path")):
                screen.set_loading("/x/y.pth")
                screen.finished(False, message, kind)
                await pilot.pause()
                assert app.focused is not None and app.focused.id == field, (message, app.focused)
                assert message in str(screen.query_one("#model-error").render())

    asyncio.run(run())


def test_only_the_first_model_becomes_the_default_unless_asked():
    """The box starts ticked on the first run (and wherever the app asks: no model loaded yet), unticked for a load
    beside a loaded model, which leaves the daemon's default as it is unless ticked."""
    from textual.widgets import Checkbox

    async def run(**kw) -> bool:
        class One(App):
            def on_mount(self) -> None:
                self.push_screen(ModelScreen(DEVICES, **kw))

        app = One()
        async with app.run_test() as pilot:
            await pilot.pause()
            return app.screen.query_one("#model-remember", Checkbox).value

    assert asyncio.run(run(first_run=True)) is True
    assert asyncio.run(run(first_run=False)) is False
    assert asyncio.run(run(first_run=False, remember=True)) is True
