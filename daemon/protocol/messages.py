"""Message types of the rwkv-chat daemon protocol (msgspec structs, one per message, tagged union).

Only :mod:`rwkv_chat.daemon.protocol.codec` turns these into frames and back. The tag field ``t`` holds
the class name. Requests go client -> daemon over the ROUTER socket and get exactly one reply;
events go daemon -> clients over the PUB socket with topic = conversation id (or a job topic).
Heartbeat events use the topic :data:`DAEMON_TOPIC`.

Sampling settings travel as :data:`SamplingSettings`: fields of the engine's one sampling settings type
(``rwkv_chat.models.text.sampling.SamplerArgs``) by name, where a missing or None field falls back to the
conversation's setting, then to the config's ``[sampling]`` section, then to that type's defaults.

Conversation ids, topics and the size limits of every request field and outgoing frame: :mod:`.limits`.
"""

from __future__ import annotations

from typing import Union

import msgspec

from .limits import (  # noqa: F401  (the limits and ids, re-exported)
    DAEMON_TOPIC, CONVERSATION_ID_RE, TOPIC_RE, MAX_TEXT, MAX_TITLE, MAX_STOPS, MAX_STOP_CHARS, MAX_PATH,
    MAX_STRATEGY, MAX_ID, MAX_PAGE, MAX_MESSAGES, MAX_MESSAGES_TEXT, MESSAGE_ROLES, SUMMARY_CHARS, MAX_EVENT_TEXT,
    MAX_QUOTE, TURN_PAGE_BYTES, EXPORT_PAGE_CHARS, LimitError, quote, clip_bytes, utf8_len, InvalidId,
    check_conversation_id, new_conversation_id, check_topic)


#: sampling settings by name (``temperature``, ``top_p``, ``top_k``, ``alpha_frequency``, ``alpha_presence``,
#: ``alpha_decay``, ``max_tokens``, ``seed``); None or missing = not given here
SamplingSettings = dict[str, Union[int, float, None]]


class Msg(msgspec.Struct, tag_field="t", tag=True, forbid_unknown_fields=True):
    """Base of every message."""


class TensorMeta(msgspec.Struct, forbid_unknown_fields=True):
    """Describes one raw frame carrying a tensor: name, dtype (torch name, e.g. "float32"), shape."""

    name: str
    dtype: str
    shape: list[int]


# ---------------------------------------------------------------- requests (client -> daemon)
class Ping(Msg):
    client_id: str


class Status(Msg):
    client_id: str = ""


class Probe(Msg):
    """Ask the daemon to publish a ProbeAck on ``topic`` (confirms a subscription is live)."""

    topic: str
    nonce: str


class Load(Msg):
    client_id: str
    topic: str
    path: str
    strategy: str
    save_default: bool = False


class Unload(Msg):
    """Unload the model now (after the generations in flight, like a Load): its memory is freed and the next
    request that needs it loads it again. Events: Started, Done(reason="unloaded"; ``text`` "no model was
    loaded" when none was)."""

    client_id: str
    topic: str


class Complete(Msg):
    client_id: str
    topic: str
    prompt: str
    sampling: SamplingSettings = {}
    stop: list[str] = []


class Chat(Msg):
    client_id: str
    conversation_id: str
    message: str
    sampling: SamplingSettings = {}


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    """One message of a :class:`ChatMessages` request: ``role`` one of :data:`MESSAGE_ROLES`."""

    role: str
    content: str


class ChatMessages(Msg):
    """A stateless chat completion: ``messages`` (system, user and assistant messages, ending with a user
    message) rendered with the model's chat template, and the reply to the last one. No conversation is stored;
    the daemon's prefix cache (``[daemon] prefix_cache_bytes``) keeps states after token prefixes, so a request
    that repeats an earlier one's messages prefills only what is new (``Done.cached_tokens``). ``stop``: stop
    strings besides the template's (as for ``Complete``). Events as for ``Complete`` (topic ``topic``)."""

    client_id: str
    topic: str
    messages: list[ChatMessage]
    sampling: SamplingSettings = {}
    stop: list[str] = []


class Regenerate(Msg):
    """A new reply to the message of the reply ``turn`` (-1: the last reply of the chosen path), added beside
    it as another branch and chosen; it starts from the state saved before that message (nothing above it is
    read again). Kind "Conflict" when ``turn`` is not a reply of the conversation."""

    client_id: str
    conversation_id: str
    sampling: SamplingSettings = {}
    turn: int = -1


class EditLastUser(Msg):
    """An edited user message ``text`` in place of the message ``turn`` (-1: the last of the chosen path),
    added beside it as another branch (the original stays) with a new reply, and chosen. Kind "Conflict" when
    ``turn`` is not a user message of the conversation."""

    client_id: str
    conversation_id: str
    text: str
    sampling: SamplingSettings = {}
    turn: int = -1


class Draft(Msg):
    """The draft of the next message of a conversation as it is typed ("" when cleared): the daemon may read
    it ahead, at low priority, so that a Chat with that message reads only what was not read yet
    (``[daemon] draft_prefill``). Reply: Ok (also when drafts are off)."""

    client_id: str
    conversation_id: str
    text: str = ""


class Cancel(Msg):
    job_id: str = ""
    conversation_id: str = ""


class ListConversations(Msg):
    """A page of conversation summaries, most recently updated first: ``limit`` of them (1 to
    :data:`MAX_PAGE`; 0 = :data:`MAX_PAGE`) from the ``offset``-th."""

    offset: int = 0
    limit: int = 0


class GetConversation(Msg):
    """A conversation and a page of its turns: from the turn with index ``turn_offset``, as many as fit in
    :data:`TURN_PAGE_BYTES` of text (at least one)."""

    conversation_id: str
    turn_offset: int = 0
    branches: bool = False        # each turn with its place in the tree (parent, branch, branches)


class FindConversation(Msg):
    """Conversations that ``query`` names, best kind of match first: the one whose id it is; else those with
    that exact title; else those whose id starts with it (at most ``limit``). Reply: ConversationList."""

    query: str
    limit: int = 10


class CreateConversation(Msg):
    conversation_id: str = ""
    title: str = ""
    system_prompt: str = ""
    sampling: SamplingSettings = {}


class RenameConversation(Msg):
    conversation_id: str
    title: str


class DeleteConversation(Msg):
    conversation_id: str


class SetSystemPrompt(Msg):
    conversation_id: str
    text: str


class SetSampling(Msg):
    """Merge ``sampling`` into the conversation's settings (a None value leaves a setting as it is)."""

    conversation_id: str
    sampling: SamplingSettings


class Export(Msg):
    """A page of a conversation's export: :data:`EXPORT_PAGE_CHARS` characters from the ``offset``-th."""

    conversation_id: str
    fmt: str = "md"
    offset: int = 0
    branches: str = ""            # "all" (every branch), "current" (the chosen path); "": json all, md current


class ListBranches(Msg):
    """A page of the whole tree of a conversation's turns (every branch), by index from ``offset``: texts cut
    to :data:`SUMMARY_CHARS` characters. Reply: BranchList."""

    conversation_id: str
    offset: int = 0


class SwitchBranch(Msg):
    """Choose the sibling ``step`` places after (negative: before) the turn ``turn`` (0: that turn; clamped to
    the first and last) and the newest path below it. Reply: ConversationDetail of the new path."""

    conversation_id: str
    turn: int
    step: int = 0


class DeleteBranch(Msg):
    """Delete the turn ``turn`` and every turn below it, with their saved states (a reply that is its
    message's only one takes that message along); the rest is kept. Reply: ConversationDetail."""

    conversation_id: str
    turn: int


class GetState(Msg):
    """Ask for a conversation's saved state; the reply carries tensors as raw frames."""

    conversation_id: str


class Shutdown(Msg):
    pass


Request = Union[
    Ping, Status, Probe, Load, Unload, Complete, Chat, Regenerate, EditLastUser, Cancel, ListConversations,
    GetConversation, FindConversation, CreateConversation, RenameConversation, DeleteConversation, SetSystemPrompt,
    SetSampling, Export, GetState, Shutdown, ChatMessages, ListBranches, SwitchBranch, DeleteBranch, Draft,
]


# ---------------------------------------------------------------- replies (daemon -> client)
class Ok(Msg):
    pass


class Pong(Msg):
    pid: int
    uptime: float


class Accepted(Msg):
    job_id: str
    topic: str
    queued: int = 0


class Busy(Msg):
    """The generation queue is full (``queued`` >= ``limit``); try again later."""

    reason: str
    queued: int
    limit: int


class Error(Msg):
    """A typed failure: ``kind`` names the error class (e.g. "StateError", "NotFound", "NoModel", "OOM")."""

    kind: str
    message: str


class StatusReply(Msg):
    pid: int
    version: str
    protocol: int
    uptime: float
    model: dict
    memory: dict
    devices: list[str]
    active: list[dict]
    queued: int
    clients: int
    home: dict
    prefix_cache: dict = {}       # the prefix cache of ChatMessages: entries, bytes, budget, hits, misses, tokens


class ConversationInfo(msgspec.Struct, forbid_unknown_fields=True):
    """A conversation as the store keeps it (``sampling``: its own settings, over the config's).

    In a listing it is a summary: ``title`` and ``system_prompt`` cut to :data:`SUMMARY_CHARS` characters,
    ``truncated`` set when they were (``GetConversation`` has them whole)."""

    id: str
    title: str
    created: float
    updated: float
    system_prompt: str
    sampling: SamplingSettings
    model_fingerprint: str        # the model of the newest saved state
    state_n: int = 0              # completed exchanges covered by the newest saved state
    state_stale: bool = False     # the saved state no longer matches the turns (system prompt changed): rebuilt
    turns: int = 0
    truncated: bool = False       # title / system prompt cut (a summary, or stored beyond the limits)
    state_models: list[str] = []  # fingerprints of the models with a saved state after every turn (no re-read)


class TurnInfo(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One turn of a conversation (``index`` from 0; ``tokens`` the model saw or produced). ``reason``, of a
    reply: why it ended, as in Done ("stop", "length", or "cancelled": a reply stopped by the user, kept as far
    as it got); "" for user turns and replies stored before reasons were. ``tokens_per_s``, of a reply: its
    decode speed (0 when unknown), shown again when the conversation is reopened."""

    index: int
    role: str
    text: str
    tokens: int
    created: float
    finished: float
    reason: str = ""
    tokens_per_s: float = 0.0
    truncated: bool = False       # text cut to MAX_TEXT bytes (stored beyond the limit by an older version)
    # the tree (sent only to a client that asks: GetConversation.branches, and in the replies of the branch
    # requests; fields at their defaults are not sent, so a client that knows none of them reads the rest)
    parent: int = -1              # the turn above it (-1: a first message)
    branch: int = 0               # its place among the turns of the same parent (from 0)
    branches: int = 1             # turns of the same parent (itself included): > 1 where the tree branches


class ConversationList(Msg):
    """A page of summaries (``offset`` as asked); ``total``: conversations in all."""

    items: list[ConversationInfo]
    total: int = 0
    offset: int = 0


class ConversationDetail(Msg):
    """A conversation and a page of its turns (``conversation.turns`` of them in all)."""

    conversation: ConversationInfo
    turns: list[TurnInfo]


class BranchList(Msg):
    """A page of every turn of a conversation (``turns``, texts cut to :data:`SUMMARY_CHARS`, ``truncated`` set
    when cut) by index from ``offset``; ``total`` turns in all; ``leaf`` ends the chosen path."""

    turns: list[TurnInfo]
    leaf: int = -1
    total: int = 0
    offset: int = 0


class ExportReply(Msg):
    """Characters ``offset`` to ``offset + len(text)`` of an export of ``total`` characters."""

    fmt: str
    text: str
    offset: int = 0
    total: int = 0


class StateReply(Msg):
    """Metadata of a state; tensors follow as raw frames in ``tensors`` order."""

    metadata: dict[str, str]
    tensors: list[TensorMeta]


Reply = Union[
    Ok, Pong, Accepted, Busy, Error, StatusReply, ConversationList, ConversationDetail, ExportReply,
    StateReply, BranchList,
]


# ---------------------------------------------------------------- events (PUB, topic = conversation id)
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

AnyMessage = Union[Request, Reply, Event]


# ---------------------------------------------------------------- checking requests against the limits
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
    """Return ``msg`` if every field is within the limits of the module docstring, else raise
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
