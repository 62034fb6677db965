"""Requests of the rwkv-chat daemon protocol (client -> daemon over the ROUTER socket; each gets exactly one reply)
and :data:`Request`, their tagged union. The limits their fields are checked against: :mod:`.limits`,
:func:`.checks.check_request`.
"""

from __future__ import annotations

from typing import Union

import msgspec

from .base import Msg, SamplingSettings


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


class GetConversation(Msg, omit_defaults=True):
    """A conversation and a page of its turns: from the turn with index ``turn_offset``, as many as fit in
    :data:`TURN_PAGE_BYTES` of text (at least one)."""

    conversation_id: str
    turn_offset: int = 0
    branches: bool = False        # each turn with its place in the tree (parent, branch, branches) and, for a
                                  # reply, the family of the model that wrote it
    # with the context in use (ConversationDetail.context_used / context_limit); fields at their defaults are not
    # sent (here and in SwitchBranch, DeleteBranch), so a daemon that knows no ``context`` reads a request
    # that does not ask
    context: bool = False


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


class SwitchBranch(Msg, omit_defaults=True):
    """Choose the sibling ``step`` places after (negative: before) the turn ``turn`` (0: that turn; clamped to
    the first and last) and the newest path below it. Reply: ConversationDetail of the new path."""

    conversation_id: str
    turn: int
    step: int = 0
    context: bool = False         # with the context in use of the new path (as GetConversation.context)


class DeleteBranch(Msg, omit_defaults=True):
    """Delete the turn ``turn`` and every turn below it, with their saved states (a reply that is its
    message's only one takes that message along); the rest is kept. Reply: ConversationDetail."""

    conversation_id: str
    turn: int
    context: bool = False         # with the context in use of the path left (as GetConversation.context)


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
