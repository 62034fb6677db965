"""Replies of the rwkv-chat daemon protocol (daemon -> client, one per request) and :data:`Reply`, their tagged
union; with the records they carry (:class:`ConversationInfo`, :class:`TurnInfo`), which the daemon's store keeps.
"""

from __future__ import annotations

from typing import Union

import msgspec

from .base import Msg, SamplingSettings, TensorMeta


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
    store_revision: list = []     # changes whenever the list of conversations does (Store.revision)


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
    # the tree and a reply's family (sent only to a client that asks: GetConversation.branches, and in the replies
    # of the branch requests; fields at their defaults are not sent, so a client that knows none of them reads the
    # rest)
    parent: int = -1              # the turn above it (-1: a first message)
    branch: int = 0               # its place among the turns of the same parent (from 0)
    branches: int = 1             # turns of the same parent (itself included): > 1 where the tree branches
    family: str = ""              # of a reply: the family of the model that wrote it ("rwkv", "qwen2"); "" for user
                                  # turns and replies stored before it was kept


class ConversationList(Msg):
    """A page of summaries (``offset`` as asked); ``total``: conversations in all."""

    items: list[ConversationInfo]
    total: int = 0
    offset: int = 0


class ConversationDetail(Msg, omit_defaults=True):
    """A conversation and a page of its turns (``conversation.turns`` of them in all).

    Where the request asked for it (``context``) and the loaded model has a context limit: ``context_used``,
    the tokens of the conversation's chosen path the model has consumed — what its next message starts from
    (its Done's ``context_used`` before the message's own tokens; ``rwkv_chat.daemon.context``) — of
    ``context_limit`` tokens. Else both None, and not sent (fields at their defaults are not: a client that
    knows neither reads the rest)."""

    conversation: ConversationInfo
    turns: list[TurnInfo]
    context_used: int | None = None
    context_limit: int | None = None


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
