"""The multi-line message input: Enter sends, Shift+Enter / Ctrl+J insert a new line, Up/Down at the
first/last line walk the open conversation's earlier messages. Pasted text is cleaned of control characters
(and is never taken for keys: ``rwkv_chat.app.terminal``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from textual import events
from textual.message import Message
from textual.widgets import TextArea

# C0 controls except tab and newline, DEL, C1 controls; ANSI escape sequences first (ESC [ ... final byte).
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
MAX_MESSAGE_CHARS = 200_000   # characters of one message; beyond it the input refuses to send


def clean_text(text: str) -> str:
    """``text`` with CRLF/CR turned into LF, ANSI escape sequences and control characters (other than tab
    and newline) removed. Never raises; lone surrogates are replaced."""
    text = text.encode("utf-8", "replace").decode("utf-8", "replace") if _has_surrogates(text) else text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", _ANSI.sub("", text))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class PromptInput(TextArea):
    """TextArea for composing a message (see module docstring)."""

    @dataclass
    class Submitted(Message):
        """Enter was pressed; ``text`` is the cleaned message (may be blank: the screen decides)."""

        text: str

    def __init__(self, *, id: str | None = None, history_limit: int = 200) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         compact=True, highlight_cursor_line=False,
                         placeholder="Message (Enter sends, Shift+Enter or Ctrl+J new line)")
        self.sent: list[str] = []
        self.sent_limit = history_limit
        self._pos: int | None = None     # index into history while browsing, None = editing a new draft
        self._draft = ""

    # -- history
    def use_history(self, messages: list[str]) -> None:
        """Up/Down walk ``messages`` (oldest first) from now on: the open conversation's own messages, so a
        message of another conversation never comes back here."""
        self.sent = []
        for text in messages:
            self.remember(text)

    def remember(self, text: str) -> None:
        """Add a sent message to the history (consecutive duplicates collapse)."""
        if text and (not self.sent or self.sent[-1] != text):
            self.sent.append(text)
            del self.sent[:-self.sent_limit]
        self._pos = None

    def _show(self, text: str, at_end: bool) -> None:
        self.load_text(text)
        last = self.document.line_count - 1
        self.move_cursor((last, len(self.document.get_line(last))) if at_end else (0, 0))

    def action_cursor_up(self, select: bool = False) -> None:
        if select or self.cursor_location[0] > 0 or not self.sent:
            return super().action_cursor_up(select)
        if self._pos is None:
            self._draft, self._pos = self.text, len(self.sent)
        if self._pos > 0:
            self._pos -= 1
            self._show(self.sent[self._pos], at_end=False)

    def action_cursor_down(self, select: bool = False) -> None:
        if select or self.cursor_location[0] < self.document.line_count - 1 or self._pos is None:
            return super().action_cursor_down(select)
        self._pos += 1
        if self._pos >= len(self.sent):
            self._pos = None
            self._show(self._draft, at_end=True)
        else:
            self._show(self.sent[self._pos], at_end=True)

    # -- keys and paste
    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(clean_text(self.text)))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self._replace_via_keyboard("\n", *self.selection)
            return
        await super()._on_key(event)

    async def _on_paste(self, event: events.Paste) -> None:
        event.prevent_default()
        event.stop()
        text = clean_text(event.text)
        if not text or self.read_only:
            return
        if len(self.text) + len(text) > MAX_MESSAGE_CHARS:
            self.notify(f"paste of {len(text):,} characters refused: a message holds at most "
                        f"{MAX_MESSAGE_CHARS:,}", severity="warning")
            return
        if result := self._replace_via_keyboard(text, *self.selection):
            self.move_cursor(result.end_location)
