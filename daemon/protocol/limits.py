"""Limits and identifiers of the rwkv-chat daemon protocol (what every request field and outgoing frame is bounded
by; re-exported by :mod:`rwkv_chat.daemon.protocol.messages`).

Conversation ids match :data:`CONVERSATION_ID_RE` (no path separators, dots or spaces), checked by
:func:`check_conversation_id` before any path or query is built from one; topics match :data:`TOPIC_RE`.

Limits
------
Every outgoing frame is bounded by construction: a request's fields have the size limits below, checked by
:func:`check_request` before the daemon acts on a request (an ``Error`` of kind ``"LimitError"`` otherwise);
errors quote at most :data:`MAX_QUOTE` characters of what a client sent (:func:`quote`); events carry ids,
and text only in bounded pieces (``Token`` at most :data:`MAX_EVENT_TEXT` bytes, ``Done.text`` cut there
with ``truncated``); listings come in pages of bounded summaries (``ListConversations``), a conversation's
turns and an export in pages (``GetConversation.turn_offset``, ``Export.offset``).

========================  ==========================================================================
:data:`MAX_TEXT`          UTF-8 bytes of a chat message, an edited message or a system prompt; a chat
                          reply ends (reason "length") when it reaches this size
:data:`MAX_TITLE`         characters of a conversation title
:data:`MAX_STOPS`         stop strings of one ``Complete``; each 1 to :data:`MAX_STOP_CHARS` characters
:data:`MAX_PATH`          UTF-8 bytes of a model path; :data:`MAX_STRATEGY` characters of a strategy
:data:`MAX_ID`            characters of a client id, a job id, a probe nonce
:data:`MAX_PAGE`          conversation summaries per ``ListConversations`` page
:data:`MAX_MESSAGES`      messages of one ``ChatMessages`` request; each at most :data:`MAX_TEXT` bytes,
                          all together at most :data:`MAX_MESSAGES_TEXT` bytes
========================  ==========================================================================

The number of tokens a generation may produce (``max_tokens``) is bounded by the daemon's config
(``[daemon] max_tokens_limit``).
"""

from __future__ import annotations

import re
import secrets

DAEMON_TOPIC = "~daemon"
CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TOPIC_RE = re.compile(r"[A-Za-z0-9~][A-Za-z0-9_~-]{0,127}")

#: UTF-8 bytes of a chat message, an edited message or a system prompt; a chat reply stops at this size
MAX_TEXT = 1 << 20
#: characters of a conversation title
MAX_TITLE = 256
#: stop strings of one Complete request, and characters of each (at least 1)
MAX_STOPS = 16
MAX_STOP_CHARS = 1024
#: UTF-8 bytes of a model path; characters of a strategy
MAX_PATH = 4096
MAX_STRATEGY = 1024
#: characters of a client id, a job id or a probe nonce
MAX_ID = 64
#: conversation summaries per ListConversations page (a request's limit 0 means this many)
MAX_PAGE = 200
#: messages of one ChatMessages request, and UTF-8 bytes of their contents together (within one frame)
MAX_MESSAGES = 4096
MAX_MESSAGES_TEXT = 3 << 20
#: roles a ChatMessages message may have
MESSAGE_ROLES = ("system", "user", "assistant")
#: characters of the system prompt (and title) kept in a conversation summary of a listing
SUMMARY_CHARS = 200
#: UTF-8 bytes of text one event carries: a Token's text, a Done's text (cut there, ``truncated`` set),
#: a Started's message
MAX_EVENT_TEXT = MAX_TEXT
#: characters of a client's input quoted in an error message
MAX_QUOTE = 80
#: UTF-8 bytes of turn text in one ConversationDetail page (a page holds at least one turn)
TURN_PAGE_BYTES = 2 << 20
#: characters of export text in one ExportReply page
EXPORT_PAGE_CHARS = 256 * 1024


class LimitError(ValueError):
    """A request field is outside its documented bounds (see the module's Limits); the message names the
    field, its size and the limit."""


def quote(value, limit: int = MAX_QUOTE) -> str:
    """``repr`` of at most ``limit`` characters of ``value`` (a str, else its ``str``), with the full length
    when cut: safe to put in an error message whatever a client sent."""
    s = value if isinstance(value, str) else str(value)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}… ({len(s):,} characters)"


def clip_bytes(text: str, limit: int) -> tuple[str, bool]:
    """``(text, False)`` if its UTF-8 encoding has at most ``limit`` bytes, else ``(its longest prefix that
    does, True)``. O(len(text))."""
    if len(text) * 4 <= limit:
        return text, False
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", "ignore"), True


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8 (lone surrogates count 3)."""
    return len(text.encode("utf-8", "surrogatepass"))


class InvalidId(ValueError):
    """A conversation id does not match ``[A-Za-z0-9][A-Za-z0-9_-]{0,63}``."""


def check_conversation_id(cid: str) -> str:
    """Return ``cid`` if it is a valid conversation id, else raise :class:`InvalidId`."""
    if not isinstance(cid, str) or not CONVERSATION_ID_RE.fullmatch(cid):
        raise InvalidId(f"invalid conversation id {quote(cid)}: use 1-64 of A-Z a-z 0-9 _ - (starting alphanumeric)")
    return cid


def new_conversation_id() -> str:
    """A fresh random conversation id."""
    return "c" + secrets.token_hex(6)


def check_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid event topic, else raise ValueError."""
    if not isinstance(topic, str) or not TOPIC_RE.fullmatch(topic):
        raise ValueError(f"invalid topic {quote(topic)}")
    return topic
