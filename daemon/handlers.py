"""Request handlers of the daemon's main loop: one function per request type -> (reply, raw buffers)."""

from __future__ import annotations

import os
import re
import resource
import time

from . import messages as m
from . import protocol as p
from .jobs import Job
from .store import Conversation, check_conversation_id, export_conversation, new_conversation_id

TOPIC_RE = re.compile(r"[A-Za-z0-9~][A-Za-z0-9_~-]{0,127}")


def _check_topic(topic: str) -> str:
    if not TOPIC_RE.fullmatch(topic):
        raise ValueError(f"invalid topic {topic!r}")
    return topic


def _sampling_dict(s: m.Sampling) -> dict:
    return {f: getattr(s, f) for f in s.__struct_fields__ if getattr(s, f) is not None}


def conv_info(c: Conversation) -> m.ConversationInfo:
    return m.ConversationInfo(id=c.id, title=c.title, created=c.created, updated=c.updated,
                              system_prompt=c.system_prompt, sampling=c.sampling,
                              model_fingerprint=c.model_fingerprint, turns=c.turns)


def _detail(server, cid: str) -> m.ConversationDetail:
    c = server.store.get(cid)
    turns = [m.TurnInfo(index=t.index, role=t.role, text=t.text, tokens=t.tokens, created=t.created,
                        finished=t.finished) for t in server.store.turns(cid)]
    return m.ConversationDetail(conversation=conv_info(c), turns=turns)


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
        model=snap["model"], memory=memory(), devices=devices(), active=snap["active"], queued=snap["queued"],
        clients=sum(1 for t in server.last_seen.values() if time.time() - t < server.config.daemon.client_timeout),
        home={"config": str(paths.config_dir), "data": str(paths.data_dir), "cache": str(paths.cache_dir),
              "runtime": str(paths.runtime_dir), "dropped_frames": server.dropped,
              "sessions": snap["sessions"]})


def _generation(server, msg, kind: str, topic: str, cid: str = "", mode: str = ""):
    job = Job(id=server.new_job_id(), kind=kind, client_id=msg.client_id, topic=topic, request=msg,
              conversation_id=cid, mode=mode)
    return server.scheduler.submit(job)


def handle(server, msg) -> tuple[m.Msg, list]:
    store = server.store
    if isinstance(msg, m.Ping):
        return m.Pong(pid=os.getpid(), uptime=time.time() - server.started), []
    if isinstance(msg, m.Status):
        return _status(server, msg), []
    if isinstance(msg, m.Probe):
        server.publish(_check_topic(msg.topic), m.ProbeAck(nonce=msg.nonce))
        return m.Ok(), []
    if isinstance(msg, m.Load):
        return _generation(server, msg, "load", _check_topic(msg.topic)), []
    if isinstance(msg, m.Complete):
        return _generation(server, msg, "complete", _check_topic(msg.topic)), []
    if isinstance(msg, m.Chat):
        cid = check_conversation_id(msg.conversation_id)
        if not store.exists(cid):
            store.create(cid, title=msg.message[:60].splitlines()[0] if msg.message.strip() else "")
        return _generation(server, msg, "chat", cid, cid, "chat"), []
    if isinstance(msg, (m.Regenerate, m.EditLastUser)):
        cid = check_conversation_id(msg.conversation_id)
        store.get(cid)
        mode = "regenerate" if isinstance(msg, m.Regenerate) else "edit"
        return _generation(server, msg, "chat", cid, cid, mode), []
    if isinstance(msg, m.Cancel):
        if msg.conversation_id:
            check_conversation_id(msg.conversation_id)
        server.scheduler.cancel(job_id=msg.job_id, conversation_id=msg.conversation_id)
        return m.Ok(), []
    if isinstance(msg, m.ListConversations):
        return m.ConversationList(items=[conv_info(c) for c in store.list()]), []
    if isinstance(msg, m.GetConversation):
        return _detail(server, msg.conversation_id), []
    if isinstance(msg, m.CreateConversation):
        cid = check_conversation_id(msg.conversation_id) if msg.conversation_id else new_conversation_id()
        store.create(cid, title=msg.title, system_prompt=msg.system_prompt, sampling=_sampling_dict(msg.sampling))
        return _detail(server, cid), []
    if isinstance(msg, m.RenameConversation):
        store.update(msg.conversation_id, title=msg.title)
        return m.Ok(), []
    if isinstance(msg, m.DeleteConversation):
        check_conversation_id(msg.conversation_id)
        server.scheduler.cancel(conversation_id=msg.conversation_id)
        server.scheduler.sessions.drop(msg.conversation_id)
        store.delete(msg.conversation_id)
        return m.Ok(), []
    if isinstance(msg, m.SetSystemPrompt):
        c = store.get(msg.conversation_id)
        store.update(c.id, system_prompt=msg.text, state_stale=int(c.turns > 0))
        server.scheduler.sessions.drop(c.id)
        return m.Ok(), []
    if isinstance(msg, m.SetSampling):
        c = store.get(msg.conversation_id)
        store.update(c.id, sampling={**c.sampling, **_sampling_dict(msg.sampling)})
        return m.Ok(), []
    if isinstance(msg, m.Export):
        c = store.get(msg.conversation_id)
        return m.ExportReply(fmt=msg.fmt, text=export_conversation(c, store.turns(c.id), msg.fmt)), []
    if isinstance(msg, m.GetState):
        from rwkv_chat.models.state import State

        c = store.get(msg.conversation_id)
        state = State.load(store.state_path(c.id, c.state_n))
        tensors = {f"layers.{i}.{n}": t for i, layer in enumerate(state.layers) for n, t in zip(state.names, layer)}
        metas, bufs = p.tensor_frames(tensors)
        meta = {**state.metadata, "version": state.version, "fingerprint": state.fingerprint,
                "token_count": str(state.token_count)}
        return m.StateReply(metadata=meta, tensors=metas), bufs
    if isinstance(msg, m.Shutdown):
        server._stop = True
        return m.Ok(), []
    return m.Error(kind="ProtocolError", message=f"{type(msg).__name__} is not a request"), []
