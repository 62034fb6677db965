"""The conversation sidebar: the daemon store's conversations, newest first (title, exchanges, and the id the
command line takes); select one to open it."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from ..texts import exchanges, terminal_safe


def title_of(info) -> str:
    """The display title of a ``ConversationInfo`` ("New conversation" when untitled; control characters shown
    as stand-ins)."""
    return terminal_safe((info.title or "").strip()) or "New conversation"


class Sidebar(Vertical):
    """Lists conversations; posts :class:`Sidebar.Selected` when the user picks one."""

    @dataclass
    class Selected(Message):
        conversation_id: str

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.items: list = []
        self.current: str | None = None

    def compose(self) -> ComposeResult:
        yield Static("Conversations", classes="title")
        yield OptionList(id="conversation-list")
        yield Static("Ctrl+N new · F2 rename · F8 delete", classes="hint")

    def set_items(self, items: list, current: str | None) -> None:
        """Show ``items`` (``ConversationInfo``; newest updated first) and highlight ``current``."""
        self.items = sorted(items, key=lambda c: (-c.updated, c.id))
        self.current = current
        ol = self.query_one(OptionList)
        ol.clear_options()
        for c in self.items:
            label = Text(title_of(c), overflow="ellipsis", no_wrap=True)
            shown = "c" + "x" * (len(c.id) - 1) if getattr(self.app, "snapshot", False) else c.id   # random ids
            # the id (what `rwkv-chat chat --conversation ID` takes) and the exchanges (as `rwkv-chat conversations
            # list` counts them) on the second line: a long title no longer pushes the count onto a line of its own
            label.append(f"\n{shown} ({exchanges(c)})", style="dim")
            ol.add_option(Option(label, id=c.id))
        self.highlight(current)

    def highlight(self, cid: str | None) -> None:
        self.current = cid
        ol = self.query_one(OptionList)
        if cid is None:
            ol.highlighted = None
            return
        for i, c in enumerate(self.items):
            if c.id == cid:
                ol.highlighted = i
                return

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        if event.option.id:
            self.post_message(self.Selected(event.option.id))
