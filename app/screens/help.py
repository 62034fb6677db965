"""The help screen (F1 / ?): every key binding of the chat screen and the app, and how input works."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

INTRO = """\
# rwkv-chat

Chat with an RWKV model served by the rwkv-chat daemon. Conversations are kept by the daemon with their
recurrent **state**, so switching back to one resumes it without reading the history again.

**Input** — Enter sends · Shift+Enter or Ctrl+J inserts a new line · Up/Down on the first/last line walk
this conversation's earlier messages · pasted text is inserted as text.

**Conversations** — Ctrl+Up / Ctrl+Down (or Alt+Up / Alt+Down) open the previous / next conversation of the
sidebar · Ctrl+N starts a new one, titled by its first message · F9 shows or hides the sidebar (Tab to it and
Enter opens the highlighted one).

**Messages** — Tab to a message and press `c` to copy it, `r` on a reply to regenerate it, `e` on a message
to edit it: the new reply or message is another branch beside the original, read from the state saved before
it (nothing above it is read again). A message with branches shows ‹ 2/3 ›: ←/→ on it, a click on an arrow,
or Alt+←/→ (the last such message) show another branch; Delete on it deletes the branch shown.

**Model** — Ctrl+L loads or switches the model. The first time, the model answers at once on the pure-torch
path while the compiled kernels build in the background; the status bar shows the build and the switch.
"""


def key_label(keys: str) -> str:
    """``"ctrl+n,f2"`` -> ``"Ctrl+N / F2"``."""
    out = []
    for k in keys.split(","):
        parts = [p.capitalize() if len(p) > 1 else p.upper() for p in k.strip().split("+")]
        out.append("+".join(parts).replace("Question_mark", "?").replace("Escape", "Esc"))
    return " / ".join(out)


def bindings_table(bindings: list[Binding]) -> str:
    rows = ["| Key | Action |", "|---|---|"]
    seen = set()
    for b in bindings:
        if not b.description or b.description in seen:
            continue
        seen.add(b.description)
        rows.append(f"| {key_label(b.key)} | {b.description} |")
    return "\n".join(rows)


class HelpScreen(ModalScreen):
    """Modal help; Esc, q or F1 closes it."""

    BINDINGS = [Binding("escape,q,f1,question_mark", "app.pop_screen", "Close help")]

    def __init__(self, bindings: list[Binding]) -> None:
        super().__init__()
        self.bindings_list = bindings

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Markdown(INTRO + "\n## Keys\n\n" + bindings_table(self.bindings_list) + "\n\nEsc closes this help.")
