"""Events of the rwkv-chat daemon protocol (daemon -> clients over the PUB socket, topic = conversation id or a
job topic; heartbeats use :data:`.limits.DAEMON_TOPIC`) and :data:`Event`, their tagged union.
"""

from __future__ import annotations

from typing import Union

from .base import Msg


class ProbeAck(Msg):
    nonce: str


class Heartbeat(Msg):
    pid: int
    uptime: float
    active: int


class Queued(Msg):
    """A job waits for a place (a generation also when it yielded its place for a while: ``[daemon]
    time_slice``). ``position``: 1 = next to run; ``queued``: jobs waiting in all; ``active``: generations
    running; ``waited``: seconds in the queue so far. Sent when the job is queued, when its position changes,
    and at least every second while it waits."""

    job_id: str
    position: int
    queued: int
    active: int
    waited: float


class Started(Msg):
    """A job started (a watcher learns the user's message, if any). ``cached_tokens``: of a ``ChatMessages``
    request, the prompt tokens taken from the prefix cache (the rest is read now)."""

    job_id: str
    kind: str
    conversation_id: str = ""
    message: str = ""
    cached_tokens: int = 0


class Progress(Msg):
    """``phase`` "load" or "prefill"; ``done`` of ``total`` (tokens for prefill, steps for load). ``text``: for
    a load the path; for a prefill that re-reads a conversation's history, why (no saved state for this model,
    an unreadable state file), else ""."""

    job_id: str
    phase: str
    done: int
    total: int
    text: str = ""


class Token(Msg):
    job_id: str
    seq: int
    text: str


class Done(Msg, omit_defaults=True):
    """A job ended. ``reason``: "stop", "length", "cancelled" (a chat reply stopped so is kept as far as it got);
    rates in tokens per second.

    ``text`` is the whole text (a chat reply stripped) when it fits in :data:`MAX_EVENT_TEXT` bytes; else its
    start, with ``truncated`` set: the job's Token events carry all of it (the client library joins them).

    ``cached_tokens``: of the ``prompt_tokens``, those a ``ChatMessages`` request took from the prefix cache
    instead of reading them (0 for other requests); the prefill read ``prompt_tokens - cached_tokens``.

    Where the model has a context limit (tokens; ``context_limit``, else None): ``context_used``, the tokens the
    conversation's state holds after this reply (None when no state was kept), and ``dropped_turns``, the
    oldest exchanges left out of the model's view to fit (``[model] context_policy = "truncate"``). Fields at
    their defaults are left out of the frame, so a client that predates these fields reads the Done of a model
    without a context limit."""

    job_id: str
    reason: str
    text: str
    prompt_tokens: int
    tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    truncated: bool = False
    cached_tokens: int = 0
    context_used: int | None = None
    context_limit: int | None = None
    dropped_turns: int = 0
    # never sent (a client that knows none of them reads the Done): the client library fills them from the
    # job's PromptReuse event
    reread_tokens: int = 0
    draft_tokens: int = 0


class PromptReuse(Msg):
    """How a chat's prompt was read, sent just before its Done: of the Done's ``prompt_tokens``,
    ``reread_tokens`` were the conversation's earlier turns read again (no saved state for them on this
    model: 0 for a branch, which starts from the saved state before it), ``draft_tokens`` were read ahead
    while the message was typed; ``cached_tokens`` were not read at all (their state came from the shared
    prompt cache). A client that does not know this event drops it."""

    job_id: str
    reread_tokens: int = 0
    cached_tokens: int = 0
    draft_tokens: int = 0


class Failed(Msg):
    job_id: str
    kind: str
    message: str


Event = Union[ProbeAck, Heartbeat, Queued, Started, Progress, Token, Done, Failed, PromptReuse]
