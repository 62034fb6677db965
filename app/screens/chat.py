"""The chat screen: sidebar, conversation view, input, sampling panel, status bar, footer.

Generation events come from the app's link (the open conversation's topic), whoever started the
generation: this window, another rwkv-chat window or a script. The screen keeps at most one streaming
reply (``self.bubble``); the daemon runs one generation per conversation at a time.

The view shows what the daemon stored: when a generation ends (a stopped reply is stored too, marked
stopped) the screen reads the conversation back (:meth:`ChatScreen.sync`), gives every message the index
of its stored turn (regenerate and edit name that turn, so they act on exactly what is shown) and redraws
whatever differs. Only a message whose generation failed stays on screen unsaved, marked so.
"""

from __future__ import annotations

from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer

from rwkv_chat.daemon.config import SAMPLING_KEYS, Config, ConfigError, load_config

from ..texts import queued_reason
from ..widgets.chat_log import AssistantMessage, ChatLog, MessageBox, Notice, UserMessage
from ..widgets.prompt_input import MAX_MESSAGE_CHARS, PromptInput
from ..widgets.sampling_panel import SamplingPanel
from ..widgets.sidebar import Sidebar
from ..widgets.status_bar import StatusBar
from .conversation_actions import ConversationActions
from .drafting import DraftSender

SHOWN_TURNS = 60          # turns rendered when a conversation opens (older ones: a note)
STOPPED = "stopped (kept as far as it got)"
SWITCH = Binding.Group("Conversation", compact=True)     # the footer shows "^↑^↓ Conversation"
LOAD_KEY = "Ctrl+L"


def _fingerprint(status: dict) -> str | None:
    """The loaded model's fingerprint in a status reply (None while none is loaded)."""
    model = status.get("model") or {}
    return model.get("fingerprint") if model.get("loaded") else None


class ChatScreen(ConversationActions, DraftSender, Screen):
    AUTO_FOCUS = "#input"
    #: F2, F3, F5-F9 (rename, edit, system prompt, export, copy reply, delete, sidebar) and the app's Ctrl+T are
    #: left out of the footer so that it keeps the app's keys (Model, Help, Quit) on a 100-column terminal; F1
    #: lists every key, the sidebar's line shows Ctrl+N, F2 and F8
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+c", "stop_or_copy", "Stop", show=False, priority=True),
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("ctrl+up,alt+up", "switch_conversation(-1)", "Previous conversation", priority=True,
                group=SWITCH),
        Binding("ctrl+down,alt+down", "switch_conversation(1)", "Next conversation", priority=True,
                group=SWITCH),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("alt+left", "branch_last(-1)", "Branch ‹", show=False),
        Binding("alt+right", "branch_last(1)", "Branch ›", show=False),
        Binding("f2", "rename", "Rename", priority=True, show=False),      # the sidebar shows it
        Binding("f3", "edit_last", "Edit last", priority=True, show=False),
        Binding("f4", "toggle_sampling", "Sampling", priority=True),
        Binding("f5", "system_prompt", "System prompt", priority=True, show=False),
        Binding("f6", "export", "Export", priority=True, show=False),
        Binding("f7", "copy_last", "Copy reply", priority=True, show=False),
        Binding("f8", "delete", "Delete", priority=True, show=False),
        Binding("f9", "toggle_sidebar", "Sidebar", priority=True, show=False),
        Binding("ctrl+l", "app.load_model", "Model"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.cid: str | None = None          # the open conversation
        self.infos: dict = {}                # id -> ConversationInfo
        self.store_revision = None           # the daemon's last reported store revision (the sidebar follows it)
        self._model_defaults: dict | None = None   # the loaded model's sampling defaults (the panel shows them)
        self.job: str | None = None          # generation running in the open conversation
        self.bubble: AssistantMessage | None = None
        self.pending: str | None = None      # a message this window sent, not yet Started
        self.last_done = None                # the last Done event of the open conversation
        self.last_reuse = None               # the last PromptReuse event (how a chat's prompt was read)
        self.resume_unsaid: str | None = None  # conversation opened before the model's fingerprint was known
        self.action = ""                     # what this window's generation does: "send", "regenerate", "edit"
        self.hidden_turns = 0                # stored turns of the open conversation not drawn (older ones)
        self.context_seq = 0                 # bumped by each conversation opened and each Done shown
        self.context_model: tuple | None = None   # (conversation, model fingerprint) whose context was asked

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            yield Sidebar(id="sidebar")
            with Vertical(id="center"):
                yield ChatLog(id="log")
                yield PromptInput(id="input")
            yield SamplingPanel(self._sampling_defaults(), id="sampling")
        yield StatusBar(snapshot=self.app.snapshot, id="status")
        yield Footer(compact=True)         # one space between keys: more of them on a narrow terminal

    def on_mount(self) -> None:
        if self.app.snapshot:
            self.input.cursor_blink = False
        self.query_one(SamplingPanel).display = False
        self.query_one(SamplingPanel).show({})
        self.focus_input()

    def _sampling_defaults(self, model_defaults: dict | None = None) -> dict:
        """The settings a generation starts from: the config's [sampling], with the loaded model's own defaults
        (the status's ``sampling_defaults``) under the keys the config file does not set."""
        try:
            s = load_config(self.app.paths.config_file).sampling_base(model_defaults)
        except (ConfigError, ValueError):
            s = Config().sampling
        return {k: getattr(s, k) for k in SAMPLING_KEYS}

    def _model_sampling(self, status: dict) -> None:
        """Take the loaded model's sampling defaults into the sampling panel (when they change)."""
        model_defaults = (status.get("model") or {}).get("sampling_defaults") or None
        if model_defaults != self._model_defaults:
            self._model_defaults = model_defaults
            panel = self.query_one(SamplingPanel)
            panel.defaults = self._sampling_defaults(model_defaults)
            conv = self.infos.get(self.cid)
            panel.show(conv.sampling if conv is not None else {})

    # ---------------------------------------------------------------- helpers
    @property
    def log_view(self) -> ChatLog:
        return self.query_one(ChatLog)

    @property
    def input(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    assistant = "RWKV"      # who answers, as the replies are labelled: the loaded model's family

    @staticmethod
    def _who(family: str) -> str:
        """A reply's label for a model family ("qwen2" -> "Qwen", else "RWKV")."""
        return "Qwen" if family == "qwen2" else "RWKV"

    def _note_family(self, status: dict) -> None:
        model = status.get("model") or {}
        if model.get("loaded") or model.get("loading"):
            self.assistant = self._who(model.get("family") or "")

    def focus_input(self) -> None:
        if self.is_mounted:
            self.input.focus()

    def notice(self, text: str, kind: str = "info") -> None:
        self.log_view.add(Notice(text, kind=kind))

    def busy(self) -> bool:
        return self.job is not None or self.bubble is not None

    def start_bubble(self, footer: str = "…") -> AssistantMessage:
        self.bubble = AssistantMessage(streaming=True, footer=footer, who=self.assistant)
        self.log_view.add(self.bubble)
        return self.bubble

    def end_generation(self, text: str | None, footer: str) -> None:
        if self.bubble is not None:
            self.bubble.finish(text, footer)
        self.bubble, self.job, self.pending = None, None, None

    # ---------------------------------------------------------------- link events (called by the app)
    def link_connected(self, message) -> None:
        self.status_bar.connection = "connected"
        self.status_bar.set_status(message.status)
        self._note_family(message.status)
        self._model_sampling(message.status)
        self.infos = {c.id: c for c in message.conversations}
        if message.restarted and self.cid in self.infos:
            # keep what is on screen (an interrupted reply's text included); only follow the topic again
            self.query_one(Sidebar).set_items(list(self.infos.values()), self.cid)
            self.notice("The daemon is back; reconnected.", "ok")
            return
        if message.restarted:
            self.notice("The daemon is back; reconnected.", "ok")
        current = self.cid if self.cid in self.infos else None
        if current is None and self.infos:
            current = max(self.infos.values(), key=lambda c: (c.updated, c.id)).id
        self.query_one(Sidebar).set_items(list(self.infos.values()), current)
        if current is not None:
            self.open_conversation(current)
        elif not message.restarted:
            self.cid = None
            self.notice("No conversations yet: type a message and press Enter to start one.")

    def link_lost(self, reason: str) -> None:
        self.status_bar.connection = "daemon unreachable — reconnecting…"
        if self.bubble is not None:
            self.end_generation(None, "interrupted: the daemon stopped answering (the text so far is kept)")
        self.job = None
        self.notice(f"Daemon unreachable: {reason}. Reconnecting automatically; start one with "
                    "`rwkv-chat daemon start` if it does not come back.", "error")

    def link_status(self, status: dict) -> None:
        self.status_bar.connection = "connected"
        self.status_bar.set_status(status)
        self._note_family(status)
        self._model_sampling(status)
        self._say_resume((status.get("model") or {}).get("fingerprint"))
        revision = status.get("store_revision")
        if revision and revision != self.store_revision:    # another client made, changed or removed one
            self.store_revision = revision
            self.refresh_conversations()
        fp = _fingerprint(status)
        if fp and self.cid in self.infos and self.context_model != (self.cid, fp) and not self.busy():
            self.refresh_context()           # a model loaded (or another one) since the conversation opened

    def _say_resume(self, fingerprint: str | None) -> None:
        """Tell how the open conversation resumes, once the loaded model's fingerprint is known."""
        conv = self.infos.get(self.cid)
        if not fingerprint or self.resume_unsaid != self.cid or conv is None or self.busy():
            return
        self.resume_unsaid = None
        if fingerprint in conv.state_models:
            self.log_view.add(Notice("resumed from state, 0 tokens re-read", kind="ok"))
        else:
            self.log_view.add(Notice("This model has no saved state after the last turn: the turns it has not "
                                     "read are re-read on the next message (progress shows in the reply)."))

    def link_event(self, topic: str, event) -> None:
        from rwkv_chat.daemon.protocol import messages as m

        if topic != self.cid:
            return
        if isinstance(event, m.Started):
            if event.kind != "chat":
                return
            self.job = event.job_id
            if topic not in self.infos:          # a first message made the conversation: list it
                self.refresh_conversations()
            if self.pending is not None and self.bubble is not None:
                self.pending = None
                self.bubble.set_footer("…")
            elif self.bubble is None:     # another window's (or a script's) message
                self.log_view.add(UserMessage(event.message))
                self.start_bubble("generating (started elsewhere)…")
            self.bubble.job_id = event.job_id
        elif isinstance(event, m.Progress) and event.phase == "prefill":
            if self.bubble is not None:
                self.bubble.prefill(event.done, event.total, event.text)
        elif isinstance(event, m.Progress) and event.phase == "load":
            if self.bubble is not None:    # the model was unloaded (keep-alive, `rwkv-chat unload`): it loads again
                self.bubble.set_footer(f"loading the model again (it was unloaded): layer {event.done} of "
                                       f"{event.total}…")
        elif isinstance(event, m.Queued):
            if self.bubble is not None:    # waiting for a place (or yielded it for a while)
                self.bubble.set_footer(f"queued: position {event.position} of {event.queued}, "
                                       f"{queued_reason(event.active)}…")
        elif isinstance(event, m.Token):
            if self.bubble is None:        # joined in the middle of a reply
                self.start_bubble("generating (joined mid-reply)…")
                self.job = event.job_id
            if self.bubble.footer.startswith("queued:"):
                self.bubble.set_footer("…")
            self.bubble.append(event.text)
        elif isinstance(event, m.PromptReuse):
            self.last_reuse = event
        elif isinstance(event, m.Done):
            self.last_done = event
            mine = self.bubble is not None and self.bubble.mine
            self.end_generation(event.text, self._done_footer(event))
            self._say_reuse(event, mine)
            if event.tokens_per_s and event.reason != "cancelled":
                self.status_bar.set_speed(event.tokens_per_s)
            if event.context_limit:
                self.context_seq += 1        # newer than any context use asked for before
                self.status_bar.set_context(event.context_used, event.context_limit)
            self.refresh_conversations()
            self.sync()
        elif isinstance(event, m.Failed):
            if (event.kind == "NoModel" and self.action == "send" and self.pending is not None
                    and self.bubble is not None):
                self.unsend(self.pending)           # nothing was made: the message goes back to the input
                return
            bubble, action = self.bubble, self.action if (self.bubble is not None and self.bubble.mine) else ""
            self.end_generation(None, f"failed: {event.message}")
            if action == "send" and bubble is not None:
                self.mark_unsaved(bubble)
            else:                      # nothing changed in the store: show what is there
                self.notify(f"{action or 'generation'} failed: {event.message}", severity="error")
                self.sync()

    def _say_reuse(self, event, mine: bool) -> None:
        """After a reply this window asked for: how much of the prompt came from saved states (a regenerate or
        an edit reads nothing above the new branch; a preset's prompt comes from the shared cache)."""
        reuse = self.last_reuse
        if reuse is None or reuse.job_id != event.job_id:
            return
        parts = []
        if mine and self.action in ("regenerate", "edit"):
            parts.append(f"new branch from the saved state: {reuse.reread_tokens:,} tokens re-read")
        if reuse.cached_tokens:
            parts.append(f"{reuse.cached_tokens:,} tokens from cache")
        if reuse.draft_tokens:
            parts.append(f"{reuse.draft_tokens:,} tokens read while typing")
        if parts:
            self.notice(" · ".join(parts), "ok")

    def _done_footer(self, event) -> str:
        footer = self._footer(event.tokens, event.tokens_per_s, event.reason)
        if event.dropped_turns:
            footer += f" · context full: the {2 * event.dropped_turns} oldest turns were left out"
        return footer

    def _footer(self, tokens: int, tokens_per_s: float, reason: str) -> str:
        """A reply's footer, live (a Done event) or reopened (a stored turn): tokens, speed, why it ended."""
        parts = [f"{tokens} tokens"]
        if not self.app.snapshot and tokens_per_s:
            parts.append(f"{tokens_per_s:.1f} tok/s")
        why = {"length": "stopped at max tokens", "cancelled": STOPPED}.get(reason)
        if why:
            parts.append(why)
        return " · ".join(parts)

    # ---------------------------------------------------------------- opening a conversation
    def open_conversation(self, cid: str) -> None:
        if self.bubble is not None and self.cid != cid:
            self.end_generation(None, "(switched away; the reply continues in the daemon)")
        if self.cid != cid:
            self.status_bar.set_context(None, None)    # this conversation's comes with it
        self.cid = cid
        self.job = None
        self.app.watch_topic = cid
        self.query_one(Sidebar).highlight(cid)
        self.context_seq += 1
        self.context_model = (cid, _fingerprint(self.app.status))
        show_context = self.context_shower()

        def opened(detail) -> None:
            self._show_detail(detail)
            show_context(detail.context_used, detail.context_limit)

        self.app.request("open", lambda c: c.conversation(cid, context=True), opened)

    def context_shower(self):
        """``show(used, limit)``: shows the open conversation's context use in the status bar, unless another
        conversation was opened or a Done told a newer one since this was made."""
        cid, seq = self.cid, self.context_seq

        def show(used: int | None, limit: int | None) -> None:
            if self.cid == cid and self.context_seq == seq:
                self.status_bar.set_context(used, limit)
        return show

    def refresh_context(self) -> None:
        """Ask the daemon for the open conversation's context use on the loaded model; show it."""
        cid = self.cid
        self.context_model = (cid, _fingerprint(self.app.status))
        show = self.context_shower()
        self.app.request("context use", lambda c: c.context(cid), lambda got: show(*got))

    def _show_detail(self, detail, announce: bool = True) -> list[MessageBox]:
        """Draw the conversation ``detail`` (its last ``SHOWN_TURNS`` turns); returns the messages drawn."""
        conv = detail.conversation
        added: list[MessageBox] = []
        if conv.id != self.cid:
            return added
        self.infos[conv.id] = conv
        log = self.log_view
        log.clear()
        turns = detail.turns
        self.hidden_turns = max(0, len(turns) - SHOWN_TURNS)
        if self.hidden_turns:
            log.add(Notice(f"… {self.hidden_turns} earlier turns not shown (export shows all)"))
            turns = turns[-SHOWN_TURNS:]
        if conv.system_prompt:
            log.add(Notice("System prompt: " + conv.system_prompt.splitlines()[0][:200], kind="system"))
        for t in turns:
            if t.role == "user":
                w = UserMessage(t.text, turn=t.index, branch=t.branch, branches=t.branches)
            else:
                w = AssistantMessage(t.text, footer=self._turn_footer(t), turn=t.index, branch=t.branch,
                                     branches=t.branches, who=self._who(t.family) if t.family else self.assistant)
            log.add(w)
            added.append(w)
        if announce:
            self.input.use_history([t.text for t in detail.turns if t.role == "user"])
            self.resume_unsaid = conv.id if conv.turns else None
            self._say_resume((self.app.status.get("model") or {}).get("fingerprint"))
        self.query_one(SamplingPanel).show(conv.sampling)
        log.follow()
        return added

    def _turn_footer(self, turn) -> str:
        """The footer of a stored reply (its tokens, speed and why it ended, as when it was live)."""
        return self._footer(turn.tokens, turn.tokens_per_s, turn.reason)

    def sync(self, then=None) -> None:
        """Read the open conversation back from the daemon and show exactly what is stored (:meth:`_synced`);
        ``then()`` runs after that, if the conversation is still the open one."""
        cid = self.cid
        if cid is None:
            return

        def synced(detail) -> None:
            self._synced(detail)
            if then is not None and self.cid == cid:
                then()

        self.app.request("reload the conversation", lambda c: c.conversation(cid), synced)

    def _synced(self, detail) -> None:
        """Give the messages on screen the indices of their stored turns when they are the stored turns (a
        failed, unsaved message aside); else draw the stored conversation again."""
        conv = detail.conversation
        if conv.id != self.cid or self.busy():
            return
        self.infos[conv.id] = conv
        shown = [w for w in self.log_view.messages() if not getattr(w, "failed", False)]
        turns = detail.turns
        tail = turns[len(turns) - len(shown):] if len(shown) <= len(turns) else None
        if (tail is not None and len(turns) - len(shown) == self.hidden_turns
                and [(w.role, w.text) for w in shown] == [(t.role, t.text) for t in tail]):
            for w, t in zip(shown, tail):
                w.turn = t.index
                w.set_branches(t.branch, t.branches)
                if t.reason == "cancelled" and STOPPED not in w._footer:
                    w.set_footer(self._turn_footer(t))
            return
        self._show_detail(detail, announce=False)

    def mark_unsaved(self, bubble: AssistantMessage) -> None:
        """Mark a failed reply and the message it answered (neither stored) as such."""
        bubble.failed = True
        msgs = self.log_view.messages()
        if bubble in msgs:
            i = msgs.index(bubble)
            if i > 0 and msgs[i - 1].role == "user" and msgs[i - 1].turn is None:
                msgs[i - 1].failed = True
        bubble.set_footer(bubble._footer + " · not saved: Ctrl+R sends the message again")

    def refresh_conversations(self) -> None:
        def show(items) -> None:
            self.infos = {c.id: c for c in items}
            self.query_one(Sidebar).set_items(items, self.cid)

        self.app.request("list conversations", lambda c: c.conversations(), show)

    def on_paste(self, event: events.Paste) -> None:
        """A paste while a message or the sidebar has the focus goes into the message input."""
        event.stop()
        self.input.focus()
        self.input.post_message(events.Paste(event.text))

    @on(Sidebar.Selected)
    def _selected(self, event: Sidebar.Selected) -> None:
        if event.conversation_id != self.cid:
            self.open_conversation(event.conversation_id)
        self.focus_input()

    # ---------------------------------------------------------------- sending
    @on(PromptInput.Submitted)
    def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            self.notify("Empty message: nothing sent.", severity="warning", timeout=3)
            return
        if len(text) > MAX_MESSAGE_CHARS:
            self.notify(f"The message has {len(text):,} characters; the limit is {MAX_MESSAGE_CHARS:,}.",
                        severity="error")
            return
        if self.busy():
            self.notify("A reply is being generated: Esc stops it.", severity="warning", timeout=3)
            return
        if not self.app.connected:
            self.notify("Not connected to the daemon.", severity="error", timeout=3)
            return
        model = self.app.status.get("model") or {}
        if not model.get("loaded") and not model.get("loading"):
            self.no_model()                      # nothing is sent, nothing is made: the text stays
            return
        self.cancel_draft()
        self.input.remember(text)
        self.input.clear()
        if self.cid is None:  # a new conversation starts on a clean view (no empty-state hint above it)
            self.log_view.clear()
        self.log_view.add(UserMessage(text))
        self.log_view.follow()
        self.generate("send", lambda c, cid: self._chat_request(c, cid, "Chat", message=text), text)

    def generate(self, action: str, call, pending: str) -> None:
        """Start a generation: a streaming bubble now; ``call(client, cid)`` (a worker) sends the request once
        the link watches the conversation. With no conversation open, a new id is taken: the daemon makes the
        conversation (titled by the message) when the reply starts, and only then (no model: nothing made)."""
        from rwkv_chat.daemon.protocol import new_conversation_id

        self.resume_unsaid = None
        bubble = self.start_bubble("waiting for the daemon…")
        bubble.mine = True
        self.pending, self.action = pending, action
        if self.cid is None:
            self.cid = new_conversation_id()
            self.app.watch_topic = self.cid
        cid, app = self.cid, self.app

        def work(client):
            if not app.wait_watching(cid):
                raise TimeoutError("could not subscribe to the conversation's events")
            return call(client, cid)

        def failed(message: str) -> None:
            if self.bubble is bubble:
                self.end_generation(None, f"not sent: {message}")
                if action == "send":
                    self.mark_unsaved(bubble)
                else:                  # refused (e.g. the conversation changed): show what is stored
                    self.sync()

        self.app.request(action, work, None, failed)

    def no_model(self) -> None:
        """Say that a message cannot be answered without a model, and how to load one here."""
        text = (f"No model is loaded: press {LOAD_KEY} to load one, then send again "
                "(your message stays in the input).")
        last = self.log_view.query(Notice).last() if self.log_view.query(Notice) else None
        if last is None or str(last.render()) != text:
            self.notice(text, "error")
        self.notify(f"No model is loaded: press {LOAD_KEY} to load one.", severity="warning", timeout=4)

    def unsend(self, text: str) -> None:
        """The daemon refused a message for want of a model: take it off the screen, back into the input, and
        forget a conversation it would have made."""
        bubble = self.bubble
        self.bubble, self.job, self.pending = None, None, None
        msgs = self.log_view.messages()
        if bubble is not None:
            bubble.remove()
            if len(msgs) >= 2 and msgs[-2].role == "user" and msgs[-2].text == text:
                msgs[-2].remove()
        if self.cid not in self.infos:
            self.cid = None
            self.app.watch_topic = "~daemon"
        if not self.input.text.strip():
            self.input.load_text(text)
        self.no_model()

    def _adopt(self, info) -> None:
        self.cid = info.id
        self.infos[info.id] = info
        self.query_one(Sidebar).set_items(list(self.infos.values()), info.id)

    @staticmethod
    def _chat_request(client, cid: str, kind: str, **fields):
        from rwkv_chat.daemon.protocol import messages as m

        return client.request(getattr(m, kind)(client_id=client.client_id, conversation_id=cid, **fields))

    # ---------------------------------------------------------------- stop, copy
    def action_stop(self) -> None:
        if not self.busy() or self.cid is None:
            return
        cid = self.cid
        if self.bubble is not None:
            self.bubble.set_footer("stopping…")
        self.app.request("stop", lambda c: c.cancel(conversation_id=cid))

    def action_stop_or_copy(self) -> None:
        if self.busy():
            self.action_stop()
        elif self.input.has_focus and self.input.selected_text:
            self.app.copy_to_clipboard(self.input.selected_text)
        else:
            self.notify("Nothing to stop (Ctrl+Q quits).", timeout=2)

    @on(MessageBox.Copy)
    def _copy(self, event: MessageBox.Copy) -> None:
        self.app.copy_to_clipboard(event.text)
        self.notify(f"Copied {len(event.text):,} characters.", timeout=2)

    def action_copy_last(self) -> None:
        last = self.log_view.last("assistant")
        if last is None or not last.text:
            self.notify("No reply to copy.", timeout=2)
            return
        self._copy(MessageBox.Copy(last.text))

    @on(SamplingPanel.Applied)
    def _sampling_applied(self, event: SamplingPanel.Applied) -> None:
        self.apply_sampling(event.values)

    def action_switch_conversation(self, step: int) -> None:
        """Open the conversation ``step`` places below (1) or above (-1) the open one in the sidebar."""
        items = self.query_one(Sidebar).items
        if not items:
            return
        ids = [c.id for c in items]
        i = ids.index(self.cid) + step if self.cid in ids else (0 if step > 0 else len(ids) - 1)
        if 0 <= i < len(ids) and ids[i] != self.cid:
            self.open_conversation(ids[i])
        self.focus_input()

    def action_toggle_sidebar(self) -> None:
        sidebar = self.query_one(Sidebar)
        sidebar.display = not sidebar.display

    def action_toggle_sampling(self) -> None:
        panel = self.query_one(SamplingPanel)
        panel.display = not panel.display
        if panel.display:
            panel.query_one("Input").focus()
        else:
            self.focus_input()
