"""Message types of the rwkv-chat daemon protocol (msgspec structs, one per message, tagged union).

Only :mod:`rwkv_chat.daemon.protocol` turns these into frames and back. The tag field ``t`` holds
the class name. Requests go client -> daemon over the ROUTER socket and get exactly one reply;
events go daemon -> clients over the PUB socket with topic = conversation id (or a job topic).
Heartbeat events use the topic :data:`DAEMON_TOPIC`.
"""

from __future__ import annotations

from typing import Optional, Union

import msgspec

DAEMON_TOPIC = "~daemon"


class Msg(msgspec.Struct, tag_field="t", tag=True, forbid_unknown_fields=True):
    """Base of every message."""


class Sampling(msgspec.Struct, forbid_unknown_fields=True):
    """Sampling settings; ``None`` fields fall back to the conversation, then the config."""

    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    alpha_frequency: Optional[float] = None
    alpha_presence: Optional[float] = None
    alpha_decay: Optional[float] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = None


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
    sampling: Sampling = msgspec.field(default_factory=Sampling)
    stop: list[str] = []


class Chat(Msg):
    client_id: str
    conversation_id: str
    message: str
    sampling: Sampling = msgspec.field(default_factory=Sampling)


class Regenerate(Msg):
    client_id: str
    conversation_id: str
    sampling: Sampling = msgspec.field(default_factory=Sampling)


class EditLastUser(Msg):
    client_id: str
    conversation_id: str
    text: str
    sampling: Sampling = msgspec.field(default_factory=Sampling)


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
    sampling: Sampling = msgspec.field(default_factory=Sampling)


class RenameConversation(Msg):
    conversation_id: str
    title: str


class DeleteConversation(Msg):
    conversation_id: str


class SetSystemPrompt(Msg):
    conversation_id: str
    text: str


class SetSampling(Msg):
    conversation_id: str
    sampling: Sampling


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
    id: str
    title: str
    created: float
    updated: float
    system_prompt: str
    sampling: dict
    model_fingerprint: str
    turns: int


class TurnInfo(msgspec.Struct, forbid_unknown_fields=True):
    index: int
    role: str
    text: str
    tokens: int
    created: float
    finished: float


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
