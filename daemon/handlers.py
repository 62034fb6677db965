"""Request handlers of the daemon's main loop: :data:`HANDLERS` maps each request type to its handler,
``handler(server, msg) -> (reply, raw buffers)``. Runs in the server thread; generations are queued on the
scheduler, everything else is answered at once."""

from __future__ import annotations

import os
import resource
import time
from typing import Callable

from .generation import Job
from .protocol import codec as p
from .protocol import messages as m
from .protocol.messages import check_conversation_id, check_topic, new_conversation_id
from .store import export_conversation

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
    return handler(server, msg)


def _settings(sampling: m.SamplingSettings) -> dict:
    """The given settings of ``sampling`` (None = not given). Raises SamplingError for an unknown name."""
    from rwkv_chat.daemon.config import SAMPLING_KEYS
    from rwkv_chat.models.text.sampling import SamplingError

    given = {k: v for k, v in sampling.items() if v is not None}
    unknown = sorted(set(given) - set(SAMPLING_KEYS))
    if unknown:
        raise SamplingError(f"unknown sampling settings {unknown} (known: {', '.join(SAMPLING_KEYS)})")
    return given


def _detail(server, cid: str) -> m.ConversationDetail:
    return m.ConversationDetail(conversation=server.store.get(cid), turns=server.store.turns(cid))


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
    job = Job(id=server.new_job_id(), kind=kind, client_id=msg.client_id, topic=topic, request=msg,
              conversation_id=cid, mode=mode)
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
        model=server.host.info(), memory=memory(), devices=devices(), active=snap["active"], queued=snap["queued"],
        clients=sum(1 for t in server.last_seen.values() if time.time() - t < server.config.daemon.client_timeout),
        home={"config": str(paths.config_dir), "data": str(paths.data_dir), "cache": str(paths.cache_dir),
              "runtime": str(paths.runtime_dir), "dropped_frames": server.dropped,
              "sessions": server.sessions.stats()}), []


@handles(m.Probe)
def _probe(server, msg):
    server.publish(check_topic(msg.topic), m.ProbeAck(nonce=msg.nonce))
    return m.Ok(), []


@handles(m.Shutdown)
def _shutdown(server, msg):
    server.stop()
    return m.Ok(), []


# ---------------------------------------------------------------- generations
@handles(m.Load)
def _load(server, msg):
    return _generation(server, msg, "load", check_topic(msg.topic)), []


@handles(m.Complete)
def _complete(server, msg):
    return _generation(server, msg, "complete", check_topic(msg.topic)), []


@handles(m.Chat)
def _chat(server, msg):
    cid = check_conversation_id(msg.conversation_id)      # a new conversation is made when the reply starts
    return _generation(server, msg, "chat", cid, cid, "chat"), []


@handles(m.Regenerate, m.EditLastUser)
def _redo(server, msg):
    cid = check_conversation_id(msg.conversation_id)
    server.store.get(cid)
    mode = "regenerate" if isinstance(msg, m.Regenerate) else "edit"
    return _generation(server, msg, "chat", cid, cid, mode), []


@handles(m.Cancel)
def _cancel(server, msg):
    if msg.conversation_id:
        check_conversation_id(msg.conversation_id)
    server.scheduler.cancel(job_id=msg.job_id, conversation_id=msg.conversation_id)
    return m.Ok(), []


# ---------------------------------------------------------------- conversations
@handles(m.ListConversations)
def _list(server, msg):
    return m.ConversationList(items=server.store.list()), []


@handles(m.GetConversation)
def _get(server, msg):
    return _detail(server, msg.conversation_id), []


@handles(m.CreateConversation)
def _create(server, msg):
    cid = check_conversation_id(msg.conversation_id) if msg.conversation_id else new_conversation_id()
    server.store.create(cid, title=msg.title, system_prompt=msg.system_prompt, sampling=_settings(msg.sampling))
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
    server.store.delete(msg.conversation_id)
    return m.Ok(), []


@handles(m.SetSystemPrompt)
def _set_system_prompt(server, msg):
    c = server.store.get(msg.conversation_id)
    server.store.update(c.id, system_prompt=msg.text, state_stale=int(c.turns > 0))
    server.sessions.drop(c.id)
    return m.Ok(), []


@handles(m.SetSampling)
def _set_sampling(server, msg):
    c = server.store.get(msg.conversation_id)
    server.store.update(c.id, sampling={**c.sampling, **_settings(msg.sampling)})
    return m.Ok(), []


@handles(m.Export)
def _export(server, msg):
    c = server.store.get(msg.conversation_id)
    return m.ExportReply(fmt=msg.fmt, text=export_conversation(c, server.store.turns(c.id), msg.fmt)), []


@handles(m.GetState)
def _get_state(server, msg):
    from rwkv_chat.models import State

    c = server.store.get(msg.conversation_id)
    state = State.load(server.store.state_path(c.id, c.state_n))
    tensors = {f"layers.{i}.{n}": t for i, layer in enumerate(state.layers) for n, t in zip(state.names, layer)}
    metas, bufs = p.tensor_frames(tensors)
    meta = {**state.metadata, "version": state.version, "fingerprint": state.fingerprint,
            "token_count": str(state.token_count)}
    return m.StateReply(metadata=meta, tensors=metas), bufs
