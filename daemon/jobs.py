"""Jobs run by the scheduler: a load, a raw completion, or one chat exchange.

A generation job goes through phases: ``prefill`` (prompt tokens fed ``chunk_len`` at a time, a Progress
event per chunk), ``decode`` (one token per scheduler step: sample from the last logits, feed the token in the
scheduler's batched decode step),
then ``done``. The chat template is ChatRWKV's: ``"User: {message}\\n\\nAssistant:"``, the reply ending at
``"\\n\\n"`` (fed to the state, so the next exchange starts where the reply ended).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from . import messages as m

CHAT_STOP = "\n\n"


def chat_prompt(message: str) -> str:
    return f"User: {message}\n\nAssistant:"


def transcript(system_prompt: str, pairs: list[tuple[str, str]]) -> str:
    """Text of a whole conversation as the model saw it (for rebuilding a state from the turns)."""
    out = system_prompt + "\n\n" if system_prompt else ""
    for user, assistant in pairs:
        out += chat_prompt(user) + " " + assistant + CHAT_STOP
    return out


@dataclass
class Job:
    """One unit of scheduler work. Set by the server: identity and request; by the scheduler: the rest."""

    id: str
    kind: str                     # "load" | "complete" | "chat"
    client_id: str
    topic: str
    request: m.Msg
    conversation_id: str = ""
    mode: str = ""                # chat: "chat" | "regenerate" | "edit"
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.time)
    # runtime
    phase: str = "queued"
    prompt: list[int] = field(default_factory=list)
    pos: int = 0
    state: object = None
    logits: object = None
    sampler: object = None
    decoder: object = None
    stops: tuple[str, ...] = ()
    max_tokens: int = 0
    out_tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0              # characters of ``text`` sent in Token events
    ready: int = 0                # characters of ``text`` that may be sent (no longer part of a stop)
    seq: int = 0
    reason: str = ""
    t_start: float = 0.0
    t_prefill: float = 0.0
    t_decode: float = 0.0
    t_chunk: float = 0.0          # perf_counter of the last prefill chunk (round-robin among prompts)
    handle: int | None = None     # slot handle in the engine's BatchDecoder while decoding
    # chat bookkeeping
    base_n: int = 0
    drop_from: int | None = None
    user_text: str = ""
    user_created: float = 0.0
    user_tokens: int = 0

    def info(self) -> dict:
        return {"job_id": self.id, "kind": self.kind, "client_id": self.client_id,
                "conversation_id": self.conversation_id, "phase": self.phase,
                "prefill": [self.pos, len(self.prompt)], "tokens": len(self.out_tokens)}


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could begin a stop sequence (withheld from the stream)."""
    k = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                k = max(k, n)
                break
    return k
