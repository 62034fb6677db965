"""The model screen: shown when the daemon has no model (first run) or on Ctrl+L, and while one loads.

The user gives a local model's name (chosen from the list of pulled models) or a checkpoint path, and a
strategy; a collapsed form pulls a model from the Hugging Face Hub (``rwkv-chat pull`` in a worker); the suggestions come from the devices the daemon sees
(the same torch view as ``rwkv-chat doctor``). While a model loads (or its kernels build on first use) the
screen shows a progress view and closes itself once the daemon reports the model loaded; when a load fails
(this screen's, or the one the daemon was started with) it says what failed, with the form to try again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Footer, Input, Label, OptionList, ProgressBar, Static

from ..texts import STRATEGY_HELP
from ..widgets.model_pull import LocalModels, PullPanel

CHECKPOINT_SUFFIXES = (".pth", ".safetensors")


def suggest_strategies(devices: list[str]) -> list[str]:
    """Strategies that fit ``devices`` (a status reply's list: "cpu", "cuda:0 NAME", "mps"), best first.

    CUDA: fp16 (fastest), fp16i8 (int8 weights, about half the memory), a split that streams the rest of the
    layers on the CPU, and one entry per extra GPU. CPU: fp32 (exact) and bf16 (half the memory).
    """
    cuda = [d.split()[0] for d in devices if d.startswith("cuda")]
    out: list[str] = []
    if cuda:
        out += ["cuda fp16", "cuda fp16i8", "cuda fp16i8 *10 -> cpu fp32", "cuda fp16 *10+"]
        out += [f"{d} fp16" for d in cuda[1:]]
        if len(cuda) > 1:
            out.append(f"{cuda[0]} fp16 -> {cuda[1]} fp16")
    if "mps" in devices:
        out += ["mps fp32"]
    out += ["cpu fp32", "cpu bf16", "cpu fp32i8"]
    return out


def is_local_name(ref: str, data_dir: Path | None) -> bool:
    """Whether ``ref`` is the name of a model of the local registry in ``data_dir``."""
    from rwkv_chat.daemon.registry import NAME_RE, Registry, RegistryError

    if data_dir is None or not NAME_RE.fullmatch(ref.strip()):
        return False
    try:
        return Registry(data_dir).get(ref.strip()) is not None
    except RegistryError:
        return False


def checkpoint_path(text: str) -> str:
    """The absolute path a typed checkpoint path names (``~`` expanded; "model" for model.pth, as ``rwkv-chat
    load`` takes it)."""
    from rwkv_chat.daemon.registry import existing_path

    text = text.strip()
    return str(Path(existing_path(text) or os.path.expanduser(text)).resolve())


def check_checkpoint(path: str, data_dir: Path | None = None) -> str | None:
    """A user-facing problem with ``path`` as a checkpoint (or a local model's name, with the registry's
    ``data_dir``), or None."""
    if not path.strip():
        return "enter the path of a model checkpoint (.pth or .safetensors)"
    if is_local_name(path, data_dir):
        return None
    p = Path(checkpoint_path(path))
    if not p.exists():
        return f"{p} does not exist"
    if p.is_dir():
        if (p / "config.json").is_file():       # a Hugging Face checkpoint folder (Qwen2 / Qwen3)
            return None
        return f"{p} is a folder without a config.json; give the checkpoint file or a Hugging Face model folder"
    if p.suffix not in CHECKPOINT_SUFFIXES:
        return f"{p.name}: expected a .pth or .safetensors checkpoint"
    return None


#: error kinds of a failed load that are about its strategy (or device), not its model
STRATEGY_KINDS = ("StrategyError", "DeviceError")


def error_field(kind: str | None) -> str:
    """The id of the form's field a failed load of error ``kind`` is about: "model-strategy" or "model-path"."""
    return "model-strategy" if kind in STRATEGY_KINDS else "model-path"


def load_error_text(error: dict) -> str:
    """What a status's ``model.error`` (a failed load) tells the user."""
    return (f"The model did not load: {error.get('path', '?')} with strategy {error.get('strategy', '?')!r}: "
            f"{error.get('kind', 'Error')}: {error.get('message', '')}")


class ModelScreen(Screen):
    """Model set-up and load progress (see module docstring). Dismisses with True once a model is loaded."""

    BINDINGS = [Binding("escape", "close", "Back to chat"), Binding("f1", "app.help", "Help")]

    @dataclass
    class LoadRequested(Message):
        path: str
        strategy: str
        remember: bool

    def __init__(self, devices: list[str], *, path: str = "", strategy: str = "", first_run: bool = True,
                 loading: str = "", error: dict | None = None, data_dir: Path | None = None,
                 remember: bool | None = None) -> None:
        super().__init__()
        #: whether "Make it the default model" starts ticked (None: on the first run): the daemon's first model
        #: becomes the default, a load beside a loaded one leaves the default as it is unless asked
        self.remember = first_run if remember is None else remember
        self.data_dir = data_dir      # the local model registry's folder (None: no local models, no pull)
        self.devices = devices
        self.strategies = suggest_strategies(devices)
        self.path, self.strategy = path, strategy or self.strategies[0]
        self.first_run = first_run
        self.loading = loading
        self.error = error            # the daemon's last load error (status ``model.error``) shown, if any
        self.strategies_for: str | None = None   # the model path the strategy list was planned for
        self.draft = (self.path, self.strategy)      # what was typed, as the screen closed (Esc)

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="model-screen"):
            if self.first_run:
                yield Static("Welcome to rwkv-chat", classes="title")
                yield Static("No model is loaded yet. Give the path of an RWKV checkpoint (.pth or .safetensors, "
                             "versions 4 to 7), a Hugging Face Qwen2/Qwen3 folder or a local model's name (pull one from the Hugging Face Hub "
                             "below) and a strategy, then Load. The daemon keeps the model loaded for "
                             "every rwkv-chat window. Esc goes to the chat (Ctrl+L comes back here).",
                             classes="explain")
            else:
                yield Static("Load a model", classes="title")
            with Vertical(id="model-form"):
                yield Label("Checkpoint path or local model name")
                yield Input(self.path, placeholder="/path/to/RWKV-x070-World-0.1B.pth", id="model-path")
                if self.data_dir is not None:
                    yield LocalModels(self.data_dir, id="local-models-box")
                yield Label("Strategy (how to write one: below)")
                yield Input(self.strategy, id="model-strategy", suggester=SuggestFromList(self.strategies))
                yield Label("Strategies that fit this machine (" + ", ".join(d.split()[0] for d in self.devices) + "):",
                            id="strategy-fit")
                yield OptionList(*self.strategies, id="strategy-list")
                yield Checkbox("Make it the default model", self.remember, id="model-remember")
                with Horizontal(classes="buttons"):
                    yield Button("Load", id="model-load", variant="primary", compact=True)
                yield Static("", id="model-error")
                if self.data_dir is not None:
                    yield PullPanel(self.data_dir, id="pull")
                yield Static(Text(STRATEGY_HELP), id="strategy-help", classes="explain")
            with Vertical(id="model-progress"):
                yield Static("", id="progress-text")
                yield ProgressBar(total=None, show_eta=False, id="progress-bar")
                yield Static("The model answers as soon as it is loaded. On first use the compiled kernels build "
                             "in the background (about a minute) and take over when ready; the status bar shows "
                             "their progress.", classes="explain")
        yield Footer()

    def on_mount(self) -> None:
        if getattr(self.app, "snapshot", False):        # deterministic display: no blinking cursor
            for field in self.query(Input):
                field.cursor_blink = False
        self.set_loading(self.loading)
        if not self.loading:
            if self.error:
                self.show_error(load_error_text(self.error), self.error.get("kind"))
            else:
                self.query_one("#model-path", Input).focus()

    # -- state
    def set_loading(self, what: str) -> None:
        """Show the progress view for ``what`` (a path), or the form when empty."""
        self.loading = what
        self.query_one("#model-form").display = not what
        self.query_one("#model-progress").display = bool(what)
        if what:
            self.query_one("#progress-text", Static).update(Text(f"Loading {what} …"))

    def show_error(self, message: str, kind: str | None = None) -> None:
        """Back to the form with ``message``; the cursor goes to the field the error is about (the strategy for a
        strategy or device mistake, by its ``kind``, else the model), so that typing on corrects that one."""
        self.set_loading("")
        self.query_one("#model-error", Static).update(Text(message))
        self.query_one(f"#{error_field(kind)}", Input).focus()

    def link_status(self, status: dict) -> None:
        """A daemon status arrived: close when the model is loaded, show progress while one loads, and what
        failed when a load failed since this screen last looked."""
        model = status.get("model") or {}
        error = model.get("error")
        if not model.get("loading") and error and error != self.error:
            self.error = error                   # e.g. the load the daemon was started with
            if self.loading or self.first_run:
                self.show_error(load_error_text(error), error.get("kind"))
        elif model.get("loaded") and not model.get("loading") and (self.loading or self.first_run):
            self.dismiss(True)
        elif model.get("loading") and not self.loading:
            self.set_loading(model["loading"])
        if model.get("loading") and model.get("note"):
            self.query_one("#model-progress .explain", Static).update(Text(model["note"]))

    def finished(self, ok: bool, message: str, kind: str | None = None) -> None:
        if ok:
            self.dismiss(True)
        else:
            self.show_error(f"The model did not load: {message}", kind)

    # -- strategies that fit the checkpoint (the planner, ``rwkv-chat plan --suggest``)
    @on(Input.Changed, "#model-path")
    def _path_changed(self, event: Input.Changed) -> None:
        if self.strategies_for not in (None, event.value):       # the list was planned for another model
            self.query_one("#strategy-fit", Label).update("Strategies that fit this machine:")
            self.strategies_for = None
        if check_checkpoint(event.value) is None and not getattr(self.app, "snapshot", False):
            self._plan(checkpoint_path(event.value))

    @work(exclusive=True, group="plan")
    async def _plan(self, path: str) -> None:
        """Ask the planner which strategies fit ``path`` on this machine's devices (their free memory), in a
        child process (``rwkv-chat plan PATH --suggest --json``: it reads only the checkpoint's header, and
        the GPU context it opens to measure free memory ends with it); shown when it answers."""
        await asyncio.sleep(0.3)                     # typing: wait for a pause
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rwkv_chat.app.plan", path, "--suggest", "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            out, _ = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
        try:
            found = json.loads(out) if proc.returncode == 0 else None
        except ValueError:
            found = None
        if found and all(isinstance(s, str) for s in found):
            self.show_strategies(found, Path(path).name)
            self.strategies_for = self.query_one("#model-path", Input).value

    def show_strategies(self, strategies: list[str], name: str) -> None:
        """Replace the suggested strategies with ``strategies`` (those that fit ``name``)."""
        self.strategies = strategies
        options = self.query_one("#strategy-list", OptionList)
        options.clear_options()
        options.add_options(strategies)
        self.query_one("#model-strategy", Input).suggester = SuggestFromList(strategies)
        self.query_one("#strategy-fit", Label).update(f"Strategies that fit {name} on this machine:")

    # -- input
    @on(OptionList.OptionSelected, "#strategy-list")
    def _pick(self, event: OptionList.OptionSelected) -> None:
        self.query_one("#model-strategy", Input).value = str(event.option.prompt)

    @on(LocalModels.Chosen)
    def _local(self, event: LocalModels.Chosen) -> None:
        self.query_one("#model-path", Input).value = event.name
        self.query_one("#model-error", Static).update("")
        self.query_one("#model-load", Button).focus()

    @on(PullPanel.Pulled)
    def _pulled(self, event: PullPanel.Pulled) -> None:
        self.query_one(LocalModels).refresh_models()
        self.query_one("#model-path", Input).value = event.name
        self.query_one("#model-load", Button).focus()

    @on(Button.Pressed, "#model-load")
    @on(Input.Submitted)
    def _load(self) -> None:
        path = self.query_one("#model-path", Input).value.strip()
        strategy = " ".join(self.query_one("#model-strategy", Input).value.split())
        problem = check_checkpoint(path, self.data_dir)
        if problem is None and not strategy:
            problem = "enter a strategy, e.g. " + self.strategies[0]
        if problem:
            self.query_one("#model-error", Static).update(Text(problem))
            return
        if not is_local_name(path, self.data_dir):
            path = checkpoint_path(path)
        self.query_one("#model-error", Static).update("")
        self.set_loading(path)
        self.post_message(self.LoadRequested(path, strategy, self.query_one(Checkbox).value))

    def action_close(self) -> None:
        if not self.loading:
            self.draft = (self.query_one("#model-path", Input).value, self.query_one("#model-strategy", Input).value)
            self.dismiss(False)
