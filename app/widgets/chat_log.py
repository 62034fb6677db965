"""The conversation view: user messages (plain text), assistant replies (Markdown, streamed), notices.

Streaming: tokens are buffered in :class:`AssistantMessage` and flushed to the Markdown widget at most
``FLUSH_HZ`` times a second (``Markdown.append`` re-parses only the last block), so a fast model does not
re-render the document per token. When the reply is done the full text replaces the streamed one, so the
final rendering does not depend on how the tokens were chunked.
"""

from __future__ import annotations

from dataclasses import dataclass

from markdown_it import MarkdownIt
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Markdown, ProgressBar, Static

from ..texts import terminal_safe

FLUSH_HZ = 15
PREVIEW_CHARS = 4000       # a longer user message is shown shortened (it is sent whole)


def _keep_line_breaks(state) -> None:
    """markdown-it core rule: every soft line break becomes a hard one (as ``breaks`` does for HTML; the
    Markdown widget reads the token types)."""
    for token in state.tokens:
        for child in token.children or ():
            if child.type == "softbreak":
                child.type = "hardbreak"


def reply_parser() -> MarkdownIt:
    """The Markdown parser of replies: GitHub-like, with every line break kept (a model writes a line break
    where it means one: addresses, poems, steps, list items; Markdown would join such lines into one)."""
    parser = MarkdownIt("gfm-like", {"breaks": True})
    parser.core.ruler.push("keep_line_breaks", _keep_line_breaks)
    return parser


def preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    """``text`` cut to ``limit`` characters with a note of how many were left out, its control characters shown
    as stand-ins (``texts.terminal_safe``)."""
    if len(text) <= limit:
        return terminal_safe(text)
    return terminal_safe(text[:limit]) + f"\n… ({len(text) - limit:,} more characters)"


class BranchArrow(Static):
    """``‹`` or ``›`` beside a message with siblings: a click shows the previous / next branch."""

    def __init__(self, step: int) -> None:
        super().__init__("‹" if step < 0 else "›", classes="arrow")
        self.step = step

    def on_click(self, event) -> None:
        event.stop()
        box = next((a for a in self.ancestors if isinstance(a, MessageBox)), None)
        if box is not None:
            box.action_branch(self.step)


class MessageBox(Vertical, can_focus=True):
    """One message; focus it (Tab / click) and press ``c`` to copy its text; where the conversation branches
    at it (a regenerated reply, an edited message), ``‹ 2/3 ›`` shows which branch is shown: ←/→ (or a click
    on an arrow) show another, Delete deletes the one shown (asked first)."""

    BINDINGS = [Binding("c", "copy", "Copy message"),
                Binding("left", "branch(-1)", "Previous branch", show=False),
                Binding("right", "branch(1)", "Next branch", show=False),
                Binding("delete", "delete_branch", "Delete branch", show=False)]

    @dataclass
    class Copy(Message):
        text: str

    @dataclass
    class Redo(Message):
        """Regenerate this reply / edit this message (a new branch beside it)."""

        box: "MessageBox"

    @dataclass
    class DeleteBranch(Message):
        """Delete this message's branch (it and what follows it; its siblings stay)."""

        box: "MessageBox"

    @dataclass
    class Branch(Message):
        """Show the sibling ``step`` places from this message's turn (another branch)."""

        box: "MessageBox"
        step: int

    role = ""
    who = ""

    def __init__(self, text: str, *, turn: int | None = None, branch: int = 0, branches: int = 1, **kw) -> None:
        super().__init__(**kw)
        self.text = text
        self.turn = turn       # the stored turn's index; None until the daemon has stored it (or if it did not)
        self.failed = False    # its generation failed: not stored (a reply, or the message it answered)
        self.branch, self.branches = branch, branches     # its place among its siblings (from 0), how many
        self.focus_when_mounted = False   # take the focus once mounted (the message shown again after a switch)

    def compose_header(self) -> ComposeResult:
        with Horizontal(classes="head"):
            yield Static(self.who, classes="who")
            yield BranchArrow(-1)
            yield Static(self._branch_label(), classes="branch")
            yield BranchArrow(1)

    def _branch_label(self) -> str:
        return f"{self.branch + 1}/{self.branches}"

    def on_mount(self) -> None:
        self._show_branches()
        if self.focus_when_mounted:
            self.call_after_refresh(self.focus, scroll_visible=False)

    def set_branches(self, branch: int, branches: int) -> None:
        """Its place among its siblings (``branch`` from 0 of ``branches``): arrows where there are several."""
        self.branch, self.branches = branch, branches
        self._show_branches()

    def _show_branches(self) -> None:
        if not self.query(".branch"):
            return
        self.query_one(".branch", Static).update(self._branch_label())
        for w in self.query(".branch, .arrow"):
            w.display = self.branches > 1

    def action_branch(self, step: int) -> None:
        if self.branches > 1 and self.turn is not None:
            self.post_message(self.Branch(self, step))

    def action_delete_branch(self) -> None:
        if self.branches > 1 and self.turn is not None:
            self.post_message(self.DeleteBranch(self))

    def action_copy(self) -> None:
        self.post_message(self.Copy(self.text))

    def action_redo(self) -> None:
        self.post_message(self.Redo(self))


class UserMessage(MessageBox):
    """A message of the user; ``e`` edits it (a new branch beside it)."""

    BINDINGS = [Binding("e", "redo", "Edit message")]
    role = "user"
    who = "You"

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        yield Static(Text(preview(self.text)), classes="body")

    def set_text(self, text: str) -> None:
        self.text = text
        self.query_one(".body", Static).update(Text(preview(text)))


class AssistantMessage(MessageBox):
    """A reply: Markdown body, a prefill progress bar while the prompt is read, a footer line."""

    BINDINGS = [Binding("r", "redo", "Regenerate reply")]
    role = "assistant"
    who = "RWKV"

    def __init__(self, text: str = "", *, streaming: bool = False, footer: str = "", who: str = "", **kw) -> None:
        super().__init__(text, **kw)
        if who:
            self.who = who          # the model family that answers ("RWKV", "Qwen")
        self.streaming = streaming
        self._pending: list[str] = []
        self._footer = footer
        self.job_id = ""
        self.mine = False      # started by this window

    def compose(self) -> ComposeResult:
        yield from self.compose_header()
        yield ProgressBar(total=None, show_eta=False, classes="prefill")
        yield Markdown(terminal_safe(self.text), classes="body", parser_factory=reply_parser)
        yield Static(self._footer or ("…" if self.streaming else ""), classes="footer")

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one(ProgressBar).display = False
        if self.streaming:
            self._timer = self.set_interval(1 / FLUSH_HZ, self._flush)

    # -- streaming
    def _ready(self) -> bool:
        """Whether the children exist (events can arrive between mounting and composing)."""
        return bool(self.query(ProgressBar))

    def prefill(self, done: int, total: int, note: str = "") -> None:
        """Prompt reading progress: ``done`` of ``total`` tokens; ``note``: why history is re-read, if it is."""
        what = f"{note}: {done:,}/{total:,} tokens" if note else f"reading the prompt: {done:,}/{total:,} tokens"
        if not self._ready():
            self._footer = what if total and done < total else "…"
            return
        bar = self.query_one(ProgressBar)
        if total and done < total:
            bar.display = True
            bar.update(total=total, progress=done)
            self.set_footer(what)
        else:
            bar.display = False
            self.set_footer("…")

    def append(self, text: str) -> None:
        self.text += text
        self._pending.append(text)

    def _flush(self) -> None:
        if self._pending and self._ready():
            chunk = "".join(self._pending)
            self._pending.clear()
            self.query_one(Markdown).append(terminal_safe(chunk))
            self.post_message(ChatLog.Grew())

    def finish(self, text: str | None, footer: str) -> None:
        """Stop streaming; show ``text`` (the daemon's final text, or None to keep what streamed)."""
        if self.streaming:
            if getattr(self, "_timer", None) is not None:
                self._timer.stop()
            self.streaming = False
        self._pending.clear()
        if text is not None:
            self.text = text
        self._footer = footer
        if not self._ready():
            self.call_after_refresh(self.finish, None, footer)
            return
        self.query_one(ProgressBar).display = False
        self.query_one(Markdown).update(terminal_safe(self.text))
        self.set_footer(footer)
        self.post_message(ChatLog.Grew())

    @property
    def footer(self) -> str:
        """The footer line shown under the reply (state, speed, why it stopped)."""
        return self._footer

    def set_footer(self, footer: str) -> None:
        self._footer = footer
        if self._ready():
            self.query_one(".footer", Static).update(Text(footer))


class Notice(Static):
    """A one-line note in the conversation (resumed from state, daemon lost, …)."""

    def __init__(self, text: str, *, kind: str = "info") -> None:
        super().__init__(Text(text), classes=f"notice -{kind}")


class ChatLog(VerticalScroll):
    """The scrolling list of messages of the open conversation. It follows its end: new messages, streamed
    text, a taller input (a large paste) or a resized terminal keep the end in view, until the user scrolls
    up; scrolling back to the end follows it again."""

    @dataclass
    class Grew(Message):
        """A message grew (streamed text)."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.can_focus = False
        self.following = True        # keep the end in view

    def watch_scroll_y(self, old: float, new: float) -> None:
        super().watch_scroll_y(old, new)
        # only a move of the view changes this (the user's scrolling, or ours to the end): content that grows
        # or a view that shrinks leaves scroll_y alone, and on_resize brings the end back
        self.following = new >= self.max_scroll_y - 1

    def on_resize(self, event) -> None:
        """The view changed size (the input grew with a paste, the terminal was resized)."""
        if self.following:
            self.scroll_end(animate=False)

    def watch_virtual_size(self, old, new) -> None:
        """The content changed size (a message came, a reply grew or was re-rendered)."""
        if self.following and new.height != old.height:
            self.scroll_end(animate=False)

    def clear(self) -> None:
        self.remove_children()

    def add(self, widget) -> None:
        self.mount(widget)

    def remove_from(self, widget) -> None:
        """Remove ``widget`` and everything shown after it (messages and the notes about them): a reply being
        regenerated, a message being edited."""
        shown = list(self.children)
        for w in shown[shown.index(widget):] if widget in shown else [widget]:
            w.remove()

    def follow(self) -> None:
        """Show the end and follow it again (a conversation was opened, a message sent)."""
        self.following = True
        self.call_after_refresh(self.scroll_end, animate=False, immediate=True)

    @on(Grew)
    def _grew(self, event: Grew) -> None:
        event.stop()          # the content's new size brings the end back (watch_virtual_size)

    def messages(self) -> list[MessageBox]:
        return list(self.query(MessageBox))

    def last(self, role: str) -> MessageBox | None:
        for w in reversed(self.messages()):
            if w.role == role:
                return w
        return None
