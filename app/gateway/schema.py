"""OpenAI request bodies -> the daemon's requests, and the OpenAI error shape.

:func:`parse_chat` and :func:`parse_completion` read the JSON body of ``POST /v1/chat/completions`` and
``POST /v1/completions`` and return a :class:`Request`, or raise :class:`ApiError` naming the offending field
(``param``) with HTTP status 400. Fields and what they become (the daemon's sampling settings, see
``rwkv_chat.daemon.protocol.messages.SamplingSettings``; a field not sent keeps the daemon's ``[sampling]``
default):

=========================================  ======================================================
``model``                                  required; checked against the loaded model by the server
``messages`` (chat)                        role ``system``/``developer``, ``user`` or ``assistant``; content a
                                           string or a list of ``{"type": "text", "text": ...}`` parts
``prompt`` (completions)                   a string, or a list of exactly one string
``temperature`` ``top_p`` ``top_k``        same names (``top_k`` is not OpenAI's but commonly sent)
``presence_penalty`` ``frequency_penalty`` ``alpha_presence``, ``alpha_frequency`` (>= 0: the sampler's
                                           penalties are never negative)
``repetition_penalty``                     same name (not OpenAI's; vLLM's extension: > 0, 1 = off)
``max_tokens`` ``max_completion_tokens``   ``max_tokens`` (the latter wins when both are sent)
``seed``                                   ``seed`` (0 to 2**63 - 1)
``stop``                                   a string or a list of up to 16 strings (empty ones ignored)
``stream``, ``stream_options``             SSE; ``include_usage`` adds a last chunk with the usage
``echo`` (completions)                     the prompt is put before the completion
``n``, ``logprobs``, ``top_logprobs``      only 1 / off: other values are refused (400)
=========================================  ======================================================

Every other field (``user``, ``tools``, ``response_format``, ``logit_bias``, ...) is ignored.

Errors follow OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from rwkv_chat.app.texts import MAX_INT
from rwkv_chat.daemon.protocol import messages as m

#: OpenAI role -> the daemon's
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """An error answered in OpenAI's shape with HTTP ``status``; ``type`` e.g. "invalid_request_error"."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error about ``param``."""
    return ApiError(400, message, "invalid_request_error", param, code)


@dataclass
class Request:
    """A parsed request: ``messages`` (chat) or ``prompt`` (completions), ``sampling`` by the daemon's names."""

    model: str
    stream: bool = False
    include_usage: bool = False
    messages: list[m.ChatMessage] = field(default_factory=list)
    prompt: str = ""
    echo: bool = False
    sampling: dict = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)


def _positive(body: dict, name: str) -> float | None:
    """``body[name]`` checked as a number more than 0 (None when absent or null)."""
    v = _number(body, name)
    if v is not None and v <= 0:
        raise bad(name, f"{name} must be more than 0, got {v:g}")
    return v


def _number(body: dict, name: str, lo: float | None = None, hi: float | None = None, integer: bool = False):
    """``body[name]`` checked (None when absent or null); an integer field at most :data:`MAX_INT`."""
    v = body.get(name)
    if v is None:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not (
            isinstance(v, int) or (isinstance(v, float) and v.is_integer()))):
        raise bad(name, f"{name} must be {kind}, got {v!r:.80}")
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(name, f"{name} must be a finite number")
    if integer:
        v, hi = int(v), MAX_INT if hi is None else hi
    elif isinstance(v, int) and abs(v) > 2**1023:          # beyond any float
        raise bad(name, f"{name} must be a finite number, got {_shown(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        show = _shown if integer else (lambda x: f"{x:g}")
        where = f"between {show(lo)} and {show(hi)}" if hi is not None else f"{show(lo)} or more"
        raise bad(name, f"{name} must be {where}, got {show(v)}")
    return v if integer else float(v)


def _shown(v: int) -> str:
    """An integer as a message shows it: exactly, or its length where it is long."""
    text = str(v)
    return text if len(text) <= 40 else f"an integer of {len(text.lstrip('-'))} digits"


def _common(body) -> Request:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: the name of the loaded model (GET /v1/models lists it)")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad("stream", f"stream must be true or false, got {stream!r:.80}")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "stream_options must be an object")
    n = _number(body, "n", 1, None, integer=True)
    if n not in (None, 1):
        raise bad("n", "n must be 1: one choice per request")
    sampling = {"temperature": _number(body, "temperature", 0),
                "top_p": _number(body, "top_p", 0, 1),
                "top_k": _number(body, "top_k", 0, None, integer=True),
                "alpha_presence": _number(body, "presence_penalty", 0),
                "alpha_frequency": _number(body, "frequency_penalty", 0),
                "repetition_penalty": _positive(body, "repetition_penalty"),
                "seed": _number(body, "seed", 0, MAX_INT, integer=True),
                "max_tokens": _number(body, "max_tokens", 1, None, integer=True)}
    mct = _number(body, "max_completion_tokens", 1, None, integer=True)
    if mct is not None:
        sampling["max_tokens"] = mct
    return Request(model=model, stream=stream, include_usage=bool(opts.get("include_usage")),
                   sampling={k: v for k, v in sampling.items() if v is not None}, stop=_stop(body.get("stop")))


def _stop(v) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("stop", "stop must be a string or a list of strings")
    items = [s for s in items if s]
    if len(items) > m.MAX_STOPS:
        raise bad("stop", f"stop has {len(items)} strings; the limit is {m.MAX_STOPS}")
    if any(len(s) > m.MAX_STOP_CHARS for s in items):
        raise bad("stop", f"a stop string is longer than {m.MAX_STOP_CHARS} characters")
    return items


def _content(v, i: int) -> str:
    """A message's content: a string, or text parts joined."""
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    if isinstance(v, list):
        parts = []
        for part in v:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported, "
                                                    f"got {kind!r:.40}")
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content", f"messages[{i}].content must be a string or a list of text parts")


def parse_chat(body) -> Request:
    """The request of a ``/v1/chat/completions`` body. Raises ApiError (400)."""
    req = _common(body)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs", "logprobs are not supported")
    msgs = body.get("messages")
    if msgs is None:
        raise bad("messages", "messages is required: a list of {role, content} objects")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    if len(msgs) > m.MAX_MESSAGES:
        raise bad("messages", f"messages has {len(msgs)} messages; the limit is {m.MAX_MESSAGES}")
    total = 0
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            raise bad(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"messages[{i}].role must be one of system, developer, user, "
                                             f"assistant, got {role!r:.40}")
        text = _content(msg.get("content"), i)
        size = m.utf8_len(text)
        if size > m.MAX_TEXT:
            raise bad(f"messages[{i}].content", f"messages[{i}].content has {size:,} bytes; the limit is "
                                                f"{m.MAX_TEXT:,}")
        total += size
        req.messages.append(m.ChatMessage(role=ROLES[role], content=text))
    if total > m.MAX_MESSAGES_TEXT:
        raise bad("messages", f"the messages have {total:,} bytes together; the limit is {m.MAX_MESSAGES_TEXT:,}")
    if req.messages[-1].role != "user":
        raise bad("messages", "the last message must be from the user")
    return req


def parse_completion(body) -> Request:
    """The request of a ``/v1/completions`` body. Raises ApiError (400)."""
    req = _common(body)
    if body.get("logprobs") not in (None, 0):
        raise bad("logprobs", "logprobs are not supported")
    if (body.get("best_of") or 1) != 1:
        raise bad("best_of", "best_of must be 1")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if prompt is None:
        raise bad("prompt", "prompt is required: the text to continue")
    if not isinstance(prompt, str):
        raise bad("prompt", "prompt must be a string (or a list of one string; token ids are not supported)")
    if not prompt:
        raise bad("prompt", "prompt is empty: give the text to continue")
    if m.utf8_len(prompt) > m.MAX_MESSAGES_TEXT:
        raise bad("prompt", f"prompt has more than {m.MAX_MESSAGES_TEXT:,} bytes")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise bad("echo", "echo must be true or false")
    req.prompt, req.echo = prompt, echo
    return req


#: the daemon's error kind -> (HTTP status, OpenAI error type)
KINDS = {"LimitError": (400, "invalid_request_error"), "SamplingError": (400, "invalid_request_error"),
         "ValueError": (400, "invalid_request_error"), "TokenError": (400, "invalid_request_error"),
         "Busy": (429, "rate_limit_error"), "NoModel": (503, "server_error"),
         "QueueTimeout": (503, "server_error"), "OOM": (503, "server_error"), "Unavailable": (503, "server_error"),
         "NotResponding": (503, "server_error"), "Lost": (503, "server_error"),
         "ContextLimitExceeded": (400, "invalid_request_error"), "ContextLimitError": (400, "invalid_request_error")}
#: the daemon's error kind -> OpenAI's error code where OpenAI has one (else the code is the kind)
CODES = {"ContextLimitExceeded": "context_length_exceeded", "ContextLimitError": "context_length_exceeded"}


#: the request field a daemon error of this kind is about, where the message names one first (``max_tokens ...``)
_PARAMS = ("max_tokens", "top_k", "seed", "stop", "temperature", "top_p", "prompt", "messages")


def daemon_error(kind: str, message: str) -> ApiError:
    """The ApiError of a daemon error or failed generation of ``kind``: OpenAI's code where it has one, else the
    kind in snake_case (``LimitError`` -> ``limit_error``); ``param`` the field a limit names first."""
    status, typ = KINDS.get(kind, (500, "server_error"))
    code = CODES.get(kind) or re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", kind).lower()     # OOM -> oom
    param = next((p for p in _PARAMS if re.match(rf"{p}\b", message)), None) if status == 400 else None
    return ApiError(status, message, typ, param, code)


def check_text(body) -> None:
    """Every string in a parsed JSON body is encodable text: a lone surrogate (JSON's ``\\ud800`` escape alone) is
    refused as a 400 naming where it is (walked without recursion: any depth json accepts). Raises ApiError."""
    todo = [(body, "")]
    while todo:
        value, where = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad(where or None, f"{where or 'the body'} holds a lone surrogate "
                                         f"(\\u{ord(value[e.start]):04x}) at character {e.start}: not text") from None
        elif isinstance(value, dict):
            for k, v in value.items():
                todo += [(k, where), (v, f"{where}.{k}" if where else str(k))]
        elif isinstance(value, list):
            todo += [(v, f"{where}[{i}]") for i, v in enumerate(value)]
