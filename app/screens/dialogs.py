"""Modal dialogs: a one-line text prompt (rename), a multi-line editor (edit message, system prompt with
presets), a yes/no confirmation (delete), and the export format choice. Each dismisses with its result
(``None`` when cancelled with Esc)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, TextArea

PRESETS = {
    "": "",
    "Assistant": "You are a helpful assistant. Answer clearly and accurately.",
    "Concise": "Answer in as few words as possible.",
    "Programmer": "You are an expert programmer. Answer with working code in Markdown code blocks.",
    "Storyteller": "You are a creative storyteller who writes vivid, engaging prose.",
}


class _Dialog(ModalScreen):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def action_cancel(self) -> None:
        self.dismiss(None)


class TextPrompt(_Dialog):
    """One-line input; dismisses with the text (stripped), or None."""

    def __init__(self, title: str, value: str = "") -> None:
        super().__init__()
        self.title_text, self.value = title, value

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Input(self.value, id="dialog-input")
            with Horizontal(classes="buttons"):
                yield Button("OK", id="ok", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    @on(Input.Submitted)
    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        self.dismiss(self.query_one(Input).value.strip())

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


class TextEditor(_Dialog):
    """Multi-line editor (Ctrl+S or the Save button); ``presets`` adds a preset selector."""

    BINDINGS = [Binding("ctrl+s", "save", "Save")]

    def __init__(self, title: str, value: str = "", presets: dict[str, str] | None = None) -> None:
        super().__init__()
        self.title_text, self.value, self.presets = title, value, presets

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog -wide"):
            yield Label(self.title_text, classes="dialog-title")
            if self.presets:
                yield Select([(name, name) for name in self.presets if name], prompt="Preset…",
                             id="preset", compact=True)
            yield TextArea(self.value, id="dialog-text", soft_wrap=True, compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Save (Ctrl+S)", id="ok", variant="primary", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    def on_mount(self) -> None:
        text = self.query_one(TextArea)
        text.move_cursor(text.document.end)       # typing goes on from the end of the text being edited
        text.focus()                              # the text, not the preset selector above it

    @on(Select.Changed, "#preset")
    def _preset(self, event: Select.Changed) -> None:
        if isinstance(event.value, str) and self.presets:
            self.query_one(TextArea).load_text(self.presets.get(event.value, ""))

    @on(Button.Pressed, "#ok")
    def action_save(self) -> None:
        self.dismiss(self.query_one(TextArea).text)

    @on(Button.Pressed, "#cancel")
    def _cancel(self) -> None:
        self.dismiss(None)


class Confirm(_Dialog):
    """Yes/No; dismisses with True or False (Esc = False)."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Yes", id="yes", variant="error", compact=True)
                yield Button("No", id="no", compact=True)

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    def action_cancel(self) -> None:
        self.dismiss(False)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class ExportChoice(_Dialog):
    """Markdown or JSON; dismisses with "md", "json" or None."""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Export the conversation as", classes="dialog-title")
            with Horizontal(classes="buttons"):
                yield Button("Markdown", id="md", variant="primary", compact=True)
                yield Button("JSON", id="json", compact=True)
                yield Button("Cancel", id="cancel", compact=True)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None if event.button.id == "cancel" else event.button.id)
