"""Errors raised by the daemon's client library."""

from __future__ import annotations

from .protocol import messages as m


class DaemonError(RuntimeError):
    """The daemon answered with an error; ``kind`` names it."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class BusyError(DaemonError):
    """The daemon's generation queue is full."""

    def __init__(self, busy: m.Busy):
        super().__init__("Busy", busy.reason)
        self.queued, self.limit = busy.queued, busy.limit


class GenerationFailed(DaemonError):
    """A generation (or load) failed in the daemon (``kind`` e.g. "OOM", "StateError", "NoModel")."""


class DaemonUnavailable(DaemonError):
    """No daemon answers (and none could be started)."""

    def __init__(self, message: str):
        super().__init__("Unavailable", message)


class DaemonLost(DaemonError):
    """The daemon stopped answering in the middle of a stream."""

    def __init__(self, message: str):
        super().__init__("Lost", message)


class DaemonNotResponding(DaemonUnavailable):
    """A daemon holds the home's lock and published its connection file, but does not answer (stopped with
    SIGSTOP, or hung); ``pid`` is its process id (0 if unknown)."""

    def __init__(self, pid: int, message: str):
        super().__init__(message)
        self.kind = "NotResponding"
        self.pid = pid
