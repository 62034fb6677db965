"""The model screen's local models and its pull form.

:class:`LocalModels` lists the models of the local registry (``rwkv-chat models``) by name; choosing one
posts :class:`LocalModels.Chosen`. It is hidden while the registry is empty.

:class:`PullPanel` (collapsed at first) takes ``OWNER/REPO [FILE]`` and runs ``rwkv-chat pull`` in a worker
thread, as a child process: huggingface_hub's progress bars, logging and environment (``HF_ENDPOINT``,
``HF_HOME``, ``HF_TOKEN``, ``HF_HUB_OFFLINE``) stay out of the terminal UI, and the pull is exactly the
CLI's. A repo with several weight files shows them to choose from; a pull that succeeds posts
:class:`PullPanel.Pulled` with the local name.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Button, Collapsible, Input, Label, OptionList, ProgressBar, Static
from textual.widgets.option_list import Option


def _entries(data_dir: Path):
    from rwkv_chat.daemon.registry import Registry, RegistryError

    try:
        return Registry(data_dir).entries()
    except RegistryError:
        return []


def _describe(e) -> str:
    kind = f"RWKV v{e.version}" if e.family == "rwkv" else e.family
    return f"{e.name}  ({kind} {e.size}, {e.repo or e.path})"


class LocalModels(Vertical):
    """The local models by name; hidden when there are none."""

    @dataclass
    class Chosen(Message):
        name: str

    def __init__(self, data_dir: Path, **kw) -> None:
        super().__init__(**kw)
        self.data_dir = Path(data_dir)
        self.display = False          # until the registry is read (on mount): no flash of an empty list

    def compose(self) -> ComposeResult:
        yield Label("Local models (pulled from the Hub; choose one to load it by name)")
        yield OptionList(id="local-models")

    def on_mount(self) -> None:
        self.refresh_models()

    def refresh_models(self) -> None:
        """Read the registry again and show its models."""
        entries = _entries(self.data_dir)
        options = self.query_one("#local-models", OptionList)
        options.clear_options()
        options.add_options([Option(_describe(e), id=e.name) for e in entries])
        self.display = bool(entries)

    @on(OptionList.OptionSelected, "#local-models")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.post_message(self.Chosen(event.option.id or ""))


class PullPanel(Collapsible):
    """``OWNER/REPO [FILE]`` and a Pull button; runs ``rwkv-chat pull`` in a worker (see the module)."""

    @dataclass
    class Pulled(Message):
        name: str

    def __init__(self, data_dir: Path, **kw) -> None:
        super().__init__(title="Pull a model from the Hugging Face Hub", collapsed=True, **kw)
        self.data_dir = Path(data_dir)
        self.repo = ""

    def compose(self) -> ComposeResult:
        with Horizontal(classes="pull-row"):
            yield Input(placeholder="OWNER/REPO [FILE], e.g. BlinkDL/rwkv7-g1", id="pull-repo")
            yield Button("Pull", id="pull-start", compact=True)
        yield Static("", id="pull-status")
        yield ProgressBar(total=None, show_eta=False, id="pull-progress")
        yield OptionList(id="pull-files")

    def on_mount(self) -> None:
        self.query_one("#pull-progress").display = False
        self.query_one("#pull-files").display = False

    def _say(self, text: str, busy: bool = False) -> None:
        self.query_one("#pull-status", Static).update(Text(text))
        self.query_one("#pull-progress").display = busy

    @on(Button.Pressed, "#pull-start")
    @on(Input.Submitted, "#pull-repo")
    def _start(self, event) -> None:
        event.stop()
        words = self.query_one("#pull-repo", Input).value.split()
        if not words or len(words) > 2 or "/" not in words[0].strip("/"):
            self._say("give OWNER/REPO and, for a single file, its name: BlinkDL/rwkv7-g1 FILE.pth")
            return
        self.repo = words[0]
        self.pull(words[0], words[1] if len(words) > 1 else None)

    @on(OptionList.OptionSelected, "#pull-files")
    def _file(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.query_one("#pull-files").display = False
        self.pull(self.repo, event.option.id)

    def pull(self, repo: str, file: str | None) -> None:
        """Pull ``file`` of ``repo`` (None: the folder, the only weight file, or a list to choose from)."""
        self._say(f"Pulling {repo}{' ' + file if file else ''} …", busy=True)
        self.query_one("#pull-start", Button).disabled = True
        self._run(repo, file)

    @work(thread=True, exclusive=True, group="pull")
    def _run(self, repo: str, file: str | None) -> None:
        args = [sys.executable, "-m", "rwkv_chat.app.cli", "pull", repo] + ([file] if file else [])
        try:
            r = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=24 * 3600)
        except (OSError, subprocess.SubprocessError) as e:
            self.app.call_from_thread(self._finished, repo, file, 1, "", str(e))
            return
        self.app.call_from_thread(self._finished, repo, file, r.returncode, r.stdout, r.stderr)

    def _finished(self, repo: str, file: str | None, rc: int, out: str, err: str) -> None:
        from rwkv_chat.daemon.registry import Registry

        self.query_one("#pull-start", Button).disabled = False
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("rwkv-chat")]
        files = [line.split("\t") for line in out.splitlines() if "\t" in line]
        if rc == 1 and files:                                  # several weight files: choose one
            options = self.query_one("#pull-files", OptionList)
            options.clear_options()
            options.add_options([Option(f"{path}  ({size})", id=path) for path, size in files])
            options.display = True
            self._say(f"{repo} holds {len(files)} weight files: choose one")
            options.focus()
            return
        if rc != 0:
            self._say(lines[-1].removeprefix("rwkv-chat: ") if lines else f"the pull failed (exit status {rc})")
            return
        entry = Registry(self.data_dir).find(repo, file or "")
        if entry is None:                                      # the only weight file, chosen by the pull
            entries = [e for e in Registry(self.data_dir).entries() if e.repo == repo]
            entry = max(entries, key=lambda e: e.added) if entries else None
        if entry is None:
            self._say("pulled, but the local model is not in the registry")
            return
        self._say(f"Pulled {_describe(entry)}: load it with the Load button above.")
        self.post_message(self.Pulled(entry.name))
