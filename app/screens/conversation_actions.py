"""Conversation actions of the chat screen (a mixin of :class:`ChatScreen`): new, rename, delete,
regenerate, edit a message, switch branches, system prompt, export, sampling settings.

Regenerate and edit act on the reply / message shown last (Ctrl+R, F3), or on the one focused (``r`` on a
reply, ``e`` on a message), by the index of its stored turn: the daemon adds the new reply or message as
another branch beside it, from the state saved before it (nothing above is read again), and keeps the
original. On a message whose generation failed (not stored) they send it again. Pressed while a reply that
just ended is being read back (its turn index not known yet), they run once the view has it.

A message with siblings shows ``‹ 2/3 ›``; ←/→ on it, a click on an arrow, or Alt+←/→ (the last such
message) shows another branch: the daemon chooses it and the view shows its path. Delete on it deletes the
branch shown (asked first); the others stay.
"""

from __future__ import annotations

import re
import time

from ..widgets.chat_log import UserMessage
from ..widgets.sidebar import title_of
from .dialogs import PRESETS, Confirm, ExportChoice, TextEditor, TextPrompt


def export_path(data_dir, title: str, cid: str, fmt: str):
    """``<data dir>/exports/<title-slug>-<id>.<md|json>``."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:40] or "conversation"
    return data_dir / "exports" / f"{slug}-{cid}.{fmt}"


class ConversationActions:
    """Mixin: needs ``cid``, ``infos``, ``busy()``, ``generate()``, ``open_conversation()``, ``notice()``,
    ``context_shower()``."""

    def _need_idle(self) -> bool:
        if self.busy():
            self.notify("A reply is being generated: Esc stops it first.", severity="warning", timeout=3)
            return False
        return True

    def _open_known(self) -> str | None:
        """The open conversation's id when the daemon has made it (a first message makes it only when its
        reply starts), else None, said to the user."""
        if self.cid is None:
            return None
        if self.cid not in self.infos:
            self.notify("This conversation is made when its first reply starts: a moment.", timeout=3)
            return None
        return self.cid

    def action_new_conversation(self) -> None:
        def opened(info) -> None:
            self.infos[info.id] = info
            self.query_one("Sidebar").set_items(list(self.infos.values()), info.id)
            self.open_conversation(info.id)
            self.focus_input()

        self.app.request("new conversation", lambda c: c.create_conversation(), opened)

    def action_rename(self) -> None:
        cid = self._open_known()
        if cid is None:
            return

        def renamed(title) -> None:
            if title:
                self.app.request("rename", lambda c: c.rename(cid, title), lambda _: self.refresh_conversations())

        self.app.push_screen(TextPrompt("Rename the conversation", title_of(self.infos[cid])), renamed)

    def action_delete(self) -> None:
        cid = self._open_known()
        if cid is None:
            return

        def gone(_=None) -> None:
            self.infos.pop(cid, None)
            rest = sorted(self.infos.values(), key=lambda c: (-c.updated, c.id))
            self.query_one("Sidebar").set_items(rest, rest[0].id if rest else None)
            if self.bubble is not None:
                self.end_generation(None, "(conversation deleted)")
            if rest:
                self.open_conversation(rest[0].id)
            else:
                self.cid = None
                self.app.watch_topic = "~daemon"
                self.log_view.clear()
                self.notice("No conversations: type a message and press Enter to start one.")

        def answer(yes) -> None:
            if yes:
                self.app.request("delete", lambda c: c.delete(cid), gone)

        self.app.push_screen(Confirm(f"Delete “{title_of(self.infos[cid])}” and its saved state?"), answer)

    def _saving(self, widget, retry=None) -> bool:
        """Whether ``widget`` is not yet known as a stored turn (its reply just ended, the view not yet read
        back): the view is synced, then ``retry()`` (the action again) runs; without one, the user is told."""
        if widget.turn is None and not widget.failed:
            if retry is None:
                self.notify("The conversation is being saved: try again in a moment.", timeout=2)
            self.sync(then=retry)
            return True
        return False

    def _send_again(self, user, text: str) -> None:
        """Replace the unsaved (failed) message ``user`` and what follows it by ``text``, sent as a new message."""
        if user in self.log_view.children:
            self.log_view.remove_from(user)
        self.log_view.add(UserMessage(text))
        self.generate("send", lambda c, cid: self._chat_request(c, cid, "Chat", message=text), text)

    def action_regenerate(self, retry: bool = True, last=None) -> None:
        last = last or self.log_view.last("assistant")
        if self.cid is None or last is None:
            self.notify("No reply to regenerate.", timeout=2)
            return
        if not self._need_idle() or self._saving(last, (lambda: self.action_regenerate(False, last)) if retry else None):
            return
        if last.failed:
            user = self.log_view.last("user")
            if user is not None and user.failed:
                self._send_again(user, user.text)
            return
        turn = last.turn
        self.log_view.remove_from(last)
        self.focus_input()           # `r` on a reply: it is gone; what is typed next goes to the input
        self.generate("regenerate", lambda c, cid: self._chat_request(c, cid, "Regenerate", turn=turn), "")

    def action_edit_last(self, retry: bool = True, user=None) -> None:
        user = user or self.log_view.last("user")
        if self.cid is None or user is None or not self._need_idle():
            return
        if self._saving(user, (lambda: self.action_edit_last(False, user)) if retry else None):
            return

        def edited(text) -> None:
            if text is None or not text.strip() or text == user.text:
                return
            if not user.is_attached or self.busy():       # the view changed meanwhile (a reply, a reload)
                self.notify("The conversation changed: press F3 again.", severity="warning", timeout=3)
                return
            if user.failed:
                self._send_again(user, text)
                return
            turn = user.turn
            self.log_view.remove_from(user)
            self.focus_input()       # `e` on a message: it is gone; what is typed next goes to the input
            self.log_view.add(UserMessage(text))
            self.generate("edit", lambda c, cid: self._chat_request(c, cid, "EditLastUser", text=text, turn=turn),
                          text)

        self.app.push_screen(TextEditor("Edit the message (the original stays, as another branch)", user.text),
                             edited)

    def on_message_box_redo(self, event) -> None:
        """``r`` on a reply / ``e`` on a message: regenerate it / edit it (a new branch beside it)."""
        event.stop()
        if event.box.role == "assistant":
            self.action_regenerate(last=event.box)
        else:
            self.action_edit_last(user=event.box)

    def on_message_box_branch(self, event) -> None:
        """Show the branch ``event.step`` places from the message's: the daemon chooses it (its saved states
        are kept: nothing is read again when the conversation goes on there)."""
        event.stop()
        box, cid = event.box, self.cid
        if cid is None or box.turn is None or not self._need_idle():
            return
        msgs = self.log_view.messages()
        depth = msgs.index(box) + self.hidden_turns if box in msgs else -1     # its place in the path
        focused = box.has_focus
        show_context = self.context_shower()

        def shown(detail) -> None:
            if self.cid != cid or self.busy():
                return
            now = self._show_detail(detail, announce=False)
            show_context(detail.context_used, detail.context_limit)
            i = depth - self.hidden_turns                 # the sibling shown now, at the same place
            if depth >= 0 and 0 <= i < len(now):
                now[i].focus_when_mounted = focused       # ←/→ on a message: on the sibling shown
                self.notify(f"branch {now[i].branch + 1}/{now[i].branches} · 0 tokens re-read", timeout=2)

        self.app.request("switch branch", lambda c: c.switch_branch(cid, box.turn, event.step, context=True), shown)

    def on_message_box_delete_branch(self, event) -> None:
        """Delete on a message with siblings: delete its branch (it, what follows it and their saved states),
        asked first; the view shows the branch chosen then."""
        event.stop()
        box, cid = event.box, self.cid
        if cid is None or box.turn is None or not self._need_idle():
            return
        turn = box.turn

        def answer(yes) -> None:
            if yes and self.cid == cid and not self.busy():
                show_context = self.context_shower()

                def shown(detail) -> None:
                    self._show_detail(detail, announce=False)
                    show_context(detail.context_used, detail.context_limit)

                self.app.request("delete branch", lambda c: c.delete_branch(cid, turn, context=True), shown)

        self.app.push_screen(Confirm(f"Delete this branch ({box.branch + 1} of {box.branches}) and what follows "
                                     "it? The other branches stay."), answer)

    def action_branch_last(self, step: int) -> None:
        """Alt+←/→: another branch at the last message that has siblings."""
        boxes = [w for w in self.log_view.messages() if w.branches > 1 and w.turn is not None]
        if not boxes:
            self.notify("No other branch here: regenerate a reply or edit a message to make one.", timeout=2)
            return
        boxes[-1].action_branch(step)

    def action_system_prompt(self) -> None:
        cid = self.cid
        if cid is not None and self._open_known() is None:
            return
        info = self.infos.get(cid) if cid is not None else None
        if info is not None and info.truncated:      # a listing's summary: edit the whole prompt
            self.app.request("system prompt", lambda c: c.conversation(cid).conversation.system_prompt,
                             lambda text: self._edit_system_prompt(cid, text))
            return
        self._edit_system_prompt(cid, info.system_prompt if info is not None else "")

    def _edit_system_prompt(self, cid, current: str) -> None:
        def saved(text) -> None:
            if text is None or text == current:
                return
            if cid is None:
                self.app.request("new conversation", lambda c: c.create_conversation(system_prompt=text),
                                 lambda info: (self._adopt(info), self.open_conversation(info.id)))
                return
            reread = " The history will be re-read with it on the next message." if self.infos[cid].turns else ""
            self.app.request("system prompt", lambda c: c.set_system_prompt(cid, text),
                             lambda _: (self.notice("System prompt set." + reread), self.refresh_conversations()))

        self.app.push_screen(TextEditor("System prompt of this conversation", current, PRESETS), saved)

    def action_export(self) -> None:
        cid = self._open_known()
        if cid is None:
            return
        info = self.infos.get(cid)
        title = title_of(info) if info else "conversation"
        data_dir = self.app.paths.data_dir

        def write(client, fmt):
            text = client.export(cid, fmt)
            path = export_path(data_dir, title, cid, fmt)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{time.monotonic_ns()}")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(path)
            return path

        def done(path) -> None:
            shown = path.name if self.app.snapshot else str(path)
            self.notice(f"Exported to {shown}", "ok")
            self.notify(f"Exported to {shown}", timeout=6)

        def chosen(fmt) -> None:
            if fmt:
                self.app.request("export", lambda c: write(c, fmt), done)

        self.app.push_screen(ExportChoice(), chosen)

    def apply_sampling(self, values: dict) -> None:
        """Save ``values`` (from the sampling panel) as the open conversation's settings."""
        values = {k: v for k, v in values.items() if v is not None}
        cid = self.cid
        if cid is not None and self._open_known() is None:
            return

        def saved(_) -> None:
            self.notify("Sampling settings saved for this conversation.", timeout=3)
            self.refresh_conversations()

        if cid is None:
            self.app.request("new conversation", lambda c: c.create_conversation(**values),
                             lambda info: (self._adopt(info), self.open_conversation(info.id), saved(None)))
        else:
            self.app.request("sampling", lambda c: c.set_sampling(cid, **values), saved)
