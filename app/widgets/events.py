"""Messages the daemon link (worker threads) posts to the UI. Small dataclasses, handled with ``@on``.

Every message is posted from a worker thread with ``post_message`` (thread-safe); handlers run on the
event loop. Daemon events (``Started``, ``Progress``, ``Token``, ``Done``, ``Failed``) are the structs of
:mod:`rwkv_chat.daemon.protocol.messages`, passed through unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message


@dataclass
class Connected(Message):
    """The link reached a daemon: its status (``Client.status()`` dict) and the saved conversations."""

    status: dict
    conversations: list
    restarted: bool = False     # True when this is a reconnection after the daemon was lost


@dataclass
class ConnectionLost(Message):
    """The daemon stopped answering (killed, crashed, stopped); ``reason`` is shown to the user."""

    reason: str


@dataclass
class DaemonStatus(Message):
    """A periodic ``Client.status()`` snapshot (model, memory, devices, active jobs)."""

    status: dict


@dataclass
class DaemonEvent(Message):
    """An event published on ``topic`` (a conversation id, or the daemon topic)."""

    topic: str
    event: Any


@dataclass
class Watching(Message):
    """The link is now subscribed to ``topic`` (events of that conversation reach the UI)."""

    topic: str


@dataclass
class RequestFailed(Message):
    """A request made for ``action`` failed with ``message`` (already phrased for the user)."""

    action: str
    message: str


@dataclass
class LoadFinished(Message):
    """A model load ended: ``ok``, and the daemon's error text and kind (e.g. "StrategyError") when not."""

    ok: bool
    message: str = ""
    info: dict = field(default_factory=dict)
    kind: str = ""
