"""The status bar: model, strategy and what serves it (the backend; the compiled kernels' build while the
pure-torch path answers), device memory, the last reply's speed, the open conversation's context (tokens
used of the limit, for a model with a context limit), the daemon connection."""

from __future__ import annotations

import os

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from ..texts import serving_short


def mib(n: float | int | None) -> str:
    """Bytes as a short MiB/GiB string."""
    if not n:
        return "?"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_text(memory: dict) -> str:
    """Device memory from a status reply's ``memory`` dict: CUDA allocated per device, else process RSS."""
    cuda = memory.get("cuda") or []
    if cuda:
        return " ".join(f"{d['device']} {mib(d.get('allocated_bytes'))}" for d in cuda)
    return f"RAM {mib(memory.get('rss_bytes') or memory.get('max_rss_bytes'))}"


class StatusBar(Static):
    """One line; ``snapshot`` hides what changes between runs (memory, speed)."""

    connection: reactive[str] = reactive("connecting…")

    def __init__(self, *, snapshot: bool = False, **kw) -> None:
        super().__init__("", **kw)
        self.snapshot = snapshot
        self.model = ""
        self.strategy = ""
        self.memory = ""
        self.speed = ""
        self.context = ""
        self.activity = ""
        self._served = None      # (path, strategy) of the model the speed was measured on

    def set_status(self, status: dict) -> None:
        model = status.get("model") or {}
        served = (model.get("path"), model.get("strategy")) if model.get("loaded") else None
        if served != self._served:
            self._served, self.speed = served, ""         # another model (or none): the last speed was not its
        if model.get("loaded"):
            self.model = os.path.basename(model.get("path", "")) or "model"
            self.strategy = " · ".join(p for p in (model.get("strategy", ""), serving_short(model)) if p)
        elif model.get("loading"):
            self.model, self.strategy = f"loading {os.path.basename(model['loading'])}…", ""
        elif model.get("error"):
            self.model, self.strategy = f"no model (load failed: {model['error'].get('kind', 'error')})", ""
        else:
            self.model, self.strategy = "no model", ""
        self.memory = "" if self.snapshot else memory_text(status.get("memory") or {})
        limit = model.get("context_limit") if model.get("loaded") else None
        if not limit:
            self.context = ""
        elif not self.context.endswith(f"/{limit:,}"):
            self.context = f"ctx ?/{limit:,}"
        self._show()

    def set_speed(self, tokens_per_s: float) -> None:
        self.speed = "" if self.snapshot else f"{tokens_per_s:.1f} tok/s"
        self._show()

    def set_context(self, used: int | None, limit: int | None) -> None:
        """Show ``used/limit`` tokens of the conversation's context ("" without a limit; "?" for an unknown use)."""
        if not limit:
            self.context = ""
        else:
            self.context = f"ctx {'?' if used is None else f'{used:,}'}/{limit:,}"
        self._show()

    def set_activity(self, text: str) -> None:
        self.activity = text
        self._show()

    def watch_connection(self, value: str) -> None:
        self.set_class(value != "connected", "-down")
        self._show()

    def _show(self) -> None:
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(self.model or "…", style="bold")
        for part in (self.strategy, self.memory, self.speed, self.context, self.activity):
            if part:
                t.append(" │ ")
                t.append(part)
        t.append(" │ ")
        t.append(f"daemon {self.connection}" if self.connection == "connected" else self.connection,
                 style="bold" if self.connection != "connected" else "")
        self.update(t)
