"""Client library of the rwkv-chat daemon, used by the CLI and the Textual UI.

Contract
--------
* ``Client(paths=None, autostart=True, timeout=10.0)`` — ``heartbeat`` and ``lost_after`` (seconds) default
  to the config's ``[daemon] heartbeat`` and ``daemon_timeout`` (0.5 and 2.5). Connects lazily on first use;
  if no daemon runs for the home (``RWKV_CHAT_HOME`` or platformdirs) and ``autostart`` is true, starts one
  in the background and waits until it answers (``spawned`` is then true). Raises :class:`DaemonUnavailable`
  when that fails, and :class:`DaemonNotResponding` (within about 2 s) when a daemon holds the home but does
  not answer (stopped with SIGSTOP, hung).
* Requests (``status``, ``conversations``, ``conversation``, ``find``, ``create_conversation``, ``rename``, ``delete``,
  ``set_system_prompt``, ``set_sampling``, ``export``, ``cancel``, ``get_state``) return plain values or
  message structs of :mod:`rwkv_chat.daemon.protocol.messages`; a daemon-side failure raises :class:`DaemonError`
  (``.kind`` e.g. "NotFound", "InvalidId", "StateError", "LimitError" for a field beyond the protocol's
  limits), a full queue :class:`BusyError`, no reply within ``timeout`` seconds :class:`DaemonUnavailable`,
  no sign of life from the daemon (replies, events, pongs of the heartbeat thread) for ``lost_after`` seconds
  while waiting :class:`DaemonLost`. ``conversations``, ``conversation`` and ``export`` fetch every page the
  daemon sends them in (listings are summaries: long titles and system prompts cut, ``truncated`` set;
  ``conversation`` has them whole; its turns with their place in the tree: ``parent``, ``branch`` of
  ``branches``). The tree: ``branches`` (every turn, summaries), ``switch_branch``, ``delete_branch`` (both
  return the conversation's new path); ``draft`` sends the message being typed (read ahead by the daemon).
* Generations (``complete``, ``chat``, ``chat_messages``, ``regenerate``, ``edit_last_user``, ``load``) return
  a generator of events: ``Queued`` (position in the queue while it waits for a place, also when a long generation yields
  its place for a while: ``[daemon] time_slice``), ``Started``, ``Progress`` (phase "load"/"prefill",
  done/total), ``Token`` (text), and finally ``Done`` (reason "stop"/"length"/"cancelled"/"loaded", full
  text — joined from the Token events where the daemon sent it cut, ``truncated`` — token counts, tokens/s;
  for a chat also how its prompt was read: ``reread_tokens``, ``cached_tokens``, ``draft_tokens``, from the
  ``PromptReuse`` event before it).
  A ``Failed`` event raises :class:`GenerationFailed` (``.kind`` e.g. "OOM", "StateError", "NoModel",
  "QueueTimeout"). A daemon that stops (``rwkv-chat daemon stop``) ends running generations with
  ``Done(reason="cancelled")``. Closing the
  generator early (``close()``, ``break``, KeyboardInterrupt) cancels the generation in the daemon. If the
  daemon stops sending anything (heartbeats included) for ``lost_after`` seconds, :class:`DaemonLost`.
* ``subscribe(conversation_id)`` yields every event published on that conversation (any client's
  generation) until the generator is closed; ``watch_timeout`` bounds each wait (yields None on idle).
* A background thread sends heartbeats (``connected``: the daemon was heard within ``lost_after`` s);
  the daemon cancels generations of a client whose heartbeats stop.

Threads: methods may be called from any thread; requests are serialized by a lock. Consume one event
generator per Client at a time (the UI: one Client per worker that streams).
"""

from __future__ import annotations

import secrets
import threading
import time

import zmq

from rwkv_chat.daemon.paths import Paths, get_paths

from . import protocol as p
from .errors import (BusyError, DaemonError, DaemonLost, DaemonNotResponding, DaemonUnavailable,  # noqa: F401
                     GenerationFailed)
from .launcher import _secure, _silent_state, lock_held, not_responding, ping, spawn_daemon  # noqa: F401
from .protocol import messages as m


def _sampling(kw: dict) -> m.SamplingSettings:
    from rwkv_chat.daemon.config import SAMPLING_KEYS

    unknown = set(kw) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown sampling settings {sorted(unknown)}")
    return {k: v for k, v in kw.items() if v is not None}


class Client:
    """See the module docstring for the contract."""

    def __init__(self, paths: Paths | None = None, *, autostart: bool = True, timeout: float = 10.0,
                 heartbeat: float | None = None, lost_after: float | None = None):
        self.paths = paths or get_paths()
        self.autostart = autostart
        self.timeout = timeout
        if heartbeat is None or lost_after is None:
            from rwkv_chat.daemon.config import ConfigError, DaemonConfig, load_config

            try:
                d = load_config(self.paths.config_file).daemon
            except ConfigError:
                d = DaemonConfig()
            heartbeat = d.heartbeat if heartbeat is None else heartbeat
            lost_after = d.daemon_timeout if lost_after is None else lost_after
        self.heartbeat = heartbeat
        self.lost_after = lost_after
        self.heard = 0.0                  # monotonic time the daemon was last heard (reply, event or pong)
        self.client_id = "k" + secrets.token_hex(8)
        self.info: p.ConnectionInfo | None = None
        self.connected = False
        self.spawned = False          # this client started the daemon (autostart)
        self.last_event = 0.0
        self._ctx = zmq.Context()
        self._lock = threading.RLock()
        self._req = self._sub = None
        self._topics: dict[str, int] = {}
        self._hb_thread = None
        self._closing = threading.Event()

    # ---------------------------------------------------------------- connection
    def connect(self) -> "Client":
        with self._lock:
            if self.info is not None:
                return self
            info = None
            if lock_held(self.paths.lock_file):
                info = ping(self.paths, timeout=min(1.0, self.timeout))
                if info is None and _silent_state(self.paths).state == "not responding":
                    info = ping(self.paths, timeout=min(1.0, self.timeout))     # a second chance
                    st = _silent_state(self.paths)
                    if info is None and st.state == "not responding":
                        raise not_responding(st, self.paths)
            if info is None:
                if not self.autostart:
                    raise DaemonUnavailable(f"no daemon is running for {self.paths.runtime_dir}")
                running = lock_held(self.paths.lock_file)      # one still starting up, not ours
                info = spawn_daemon(self.paths)
                self.spawned = not running
            self.info = info
            self.heard = time.monotonic()
            self._codec_req = p.Codec(info.key_bytes)
            self._codec_sub = p.Codec(info.key_bytes)
            self._open_req()
            self._sub = self._ctx.socket(zmq.SUB)
            self._sub.setsockopt(zmq.LINGER, 0)
            self._sub.setsockopt(zmq.RCVHWM, 100_000)
            _secure(self._sub, info)
            self._sub.connect(info.events)
            self._sub.setsockopt(zmq.SUBSCRIBE, m.DAEMON_TOPIC.encode())
            self.connected = True
            self._hb_thread = threading.Thread(target=self._heartbeats, name="rwkv-chat-heartbeat", daemon=True)
            self._hb_thread.start()
            return self

    def _open_req(self) -> None:
        if self._req is not None:
            self._req.close(linger=0)
        self._req = self._ctx.socket(zmq.DEALER)
        self._req.setsockopt(zmq.LINGER, 0)
        _secure(self._req, self.info)
        self._req.connect(self.info.request)

    def close(self) -> None:
        self._closing.set()
        if self._hb_thread is not None:
            self._hb_thread.join(2 * self.heartbeat + 1)
        with self._lock:
            self._ctx.destroy(linger=0)
            self.info = None
            self.connected = False

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def _heartbeats(self) -> None:
        """The heartbeat thread: a Ping every ``heartbeat`` seconds (the daemon keeps this client's
        generations while they come); every Pong, however late, marks the daemon as heard. ``connected``:
        heard within ``lost_after`` seconds."""
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        _secure(s, self.info)
        s.connect(self.info.request)
        codec = p.Codec(self.info.key_bytes)
        try:
            next_ping = 0.0
            while not self._closing.is_set():
                now = time.monotonic()
                if now >= next_ping:
                    next_ping = now + self.heartbeat
                    try:      # never block: with the daemon gone a DEALER may have no peer to queue for
                        s.send_multipart(codec.build(m.Ping(client_id=self.client_id)), zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    self.connected = now - self.heard < self.lost_after
                if s.poll(int(max(0.0, min(0.05, next_ping - time.monotonic())) * 1000) + 1):
                    try:
                        reply, _ = codec.parse(s.recv_multipart())
                    except p.ProtocolError:
                        continue
                    if isinstance(reply, m.Pong):
                        self.heard = time.monotonic()
                        self.connected = True
        except zmq.ZMQError:
            pass
        finally:
            s.close(linger=0)

    # ---------------------------------------------------------------- requests
    def request(self, msg: m.Msg, timeout: float | None = None, buffers: bool = False):
        """Send ``msg`` and return the reply (``(reply, buffers)`` with ``buffers``). Raises DaemonError (the
        daemon's Error reply, by ``kind``), BusyError, DaemonUnavailable (no reply within ``timeout`` seconds,
        default the client's) or DaemonLost (nothing from the daemon, pongs included, for ``lost_after``
        seconds, at least 3 heartbeats, while waiting)."""
        self.connect()
        timeout = self.timeout if timeout is None else timeout
        with self._lock:
            self._req.send_multipart(self._codec_req.build(msg))
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._open_req()
                    raise DaemonUnavailable(f"no reply to {type(msg).__name__} within {timeout:.1f} s")
                if not self._req.poll(int(min(left, 0.1) * 1000)):
                    silent = time.monotonic() - max(self.heard, self.last_event)
                    if silent > max(self.lost_after, 3 * self.heartbeat):
                        self._open_req()
                        self.connected = False
                        raise DaemonLost(f"no reply to {type(msg).__name__}: {self._silence(silent)}")
                    continue
                try:
                    reply, bufs = self._codec_req.parse(self._req.recv_multipart(copy=False))
                    break
                except p.ProtocolError:
                    continue
            self.heard = time.monotonic()
        if isinstance(reply, m.Busy):
            raise BusyError(reply)
        if isinstance(reply, m.Error):
            raise DaemonError(reply.kind, reply.message)
        return (reply, bufs) if buffers else reply

    def ping(self) -> bool:
        try:
            return isinstance(self.request(m.Ping(client_id=self.client_id), timeout=2.0), m.Pong)
        except DaemonError:
            return False

    def status(self) -> dict:
        import msgspec

        return msgspec.to_builtins(self.request(m.Status(client_id=self.client_id)))

    def shutdown(self) -> None:
        self.request(m.Shutdown())

    def conversations(self) -> list[m.ConversationInfo]:
        """Summaries of every conversation, most recently updated first (fetched page by page)."""
        items, seen, offset = [], set(), 0
        while True:
            page = self.request(m.ListConversations(offset=offset, limit=m.MAX_PAGE))
            for it in page.items:
                if it.id not in seen:
                    seen.add(it.id)
                    items.append(it)
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return items

    def conversation(self, conversation_id: str, context: bool = False) -> m.ConversationDetail:
        """The conversation and all its turns (fetched page by page); with ``context``, the context in use on
        the loaded model too (``context_used`` of ``context_limit`` tokens; None without a limit)."""
        return self._whole(self.request(m.GetConversation(conversation_id=conversation_id, branches=True,
                                                          context=context)))

    def find(self, query: str, limit: int = 10) -> list[m.ConversationInfo]:
        """The conversations ``query`` names: the one with that id; else those with that title; else those whose
        id starts with it (see :class:`~rwkv_chat.daemon.protocol.messages.FindConversation`)."""
        return self.request(m.FindConversation(query=query, limit=limit)).items

    def create_conversation(self, title: str = "", system_prompt: str = "", conversation_id: str = "",
                            **sampling) -> m.ConversationInfo:
        return self.request(m.CreateConversation(conversation_id=conversation_id, title=title,
                                                 system_prompt=system_prompt, sampling=_sampling(sampling))).conversation

    def rename(self, conversation_id: str, title: str) -> None:
        self.request(m.RenameConversation(conversation_id=conversation_id, title=title))

    def delete(self, conversation_id: str) -> None:
        self.request(m.DeleteConversation(conversation_id=conversation_id))

    def set_system_prompt(self, conversation_id: str, text: str) -> None:
        self.request(m.SetSystemPrompt(conversation_id=conversation_id, text=text))

    def set_sampling(self, conversation_id: str, **sampling) -> None:
        self.request(m.SetSampling(conversation_id=conversation_id, sampling=_sampling(sampling)))

    def export(self, conversation_id: str, fmt: str = "md", branches: str = "") -> str:
        """The whole export ("md" or "json"), fetched page by page; ``branches`` "all" (every branch) or
        "current" (the chosen path); "" = json all, md current."""
        parts, offset = [], 0
        while True:
            page = self.request(m.Export(conversation_id=conversation_id, fmt=fmt, offset=offset, branches=branches))
            parts.append(page.text)
            offset += len(page.text)
            if not page.text or offset >= page.total:
                return "".join(parts)

    def branches(self, conversation_id: str) -> m.BranchList:
        """Every turn of the conversation's tree (texts cut to summaries), fetched page by page."""
        first = self.request(m.ListBranches(conversation_id=conversation_id))
        turns = list(first.turns)
        while turns and len(turns) < first.total:
            page = self.request(m.ListBranches(conversation_id=conversation_id, offset=turns[-1].index + 1))
            if not page.turns:
                break
            turns += page.turns
        return m.BranchList(turns=turns, leaf=first.leaf, total=first.total)

    def context(self, conversation_id: str) -> tuple[int | None, int | None]:
        """``(used, limit)``: tokens of the conversation's context in use on the loaded model (what its next
        message starts from) and the model's context limit; ``(None, None)`` without a model or a limit."""
        d = self.request(m.GetConversation(conversation_id=conversation_id, context=True))
        return d.context_used, d.context_limit

    def _whole(self, detail: m.ConversationDetail) -> m.ConversationDetail:
        """``detail`` with the rest of its turns, fetched page by page (its context fields kept)."""
        turns = list(detail.turns)
        while turns and len(turns) < detail.conversation.turns:
            page = self.request(m.GetConversation(conversation_id=detail.conversation.id,
                                                  turn_offset=turns[-1].index + 1, branches=True))
            if not page.turns:
                break
            turns += page.turns
        return m.ConversationDetail(conversation=detail.conversation, turns=turns, context_used=detail.context_used,
                                    context_limit=detail.context_limit)

    def switch_branch(self, conversation_id: str, turn: int, step: int = 0,
                      context: bool = False) -> m.ConversationDetail:
        """Choose the sibling ``step`` places from the turn ``turn`` (and the newest path below it); returns
        the conversation with its new path (``context``: and its context in use, as :meth:`conversation`)."""
        return self._whole(self.request(m.SwitchBranch(conversation_id=conversation_id, turn=turn, step=step,
                                                       context=context)))

    def delete_branch(self, conversation_id: str, turn: int, context: bool = False) -> m.ConversationDetail:
        """Delete the turn ``turn`` and every turn below it (their states too); returns the conversation left
        (``context``: and its context in use, as :meth:`conversation`)."""
        return self._whole(self.request(m.DeleteBranch(conversation_id=conversation_id, turn=turn,
                                                       context=context)))

    def draft(self, conversation_id: str, text: str) -> None:
        """The draft of the next message of ``conversation_id`` as typed so far ("" clears it): the daemon may
        read it ahead so that the message, once sent, reads only its remainder."""
        self.request(m.Draft(client_id=self.client_id, conversation_id=conversation_id, text=text))

    def cancel(self, job_id: str = "", conversation_id: str = "") -> None:
        self.request(m.Cancel(job_id=job_id, conversation_id=conversation_id))

    def get_state(self, conversation_id: str) -> tuple[dict, dict]:
        """``(metadata, tensors)`` of the conversation's saved state (tensors: name -> CPU tensor)."""
        reply, bufs = self.request(m.GetState(conversation_id=conversation_id), timeout=60, buffers=True)
        return reply.metadata, p.frames_to_tensors(reply.tensors, bufs)

    # ---------------------------------------------------------------- events
    def _subscribe(self, topic: str) -> None:
        self.connect()
        self._topics[topic] = self._topics.get(topic, 0) + 1
        if self._topics[topic] > 1:
            return
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        nonce = secrets.token_hex(8)      # probe until an event on the topic arrives: the subscription is live
        deadline = time.monotonic() + self.timeout
        wait = 0.005                      # a new subscription is usually live within milliseconds: probe
        while time.monotonic() < deadline:   # again soon, then less often (up to every 0.2 s)
            self.request(m.Probe(topic=topic, nonce=nonce))
            end = time.monotonic() + wait
            wait = min(0.2, wait * 2)
            while time.monotonic() < end:
                ev = self._next_event(min(0.05, max(0.0, end - time.monotonic())))
                if ev is not None and isinstance(ev[1], m.ProbeAck) and ev[1].nonce == nonce:
                    return
        raise DaemonUnavailable(f"could not subscribe to {topic}")

    def _unsubscribe(self, topic: str) -> None:
        n = self._topics.get(topic, 0) - 1
        if n <= 0:
            self._topics.pop(topic, None)
            if self._sub is not None and not self._sub.closed:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, topic.encode())
        else:
            self._topics[topic] = n

    def _next_event(self, timeout: float):
        """``(topic, event)`` or None after ``timeout`` s; raises DaemonLost after ``lost_after`` s of silence."""
        if self._sub.poll(int(timeout * 1000)):
            try:
                topic, ev, _ = self._codec_sub.parse(self._sub.recv_multipart(copy=False), topic=True)
            except p.ProtocolError:
                return None
            self.last_event = time.monotonic()
            return topic.decode(), ev
        if self.last_event and time.monotonic() - self.last_event > self.lost_after:
            self.connected = False
            raise DaemonLost(self._silence(self.lost_after))
        return None

    def _silence(self, seconds: float) -> str:
        """Why the daemon has been silent for ``seconds``: it is gone (stopped, killed; its lock is free), or
        it holds its lock and sends nothing (stopped with SIGSTOP, hung)."""
        pid = self.info.pid if self.info is not None else "?"
        if not lock_held(self.paths.lock_file):
            return f"the daemon (pid {pid}) is no longer running"
        return f"the daemon (pid {pid}) sent nothing for {seconds:.1f} s"

    def subscribe(self, conversation_id: str, watch_timeout: float = 0.5):
        """Yield every event published on ``conversation_id`` (None when idle for ``watch_timeout`` s)."""
        self._subscribe(conversation_id)
        self.last_event = time.monotonic()
        try:
            while True:
                ev = self._next_event(watch_timeout)
                if ev is None:
                    yield None
                elif ev[0] == conversation_id and not isinstance(ev[1], m.ProbeAck):
                    yield ev[1]
        finally:
            self._unsubscribe(conversation_id)

    def _stream(self, topic: str, msg: m.Msg):
        self._subscribe(topic)
        job_id = None
        pieces: list[str] = []
        reuse = None                  # the job's PromptReuse event: its counts go into the Done yielded
        try:
            accepted = self.request(msg)
            job_id = accepted.job_id
            self.last_event = time.monotonic()
            while True:
                ev = self._next_event(0.25)
                if ev is None or ev[0] != topic or getattr(ev[1], "job_id", None) != job_id:
                    continue
                ev = ev[1]
                if isinstance(ev, m.Failed):
                    job_id = None
                    raise GenerationFailed(ev.kind, ev.message)
                if isinstance(ev, m.PromptReuse):
                    reuse = ev
                if isinstance(ev, m.Token):
                    pieces.append(ev.text)
                elif isinstance(ev, m.Done) and ev.truncated:      # too long for one event: the Tokens have it
                    import msgspec

                    whole = "".join(pieces)
                    whole = (whole.strip() if isinstance(msg, (m.Chat, m.Regenerate, m.EditLastUser, m.ChatMessages))
                             else whole)
                    if whole.startswith(ev.text):
                        ev = msgspec.structs.replace(ev, text=whole, truncated=False)
                if isinstance(ev, m.Done) and reuse is not None:
                    import msgspec

                    ev = msgspec.structs.replace(ev, reread_tokens=reuse.reread_tokens,
                                                 cached_tokens=reuse.cached_tokens, draft_tokens=reuse.draft_tokens)
                if isinstance(ev, m.Done):
                    job_id = None        # over: a caller that stops at the Done has nothing to cancel
                    yield ev
                    return
                yield ev
        finally:
            if job_id is not None and self.info is not None:
                try:
                    self.request(m.Cancel(job_id=job_id), timeout=2.0)
                except DaemonError:
                    pass
            if self.info is not None:
                self._unsubscribe(topic)

    def _topic(self) -> str:
        return "job-" + secrets.token_hex(8)

    def load(self, path: str, strategy: str):
        """Load (or switch to) a model: events Started, Progress(phase="load"), Done(reason="loaded")."""
        return self._stream(t := self._topic(), m.Load(client_id=self.client_id, topic=t, path=str(path),
                                                        strategy=strategy))

    def unload(self):
        """Unload the model (it loads again on the next request that needs it): events Started,
        Done(reason="unloaded")."""
        return self._stream(t := self._topic(), m.Unload(client_id=self.client_id, topic=t))

    def complete(self, prompt: str, stop: list[str] | None = None, **sampling):
        """Raw completion of ``prompt`` from the zero state (sampling: temperature, top_p, top_k, seed, …)."""
        return self._stream(t := self._topic(), m.Complete(client_id=self.client_id, topic=t, prompt=prompt,
                                                            stop=list(stop or []), sampling=_sampling(sampling)))

    def chat_messages(self, messages: list, stop: list[str] | None = None, **sampling):
        """A stateless chat completion: the reply to ``messages`` (``ChatMessage`` structs or ``(role, content)``
        pairs, ending with a user message), no conversation stored. Its Done's ``cached_tokens`` says how many
        prompt tokens came from the daemon's prefix cache."""
        msgs = [x if isinstance(x, m.ChatMessage) else m.ChatMessage(role=x[0], content=x[1]) for x in messages]
        return self._stream(t := self._topic(), m.ChatMessages(client_id=self.client_id, topic=t, messages=msgs,
                                                                stop=list(stop or []), sampling=_sampling(sampling)))

    def chat(self, conversation_id: str, message: str, **sampling):
        """One chat exchange in ``conversation_id`` (created if missing)."""
        return self._stream(conversation_id, m.Chat(client_id=self.client_id, conversation_id=conversation_id,
                                                    message=message, sampling=_sampling(sampling)))

    def regenerate(self, conversation_id: str, turn: int = -1, **sampling):
        """A new reply beside the reply ``turn`` (-1: the last of the chosen path; a daemon error "Conflict"
        when it is not a reply), from the state saved before its message: another branch, chosen."""
        return self._stream(conversation_id, m.Regenerate(client_id=self.client_id, conversation_id=conversation_id,
                                                          sampling=_sampling(sampling), turn=turn))

    def edit_last_user(self, conversation_id: str, text: str, turn: int = -1, **sampling):
        """``text`` beside the user message ``turn`` (-1: the last of the chosen path; "Conflict" when it is not
        a user message) with a new reply: another branch, chosen."""
        return self._stream(conversation_id, m.EditLastUser(client_id=self.client_id, conversation_id=conversation_id,
                                                            text=text, sampling=_sampling(sampling), turn=turn))
