"""The ASGI app of the OpenAI-compatible API (starlette), a client of the daemon over ZeroMQ.

Routes: ``GET /v1/models`` (the loaded model; ``GET /v1/models/NAME`` it alone, 404 for another), ``POST /v1/chat/completions`` (the daemon's stateless ``ChatMessages``: the prefix
cache makes the next turn of a conversation read only its new message), ``POST /v1/completions`` (the daemon's
``Complete``: raw text from the empty state). Streaming replies are Server-Sent Events, ``data: {chunk}`` lines
ending with ``data: [DONE]``; an error after the stream began is sent as ``data: {"error": ...}`` before it.

Response headers of completions: ``x-rwkv-chat-cached-tokens`` (prompt tokens taken from the prefix cache)
and ``x-rwkv-chat-prefill-tokens`` (prompt tokens read); the usage's ``prompt_tokens_details.cached_tokens``
says the same.

Chat replies are stripped of leading and trailing whitespace as the daemon stores them (``rwkv-chat chat``
prints the same text); a stream holds back trailing whitespace until more text follows, so the streamed text
joins to the same reply.

Each request takes a daemon :class:`~rwkv_chat.daemon.client.Client` from a pool (one per request in flight:
the daemon batches concurrent requests) and gives it back when done; a client disconnecting mid-stream cancels
its generation. With an API key, every request needs ``Authorization: Bearer KEY`` (else 401).
"""

from __future__ import annotations

import hmac
import json
import secrets
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.routing import Route

from rwkv_chat.daemon.errors import DaemonError, DaemonLost, DaemonUnavailable
from rwkv_chat.daemon.protocol import messages as m

from .schema import ApiError, bad, check_text, daemon_error, parse_chat, parse_completion

CACHED_HEADER = "x-rwkv-chat-cached-tokens"
PREFILL_HEADER = "x-rwkv-chat-prefill-tokens"
#: extensions left out of a model's name (a folder keeps its whole name: "qwen2.5-0.5b")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin")
#: idle daemon clients kept for the next requests
POOL_IDLE = 8
#: bytes of a request body at most (413 beyond): the protocol's limit on messages, JSON-escaped
MAX_BODY = 4 * m.MAX_MESSAGES_TEXT


class Pool:
    """Daemon clients, one per request in flight; idle ones are kept (at most :data:`POOL_IDLE`)."""

    def __init__(self, paths, autostart: bool = True):
        self.paths, self.autostart = paths, autostart
        self._idle: list = []
        self._lock = threading.Lock()

    def take(self):
        """A connected client (an idle one, else a new one). Raises DaemonUnavailable."""
        from rwkv_chat.daemon.client import Client

        with self._lock:
            c = self._idle.pop() if self._idle else None
        if c is not None and not self._current(c):      # the daemon it knew was stopped (and maybe restarted)
            c.close()
            c = None
        if c is None:
            c = Client(self.paths, autostart=self.autostart)
        try:
            c.connect()
        except BaseException:
            c.close()
            raise
        return c

    def _current(self, c) -> bool:
        """Whether the idle client ``c`` talks to the daemon that runs now (its connection file names the same
        pid): a daemon stopped and started again between two requests must not cost the next one an error."""
        from rwkv_chat.daemon.protocol.connection import read_connection_file

        try:
            return c.info is not None and read_connection_file(self.paths.connection_file).pid == c.info.pid
        except (OSError, ValueError, DaemonError):     # no file (stopped), or one not to trust
            return False

    def give(self, c, error: BaseException | None = None) -> None:
        """Give ``c`` back after use; it is closed instead when ``error`` says the daemon went away."""
        keep = not isinstance(error, (DaemonLost, DaemonUnavailable))
        with self._lock:
            keep = keep and len(self._idle) < POOL_IDLE
            if keep:
                self._idle.append(c)
        if not keep:
            c.close()

    @contextmanager
    def client(self):
        c = self.take()
        try:
            yield c
        except BaseException as e:
            self.give(c, e)
            raise
        self.give(c)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def model_name(info: dict) -> str:
    """The API's name of the model the daemon has loaded, is loading, or unloaded while idle (it loads again for
    the next request): its ``name`` if the daemon gives one, else the checkpoint's file name without its
    extension, or the folder's name; "" when there is none."""
    if info.get("name"):
        return str(info["name"])
    path = info.get("path") if info.get("loaded") or info.get("unloaded") else info.get("loading")
    if not path:
        return ""
    p = Path(path)
    return p.stem if p.suffix in CHECKPOINT_SUFFIXES else p.name


def model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "rwkv-chat"}


#: seconds a client told "busy" (429) is asked to wait before it tries again
RETRY_AFTER_S = 1


def error_response(e: ApiError) -> JSONResponse:
    """OpenAI's error body; a 429 also says when to try again (``Retry-After``)."""
    headers = {"retry-after": str(RETRY_AFTER_S)} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def _usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(reason: str) -> str:
    if reason == "cancelled":
        raise ApiError(503, "the generation was cancelled in the daemon (stopped, or cancelled by another client)",
                       "server_error", None, "cancelled")
    return "length" if reason == "length" else "stop"


class Strip:
    """Streams a reply stripped of leading and trailing whitespace: feed pieces, get what may be sent now."""

    def __init__(self):
        self.started, self.held = False, ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.held + piece
        out = text.rstrip()
        self.held = text[len(out):]
        return out


class Gateway:
    """The app's state: the daemon client pool and the API key (see the module docstring)."""

    def __init__(self, paths, api_key: str = "", autostart: bool = True):
        self.pool = Pool(paths, autostart)
        self.api_key = api_key

    # ---------------------------------------------------------------- helpers (threads)
    def _model(self, wanted: str | None = None) -> str:
        """The loaded model's name; with ``wanted``, raises ApiError 404 unless it names that model."""
        with self.pool.client() as c:
            info = c.status()["model"]
        name = model_name(info)
        if wanted is not None and wanted not in (name, info.get("path"), info.get("loading")):
            if not name:
                raise ApiError(404, f"the model {wanted!r:.80} is not loaded: the daemon has no model (load one "
                                    "with `rwkv-chat load PATH`)", "invalid_request_error", "model", "model_not_found")
            raise ApiError(404, f"the model {wanted!r:.80} does not exist: the daemon serves {name!r}",
                           "invalid_request_error", "model", "model_not_found")
        return name

    def _open(self, req, chat: bool):
        """Start the generation; returns (client, event generator, its first Started, Token or Done event).
        The caller gives the client back to the pool."""
        c = self.pool.take()
        try:
            if chat:
                gen = c.chat_messages(req.messages, stop=req.stop, **req.sampling)
            else:
                gen = c.complete(req.prompt, stop=req.stop, **req.sampling)
            for ev in gen:
                if isinstance(ev, (m.Started, m.Token, m.Done)):
                    return c, gen, ev
            raise ApiError(500, "the daemon ended the generation without a reply", "server_error")
        except BaseException as e:
            self.pool.give(c, e)
            raise

    # ---------------------------------------------------------------- routes
    def check_key(self, request: Request) -> None:
        if not self.api_key:
            return
        scheme, given = (request.headers.get("authorization", "").split(None, 1) + ["", ""])[:2]
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send the header `Authorization: Bearer KEY`",
                           "invalid_request_error", None, "invalid_api_key")

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        name = await run(self._model)
        return JSONResponse({"object": "list", "data": [model_object(name)] if name else []})

    async def model(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse(model_object(await run(self._model, request.path_params["model"])))

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, chat: bool) -> Response:
        self.check_key(request)
        body = await read_json(request)
        req = parse_chat(body) if chat else parse_completion(body)
        name = await run(self._model, req.model)
        c, gen, first = await run(self._open, req, chat)
        cached = first.cached_tokens if isinstance(first, (m.Started, m.Done)) else 0
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        meta = {"id": rid, "created": created, "model": name}
        if not req.stream:
            error = None
            try:
                done = first if isinstance(first, m.Done) else await _until_done(request, gen)
            except BaseException as e:
                error = e
                raise
            finally:
                # closed before its Done (the client left) it cancels the generation through the client's socket:
                # only then may another request take that client from the pool
                with anyio.CancelScope(shield=True):
                    await run(gen.close)
                    self.pool.give(c, error)
            return self._whole(meta, req, chat, done)
        lease = Lease(self.pool, c, gen)
        return StreamingResponse(self._events(meta, req, chat, lease, first), media_type="text/event-stream",
                                 headers={CACHED_HEADER: str(cached), "cache-control": "no-cache"},
                                 background=BackgroundTask(lease.release))     # also if the stream never began

    def _whole(self, meta: dict, req, chat: bool, done: m.Done) -> Response:
        reason = _finish(done.reason)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": (req.prompt if req.echo else "") + done.text, "logprobs": None,
                      "finish_reason": reason}
        body = {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": _usage(done.prompt_tokens, done.tokens, done.cached_tokens)}
        return JSONResponse(body, headers={CACHED_HEADER: str(done.cached_tokens),
                                           PREFILL_HEADER: str(done.prompt_tokens - done.cached_tokens)})

    async def _events(self, meta: dict, req, chat: bool, lease: "Lease", first):
        """The SSE lines of a stream; closing it early (the client went away) cancels the generation."""
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None = None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            return sse({**meta, "object": obj, "choices": [choice]})

        strip = Strip() if chat else None
        ev = first
        error = None
        try:
            if chat:
                yield chunk(role=True)
            elif req.echo:
                yield chunk(req.prompt)
            while True:
                if isinstance(ev, m.Token):
                    text = strip.feed(ev.text) if strip else ev.text
                    if text:
                        yield chunk(text)
                elif isinstance(ev, m.Done):
                    yield chunk(reason=_finish(ev.reason))
                    if req.include_usage:
                        yield sse({**meta, "object": obj, "choices": [],
                                   "usage": _usage(ev.prompt_tokens, ev.tokens, ev.cached_tokens)})
                    yield "data: [DONE]\n\n"
                    return
                ev = await run(next, lease.gen, None)
                if ev is None:
                    raise ApiError(500, "the daemon ended the stream without a reply", "server_error")
        except ApiError as e:
            yield sse(e.body())
        except DaemonError as e:
            error = e
            yield sse(daemon_error(e.kind, e.message).body())
        finally:
            await lease.release(error)


class Lease:
    """A streaming generation's daemon client and event generator, released once: the generator closed (before
    its Done, that cancels the generation) and the client given back to the pool."""

    def __init__(self, pool: Pool, client, gen):
        self.pool, self.client, self.gen = pool, client, gen
        self.released = False

    async def release(self, error: BaseException | None = None) -> None:
        if self.released:
            return
        self.released = True
        with anyio.CancelScope(shield=True):
            await run(self.gen.close)
            self.pool.give(self.client, error)


async def read_json(request: Request):
    """The request's JSON body. Raises ApiError: 413 beyond :data:`MAX_BODY` bytes, 400 when it is not JSON."""
    too_large = ApiError(413, f"the request body is larger than {MAX_BODY:,} bytes", "invalid_request_error",
                         None, "request_too_large")
    announced = request.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > MAX_BODY:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(None, f"the request body is not JSON: {e or 'nested too deeply'}") from None
    check_text(body)
    return body


async def _until_done(request: Request, gen) -> m.Done:
    """The Done of a generation answered as a whole. A client that goes away meanwhile (seen at each event: tokens,
    prefill progress) ends the wait with a 499 (nginx's "client closed request", which nobody receives); the caller
    then closes ``gen`` before its Done, which cancels the generation, as a stream's end does."""
    while True:
        ev = await run(next, gen, None)
        if ev is None:
            raise ApiError(500, "the daemon ended the generation without a reply", "server_error")
        if isinstance(ev, m.Done):
            return ev
        if await request.is_disconnected():
            raise ApiError(499, "the client closed the request", "invalid_request_error", None, "client_closed")


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def run(fn, *args):
    """``fn(*args)`` in a worker thread (the daemon client blocks)."""
    return await anyio.to_thread.run_sync(fn, *args)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


async def _daemon_error(request: Request, exc: DaemonError) -> Response:
    return error_response(daemon_error(exc.kind, exc.message))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    typ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(ApiError(exc.status_code, message, typ, None, code))


def make_app(paths, api_key: str = "", autostart: bool = True) -> Starlette:
    """The ASGI app serving the daemon of ``paths`` (a :class:`~rwkv_chat.daemon.paths.Paths`); ``api_key``
    "" = none; ``autostart``: start the daemon when none runs (as every rwkv-chat command does)."""
    gw = Gateway(paths, api_key, autostart)
    routes = [Route("/v1/models", gw.models, methods=["GET"]),
              Route("/v1/models/{model:path}", gw.model, methods=["GET"]),
              Route("/v1/chat/completions", gw.chat, methods=["POST"]),
              Route("/v1/completions", gw.completions, methods=["POST"])]

    @asynccontextmanager
    async def lifespan(app):
        yield
        gw.pool.close()

    app = Starlette(routes=routes, exception_handlers={ApiError: _api_error, DaemonError: _daemon_error,
                                                       HTTPException: _http_error},
                    lifespan=lifespan)
    app.state.gateway = gw
    return app
