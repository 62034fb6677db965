"""Sending the draft of a message while it is typed (a mixin of :class:`ChatScreen`): after
:data:`DRAFT_DELAY` seconds without a change, the input's text goes to the daemon (``Client.draft``), which
reads it ahead at low priority; Enter then reads only what was typed since. Only for a conversation the daemon
has made, with nothing generating, and when ``[daemon] draft_prefill`` is on.
"""

from __future__ import annotations

from rwkv_chat.daemon.config import ConfigError, load_config

#: seconds without a change before the draft is sent
DRAFT_DELAY = 0.3
#: UTF-8 bytes of the longest draft sent (a request's text limit)
DRAFT_MAX_BYTES = 64 * 1024


class DraftSender:
    """Mixin: needs ``cid``, ``infos``, ``busy()``, ``input`` and the app's ``request``."""

    _draft_timer = None
    _draft_sent = ""
    _drafts_on: bool | None = None

    def drafts_on(self) -> bool:
        if self._drafts_on is None:
            try:
                self._drafts_on = load_config(self.app.paths.config_file).daemon.draft_prefill
            except ConfigError:
                self._drafts_on = False
        return self._drafts_on

    def on_text_area_changed(self, event) -> None:
        if getattr(event.text_area, "id", None) != "input" or not self.drafts_on():
            return
        if self._draft_timer is not None:
            self._draft_timer.stop()
        self._draft_timer = self.set_timer(DRAFT_DELAY, self._send_draft)

    def _send_draft(self) -> None:
        self._draft_timer = None
        cid, text = self.cid, self.input.text
        if (cid is None or cid not in self.infos or self.busy() or not self.app.connected
                or text == self._draft_sent or len(text.encode("utf-8", "surrogatepass")) > DRAFT_MAX_BYTES):
            return
        self._draft_sent = text
        self.app.request("draft", lambda c: c.draft(cid, text))

    def cancel_draft(self) -> None:
        """The message was sent (or the conversation changed): no draft of it goes out any more."""
        if self._draft_timer is not None:
            self._draft_timer.stop()
            self._draft_timer = None
        self._draft_sent = ""
