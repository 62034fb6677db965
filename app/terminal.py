"""Terminal input of the UI: pasted text stays text.

Terminals wrap a paste in ``ESC [200~`` … ``ESC [201~`` (bracketed paste), and Textual turns what lies between
into one ``Paste`` event. But an escape character *inside* the paste (text copied from a terminal with
colours, a log with ANSI sequences) throws Textual's parser (8.x) off: it reads on as an escape sequence,
gives up, and replays what it read as key presses — so a pasted ``\\x0c`` became Ctrl+L (the load screen)
and the rest landed in the input in pieces and out of order.

:class:`PasteSafeParser` removes escape sequences from inside a paste before Textual's parser sees them
(only the closing ``ESC [201~`` stays), so the whole paste arrives as one ``Paste`` event, which the input
cleans of control characters (:func:`rwkv_chat.app.widgets.prompt_input.clean_text`). Input outside a paste
passes through unchanged and undelayed. :func:`install` makes the terminal drivers use it.
"""

from __future__ import annotations

import re

from textual._xterm_parser import XTermParser

PASTE_START = "\x1b[200~"
PASTE_END = "\x1b[201~"
# an escape sequence (CSI with parameters and final byte, OSC up to BEL or ST, or ESC + one character), or a
# lone ESC at the very end
_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[^\[\]])|\x1b$", re.S)
_INCOMPLETE_CSI = re.compile(r"\x1b\[[0-?]*[ -/]*\Z")
_INCOMPLETE_OSC = re.compile(r"\x1b\][^\x07\x1b]*\Z")


def _strip(text: str) -> str:
    """``text`` (inside a paste) without escape sequences."""
    return _SEQUENCE.sub("", text).replace("\x1b", "")


def _incomplete(tail: str) -> bool:
    """Whether ``tail`` (starting with ESC, at the end of what arrived) may continue in the next read."""
    return (PASTE_END.startswith(tail) or tail == "\x1b" or bool(_INCOMPLETE_CSI.match(tail))
            or bool(_INCOMPLETE_OSC.match(tail)))


def _marker_prefix(text: str, marker: str) -> str:
    """The longest end of ``text`` that begins ``marker`` (without being all of it)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return text[-n:]
    return ""


class PasteSafeParser(XTermParser):
    """Textual's terminal parser, fed pastes without escape sequences (see the module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._in_paste = False
        self._held = ""      # inside a paste: an escape sequence (or the end marker) cut by the read
        self._tail = ""      # outside a paste: the end of the last read, if it may begin PASTE_START

    def feed(self, data: str):
        if not data:
            return super().feed(data)       # end of input
        return super().feed(self.filter(data))

    def filter(self, data: str) -> str:
        """``data`` (one read from the terminal) with the escape sequences inside pastes removed."""
        out: list[str] = []
        text = data
        while text:
            if not self._in_paste:
                probe = self._tail + text
                i = probe.find(PASTE_START)
                if i < 0:
                    out.append(text)
                    self._tail = _marker_prefix(probe, PASTE_START)
                    break
                end = i + len(PASTE_START) - len(self._tail)
                out.append(text[:end])
                text, self._tail, self._in_paste = text[end:], "", True
            else:
                body, self._held = self._held + text, ""
                j = body.find(PASTE_END)
                if j < 0:
                    k = body.rfind("\x1b")
                    if k >= 0 and _incomplete(body[k:]):
                        body, self._held = body[:k], body[k:]
                    out.append(_strip(body))
                    break
                out.append(_strip(body[:j]) + PASTE_END)
                text, self._in_paste = body[j + len(PASTE_END):], False
        return "".join(out)


def install() -> None:
    """Make Textual's Linux/macOS drivers read the terminal with :class:`PasteSafeParser` (this process)."""
    from textual.drivers import linux_driver

    linux_driver.XTermParser = PasteSafeParser
    try:
        from textual.drivers import linux_inline_driver
    except ImportError:        # pragma: no cover — not in every Textual
        return
    linux_inline_driver.XTermParser = PasteSafeParser
