"""Request handlers of the daemon's main loop: :data:`HANDLERS` maps each request type to its handler,
``handler(server, msg) -> (reply, raw buffers)``. Runs in the server thread; generations are queued on the
scheduler, everything else is answered at once.

Every request is checked against the protocol's limits first (``messages.check_request``: ``LimitError``),
and a generation's ``max_tokens`` against ``[daemon] max_tokens_limit``. A queued job is owned by the
connection that sent it (``server.peer``, the ROUTER identity), not by the client id it names.
"""

from __future__ import annotations

import os
import resource

import msgspec
import time
from typing import Callable

from .branches import delete_branch, export_conversation, redo_target, switch_branch, tree_page
from .context import conversation_used, limit_of
from .generation import Job
from .host import NoModel
from .protocol import codec as p
from .protocol import messages as m
from .protocol.messages import (EXPORT_PAGE_CHARS, MAX_PAGE, TURN_PAGE_BYTES, check_conversation_id, check_request,
                                check_topic, new_conversation_id, quote)

#: turns per ListBranches page (summaries of SUMMARY_CHARS characters: a bounded frame)
BRANCH_PAGE = 200

Handler = Callable[..., "tuple[m.Msg, list]"]

#: request type -> handler(server, msg) -> (reply, raw buffers)
HANDLERS: dict[type, Handler] = {}


def handles(*types: type):
    """Register the decorated function as the handler of ``types``."""
    def register(fn: Handler) -> Handler:
        for t in types:
            HANDLERS[t] = fn
        return fn
    return register


def handle(server, msg) -> tuple[m.Msg, list]:
    """The reply (and raw buffers) to ``msg``; what a handler raises becomes the server's Error reply."""
    handler = HANDLERS.get(type(msg))
    if handler is None:
        return m.Error(kind="ProtocolError", message=f"{type(msg).__name__} is not a request"), []
    check_request(msg)
    return handler(server, msg)


def _settings(server, sampling: m.SamplingSettings) -> dict:
    """The given settings of ``sampling`` (None = not given). Raises SamplingError for an unknown name or a
    value out of range, LimitError for ``max_tokens`` over ``[daemon] max_tokens_limit``."""
    from rwkv_chat.daemon.config import SAMPLING_KEYS, check_max_tokens
    from rwkv_chat.models.text.sampling import SamplingError

    given = {k: v for k, v in sampling.items() if v is not None}
    unknown = sorted(set(given) - set(SAMPLING_KEYS))
    if unknown:
        names = ", ".join(quote(k, 32) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise SamplingError(f"unknown sampling settings {names} (known: {', '.join(SAMPLING_KEYS)})")
    server.config.sampling.updated(given)                         # SamplingError for a value out of range
    check_max_tokens(given.get("max_tokens"), server.config.daemon.max_tokens_limit)
    return given


def _detail(server, cid: str, turn_offset: int = 0, branches: bool = True,
            context: bool = False) -> m.ConversationDetail:
    """A conversation and a page of its chosen path; without ``branches`` the turns leave their place in the
    tree and the family of each reply out (a client that does not know those fields reads them); with
    ``context``, the context in use (:func:`_context`)."""
    turns = server.store.turns_page(cid, turn_offset, TURN_PAGE_BYTES)
    if not branches:
        turns = [msgspec.structs.replace(t, parent=-1, branch=0, branches=1, family="") for t in turns]
    used, limit = _context(server, cid) if context else (None, None)
    return m.ConversationDetail(conversation=server.store.get_bounded(cid), turns=turns, context_used=used,
                                context_limit=limit)


def _context(server, cid: str) -> tuple[int | None, int | None]:
    """``(used, limit)`` tokens of the conversation's context on the loaded model
    (:func:`~rwkv_chat.daemon.context.conversation_used`: saved states' metadata, the tokenizer on the
    history no state covers); ``(None, None)`` without a model or without a context limit."""
    try:
        model, tok, template = server.host.need()
    except NoModel:
        return None, None
    limit = limit_of(model, server.config.model.context_limit)
    if not limit or tok is None or template is None:
        return None, None
    used = conversation_used(server.store.get(cid), server.store.turns(cid), model=model, tok=tok,
                             template=template, sessions=server.sessions)
    return used, limit


def memory() -> dict:
    out = {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    import torch

    if torch.cuda.is_available():
        out["cuda"] = [{"device": f"cuda:{i}", "allocated_bytes": torch.cuda.memory_allocated(i),
                        "reserved_bytes": torch.cuda.memory_reserved(i)} for i in range(torch.cuda.device_count())]
    return out


def devices() -> list[str]:
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        out.append("mps")
    return out


def _generation(server, msg, kind: str, topic: str, cid: str = "", mode: str = "") -> m.Msg:
    """Submit a job of ``kind`` for ``msg`` (its sampling settings checked first, but for a load or an unload:
    SamplingError, LimitError) and return the scheduler's reply to it."""
    if kind not in ("load", "unload"):
        _settings(server, msg.sampling)
    job = Job(id=server.new_job_id(), kind=kind, client_id=msg.client_id, topic=topic, request=msg,
              conversation_id=cid, mode=mode, owner=server.peer)
    return server.scheduler.submit(job)


# ---------------------------------------------------------------- the daemon
@handles(m.Ping)
def _ping(server, msg):
    return m.Pong(pid=os.getpid(), uptime=time.time() - server.started), []


@handles(m.Status)
def _status(server, msg):
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("rwkv-chat")
    except PackageNotFoundError:
        ver = "unknown"
    snap = server.scheduler.snapshot()
    paths = server.paths
    return m.StatusReply(
        pid=os.getpid(), version=ver, protocol=p.PROTOCOL_VERSION, uptime=time.time() - server.started,
        model={**server.host.info(), **server.scheduler.keep_alive_info()}, memory=memory(), devices=devices(), active=snap["active"], queued=snap["queued"],
        clients=sum(1 for t in server.last_seen.values() if time.time() - t < server.config.daemon.client_timeout),
        home={"config": str(paths.config_dir), "data": str(paths.data_dir), "cache": str(paths.cache_dir),
              "runtime": str(paths.runtime_dir), "dropped_frames": server.dropped,
              "sessions": server.sessions.stats()},
        prefix_cache=server.sessions.prefix.stats(), store_revision=server.store.revision()), []


@handles(m.Probe)
def _probe(server, msg):
    server.publish(check_topic(msg.topic), m.ProbeAck(nonce=msg.nonce))
    return m.Ok(), []


@handles(m.Shutdown)
def _shutdown(server, msg):
    server.stop()
    return m.Ok(), []


# ---------------------------------------------------------------- generations
#: the generations whose events go to a topic the request names: request type -> job kind
TOPIC_JOBS = {m.Load: "load", m.Unload: "unload", m.Complete: "complete", m.ChatMessages: "messages"}


@handles(*TOPIC_JOBS)
def _topic_job(server, msg):
    return _generation(server, msg, TOPIC_JOBS[type(msg)], check_topic(msg.topic)), []


@handles(m.Chat)
def _chat(server, msg):
    cid = check_conversation_id(msg.conversation_id)      # a new conversation is made when the reply starts
    return _generation(server, msg, "chat", cid, cid, "chat"), []


@handles(m.Regenerate, m.EditLastUser)
def _redo(server, msg):
    cid = check_conversation_id(msg.conversation_id)
    mode = "regenerate" if isinstance(msg, m.Regenerate) else "edit"
    redo_target(server.store, server.store.get(cid).id, mode, msg.turn)    # checked again when it starts
    return _generation(server, msg, "chat", cid, cid, mode), []


@handles(m.Draft)
def _draft(server, msg):
    server.sessions.drafts.update(check_conversation_id(msg.conversation_id), msg.text)
    server.scheduler.poke()
    return m.Ok(), []


@handles(m.Cancel)
def _cancel(server, msg):
    if msg.conversation_id:
        check_conversation_id(msg.conversation_id)
    server.scheduler.cancel(job_id=msg.job_id, conversation_id=msg.conversation_id)
    return m.Ok(), []


# ---------------------------------------------------------------- conversations
@handles(m.ListConversations)
def _list(server, msg):
    items = server.store.list(msg.offset, msg.limit or MAX_PAGE)
    return m.ConversationList(items=items, total=server.store.count(), offset=msg.offset), []


@handles(m.GetConversation)
def _get(server, msg):
    return _detail(server, msg.conversation_id, msg.turn_offset, msg.branches, msg.context), []


@handles(m.FindConversation)
def _find(server, msg):
    return m.ConversationList(items=server.store.find(msg.query, msg.limit)), []


@handles(m.CreateConversation)
def _create(server, msg):
    cid = check_conversation_id(msg.conversation_id) if msg.conversation_id else new_conversation_id()
    server.store.create(cid, title=msg.title, system_prompt=msg.system_prompt,
                        sampling=_settings(server, msg.sampling))
    return _detail(server, cid), []


@handles(m.RenameConversation)
def _rename(server, msg):
    server.store.update(msg.conversation_id, title=msg.title)
    return m.Ok(), []


@handles(m.DeleteConversation)
def _delete(server, msg):
    check_conversation_id(msg.conversation_id)
    server.scheduler.cancel(conversation_id=msg.conversation_id)
    server.sessions.drop(msg.conversation_id)
    if server.sessions.drafts is not None:
        server.sessions.drafts.forget(msg.conversation_id)
    server.store.delete(msg.conversation_id)
    return m.Ok(), []


@handles(m.SetSystemPrompt)
def _set_system_prompt(server, msg):
    c = server.store.get(msg.conversation_id)
    if msg.text == c.system_prompt:
        return m.Ok(), []
    server.store.update(c.id, system_prompt=msg.text, state_stale=int(c.turns > 0))
    server.sessions.drop(c.id)
    server.store.drop_states(c.id)          # every state consumed the old prompt (and a reply running now saves none)
    return m.Ok(), []


@handles(m.SetSampling)
def _set_sampling(server, msg):
    c = server.store.get(msg.conversation_id)
    server.store.update(c.id, sampling={**c.sampling, **_settings(server, msg.sampling)})
    return m.Ok(), []


@handles(m.Export)
def _export(server, msg):
    c = server.store.get(msg.conversation_id)
    which = msg.branches or ("all" if msg.fmt == "json" else "current")
    if which not in ("all", "current"):
        raise ValueError(f"unknown branches {quote(which)} (all or current)")
    tree = tree_page(server.store, c.id, 0, -1, m.MAX_TEXT)[0] if which == "all" else None
    text = export_conversation(c, server.store.turns(c.id), msg.fmt, tree)
    page = text[msg.offset:msg.offset + EXPORT_PAGE_CHARS]
    return m.ExportReply(fmt=msg.fmt, text=page, offset=msg.offset, total=len(text)), []


@handles(m.ListBranches)
def _branches(server, msg):
    turns, total = tree_page(server.store, msg.conversation_id, msg.offset, BRANCH_PAGE)
    leaf = server.store.leaf(msg.conversation_id)
    return m.BranchList(turns=turns, leaf=leaf, total=total, offset=msg.offset), []


@handles(m.SwitchBranch)
def _switch_branch(server, msg):
    switch_branch(server.store, msg.conversation_id, msg.turn, msg.step)
    return _detail(server, msg.conversation_id, context=msg.context), []


@handles(m.DeleteBranch)
def _delete_branch(server, msg):
    delete_branch(server.store, msg.conversation_id, msg.turn)
    server.sessions.drop(msg.conversation_id)
    return _detail(server, msg.conversation_id, context=msg.context), []


@handles(m.GetState)
def _get_state(server, msg):
    from rwkv_chat.models import State

    c = server.store.get(msg.conversation_id)
    state = State.load(server.store.state_path(c.id, server.store.leaf(c.id), c.model_fingerprint))
    tensors = {f"layers.{i}.{n}": t for i, layer in enumerate(state.layers) for n, t in zip(state.names, layer)}
    metas, bufs = p.tensor_frames(tensors)
    meta = {**state.metadata, "version": state.version, "fingerprint": state.fingerprint,
            "token_count": str(state.token_count)}
    return m.StateReply(metadata=meta, tensors=metas), bufs
