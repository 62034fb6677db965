"""Checking a request against the protocol's size limits (:mod:`.limits`) before anything acts on it."""

from __future__ import annotations

from .base import Msg
from .limits import (MAX_ID, MAX_MESSAGES, MAX_MESSAGES_TEXT, MAX_PAGE, MAX_PATH, MAX_STOP_CHARS, MAX_STOPS,
                     MAX_STRATEGY, MAX_TEXT, MAX_TITLE, MESSAGE_ROLES, LimitError, quote, utf8_len)
from .requests import (Chat, ChatMessage, ChatMessages, Complete, CreateConversation, Draft, EditLastUser,
                       ListConversations, Load, RenameConversation, SetSystemPrompt)


def _limit(field: str, size: int, limit: int, unit: str) -> None:
    if size > limit:
        raise LimitError(f"{field} has {size:,} {unit}; the limit is {limit:,}")


def _check_messages(messages: list[ChatMessage]) -> None:
    """The limits of a ChatMessages request's ``messages`` (count, bytes each and together, roles)."""
    if not messages:
        raise LimitError("messages is empty: give at least one user message")
    _limit("messages", len(messages), MAX_MESSAGES, "messages")
    total = 0
    for i, msg in enumerate(messages):
        if msg.role not in MESSAGE_ROLES:
            raise LimitError(f"messages[{i}].role is {quote(msg.role, 20)}: use one of {', '.join(MESSAGE_ROLES)}")
        n = utf8_len(msg.content)
        _limit(f"messages[{i}].content", n, MAX_TEXT, "bytes")
        total += n
    _limit("messages (all contents together)", total, MAX_MESSAGES_TEXT, "bytes")
    if messages[-1].role != "user":
        raise LimitError(f"the last message is from the {messages[-1].role}: end with a user message")


def check_request(msg: Msg) -> Msg:
    """Return ``msg`` if every field is within the limits of :mod:`.limits`, else raise
    :class:`LimitError` naming the field, its size and the limit (sizes in UTF-8 bytes for texts and paths,
    characters for titles, ids, strategies and stop strings; offsets must be >= 0)."""
    for field in ("client_id", "job_id", "nonce"):
        v = getattr(msg, field, None)
        if isinstance(v, str):
            _limit(field, len(v), MAX_ID, "characters")
    texts = {Chat: ("message", "message"), EditLastUser: ("text", "message"), Draft: ("text", "draft"),
             SetSystemPrompt: ("text", "system prompt"), CreateConversation: ("system_prompt", "system prompt")}
    if type(msg) in texts:
        attr, name = texts[type(msg)]
        _limit(name, utf8_len(getattr(msg, attr)), MAX_TEXT, "bytes")
    if isinstance(msg, (CreateConversation, RenameConversation)):
        _limit("title", len(msg.title), MAX_TITLE, "characters")
    if isinstance(msg, Load):
        _limit("path", utf8_len(msg.path), MAX_PATH, "bytes")
        _limit("strategy", len(msg.strategy), MAX_STRATEGY, "characters")
    if isinstance(msg, ChatMessages):
        _check_messages(msg.messages)
    if isinstance(msg, (Complete, ChatMessages)):
        _limit("stop", len(msg.stop), MAX_STOPS, "strings")
        for s in msg.stop:
            if not s:
                raise LimitError("stop strings must not be empty")
            _limit("a stop string", len(s), MAX_STOP_CHARS, "characters")
    for field in ("offset", "limit", "turn_offset"):
        v = getattr(msg, field, None)
        if isinstance(v, int) and v < 0:
            raise LimitError(f"{field} must be >= 0, got {v}")
    if isinstance(msg, ListConversations):
        _limit("limit", msg.limit, MAX_PAGE, "conversations")
    return msg
