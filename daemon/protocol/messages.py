"""Message types of the rwkv-chat daemon protocol (msgspec structs, one per message, tagged union), gathered.

Only :mod:`rwkv_chat.daemon.protocol.codec` turns these into frames and back. The tag field ``t`` holds
the class name. Requests go client -> daemon over the ROUTER socket and get exactly one reply;
events go daemon -> clients over the PUB socket with topic = conversation id (or a job topic).
Heartbeat events use the topic :data:`DAEMON_TOPIC`.

Where each part lives (every name is imported from here too):

* :mod:`.base` — :class:`Msg` (the base of every message), :class:`TensorMeta`, :data:`SamplingSettings`;
* :mod:`.requests` — the requests and their union :data:`Request`;
* :mod:`.replies` — the replies, the records they carry (:class:`ConversationInfo`, :class:`TurnInfo`) and
  their union :data:`Reply`;
* :mod:`.events` — the events and their union :data:`Event`;
* :mod:`.limits` — conversation ids, topics and the size limits of every request field and outgoing frame;
* :mod:`.checks` — :func:`check_request`, a request against those limits.

:data:`AnyMessage`, the union of the three, is what a frame's body decodes to.
"""

from __future__ import annotations

from typing import Union

from .base import Msg, SamplingSettings, TensorMeta  # noqa: F401
from .checks import check_request  # noqa: F401
from .events import (Done, Event, Failed, Heartbeat, ProbeAck, Progress, PromptReuse, Queued,  # noqa: F401
                     Started, Token)
from .limits import (  # noqa: F401  (the limits and ids, re-exported)
    DAEMON_TOPIC, CONVERSATION_ID_RE, TOPIC_RE, MAX_TEXT, MAX_TITLE, MAX_STOPS, MAX_STOP_CHARS, MAX_PATH,
    MAX_STRATEGY, MAX_ID, MAX_PAGE, MAX_MESSAGES, MAX_MESSAGES_TEXT, MESSAGE_ROLES, SUMMARY_CHARS, MAX_EVENT_TEXT,
    MAX_QUOTE, TURN_PAGE_BYTES, EXPORT_PAGE_CHARS, LimitError, quote, clip_bytes, utf8_len, InvalidId,
    check_conversation_id, new_conversation_id, check_topic)
from .replies import (Accepted, BranchList, Busy, ConversationDetail, ConversationInfo,  # noqa: F401
                      ConversationList, Error, ExportReply, Ok, Pong, Reply, StateReply, StatusReply, TurnInfo)
from .requests import (Cancel, Chat, ChatMessage, ChatMessages, Complete, CreateConversation,  # noqa: F401
                       DeleteBranch, DeleteConversation, Draft, EditLastUser, Export, FindConversation,
                       GetConversation, GetState, ListBranches, ListConversations, Load, Ping, Probe,
                       Regenerate, RenameConversation, Request, SetSampling, SetSystemPrompt, Shutdown, Status,
                       SwitchBranch, Unload)

AnyMessage = Union[Request, Reply, Event]
