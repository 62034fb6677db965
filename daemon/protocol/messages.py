"""Message types of the rwkv-chat daemon protocol (msgspec structs, one per message, tagged union).

Only :mod:`rwkv_chat.daemon.protocol.codec` turns these into frames and back. The tag field ``t`` holds
the class name. Requests go client -> daemon over the ROUTER socket and get exactly one reply;
events go daemon -> clients over the PUB socket with topic = conversation id (or a job topic).
Heartbeat events use the topic :data:`DAEMON_TOPIC`.

Sampling settings travel as :data:`SamplingSettings`: fields of the engine's one sampling settings type
(``rwkv_chat.models.text.sampling.SamplerArgs``) by name, where a missing or None field falls back to the
conversation's setting, then to the config's ``[sampling]`` section, then to that type's defaults.

Conversation ids match :data:`CONVERSATION_ID_RE` (no path separators, dots or spaces), checked by
:func:`check_conversation_id` before any path or query is built from one; topics match :data:`TOPIC_RE`.
"""

from __future__ import annotations

import re
import secrets
from typing import Union

import msgspec

DAEMON_TOPIC = "~daemon"
CONVERSATION_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
TOPIC_RE = re.compile(r"[A-Za-z0-9~][A-Za-z0-9_~-]{0,127}")

#: sampling settings by name (``temperature``, ``top_p``, ``top_k``, ``alpha_frequency``, ``alpha_presence``,
#: ``alpha_decay``, ``max_tokens``, ``seed``); None or missing = not given here
SamplingSettings = dict[str, Union[int, float, None]]


class InvalidId(ValueError):
    """A conversation id does not match ``[A-Za-z0-9][A-Za-z0-9_-]{0,63}``."""


def check_conversation_id(cid: str) -> str:
    """Return ``cid`` if it is a valid conversation id, else raise :class:`InvalidId`."""
    if not isinstance(cid, str) or not CONVERSATION_ID_RE.fullmatch(cid):
        raise InvalidId(f"invalid conversation id {cid!r}: use 1-64 of A-Z a-z 0-9 _ - (starting alphanumeric)")
    return cid


def new_conversation_id() -> str:
    """A fresh random conversation id."""
    return "c" + secrets.token_hex(6)


def check_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid event topic, else raise ValueError."""
    if not TOPIC_RE.fullmatch(topic):
        raise ValueError(f"invalid topic {topic!r}")
    return topic


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


class Regenerate(Msg):
    client_id: str
    conversation_id: str
    sampling: SamplingSettings = {}


class EditLastUser(Msg):
    client_id: str
    conversation_id: str
    text: str
    sampling: SamplingSettings = {}


class Cancel(Msg):
    job_id: str = ""
    conversation_id: str = ""


class ListConversations(Msg):
    pass


class GetConversation(Msg):
    conversation_id: str


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
    conversation_id: str
    fmt: str = "md"


class GetState(Msg):
    """Ask for a conversation's saved state; the reply carries tensors as raw frames."""

    conversation_id: str


class Shutdown(Msg):
    pass


Request = Union[
    Ping, Status, Probe, Load, Complete, Chat, Regenerate, EditLastUser, Cancel, ListConversations,
    GetConversation, CreateConversation, RenameConversation, DeleteConversation, SetSystemPrompt,
    SetSampling, Export, GetState, Shutdown,
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


class ConversationInfo(msgspec.Struct, forbid_unknown_fields=True):
    """A conversation as the store keeps it (``sampling``: its own settings, over the config's)."""

    id: str
    title: str
    created: float
    updated: float
    system_prompt: str
    sampling: SamplingSettings
    model_fingerprint: str
    state_n: int = 0              # completed exchanges covered by the newest saved state
    state_stale: bool = False     # the saved state no longer matches the turns (system prompt changed): rebuilt
    turns: int = 0


class TurnInfo(msgspec.Struct, forbid_unknown_fields=True):
    """One turn of a conversation (``index`` from 0; ``tokens`` the model saw or produced). A reply also keeps
    why it ended (``reason``: "stop", "length") and its decode speed (``tokens_per_s``), shown again when
    the conversation is reopened."""

    index: int
    role: str
    text: str
    tokens: int
    created: float
    finished: float
    reason: str = ""
    tokens_per_s: float = 0.0


class ConversationList(Msg):
    items: list[ConversationInfo]


class ConversationDetail(Msg):
    conversation: ConversationInfo
    turns: list[TurnInfo]


class ExportReply(Msg):
    fmt: str
    text: str


class StateReply(Msg):
    """Metadata of a state; tensors follow as raw frames in ``tensors`` order."""

    metadata: dict[str, str]
    tensors: list[TensorMeta]


Reply = Union[
    Ok, Pong, Accepted, Busy, Error, StatusReply, ConversationList, ConversationDetail, ExportReply,
    StateReply,
]


# ---------------------------------------------------------------- events (PUB, topic = conversation id)
class ProbeAck(Msg):
    nonce: str


class Heartbeat(Msg):
    pid: int
    uptime: float
    active: int


class Started(Msg):
    """A job started (a watcher learns the user's message, if any)."""

    job_id: str
    kind: str
    conversation_id: str = ""
    message: str = ""


class Progress(Msg):
    """``phase`` "load" or "prefill"; ``done`` of ``total`` (tokens for prefill, steps for load)."""

    job_id: str
    phase: str
    done: int
    total: int
    text: str = ""


class Token(Msg):
    job_id: str
    seq: int
    text: str


class Done(Msg):
    """A job ended. ``reason``: "stop", "length", "cancelled"; rates in tokens per second."""

    job_id: str
    reason: str
    text: str
    prompt_tokens: int
    tokens: int
    prefill_s: float
    decode_s: float
    tokens_per_s: float


class Failed(Msg):
    job_id: str
    kind: str
    message: str


Event = Union[ProbeAck, Heartbeat, Started, Progress, Token, Done, Failed]

AnyMessage = Union[Request, Reply, Event]
