"""The daemon process: one per home (fcntl lock), a ROUTER for requests, a PUB for events.

The main loop (this module) does all socket I/O: it parses requests and answers each through the table of
handlers (:data:`rwkv_chat.daemon.handlers.HANDLERS`), forwards the scheduler's events to the PUB socket,
publishes heartbeats, and cancels the generations of clients that stopped sending heartbeats. The model
lives in the scheduler's inference thread (the :class:`~rwkv_chat.daemon.host.Host`).

Malformed, unsigned, tampered, replayed, stale, oversized or foreign-version frames are dropped and logged
(``ProtocolError``); the daemon keeps serving.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
import time
from pathlib import Path

import zmq

from rwkv_chat.daemon.config import Config
from rwkv_chat.daemon.paths import Paths, ensure_dirs

from . import handlers
from .generation import Job
from .host import Host, classify
from .launcher import acquire_lock
from .protocol import codec as p
from .protocol import connection
from .protocol import messages as m
from .scheduler import Scheduler
from .sessions import Sessions
from .store import Store

log = logging.getLogger("rwkv_chat.daemon")


class Server:
    def __init__(self, paths: Paths, config: Config, model: str | None = None, strategy: str | None = None):
        self.paths = ensure_dirs(paths)
        self.config = config
        self.model = model if model is not None else (config.model.path or None)
        self.strategy = strategy or config.model.strategy
        self.started = time.time()
        self.last_seen: dict[str, float] = {}
        self.dropped = 0
        self._stop = False
        self._events: list = []
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self._ev_lock = threading.Lock()

    # ---------------------------------------------------------------- events from any thread
    def emit(self, topic: str, event: m.Msg) -> None:
        with self._ev_lock:
            self._events.append((topic, event))
        try:
            os.write(self._wfd, b"x")
        except BlockingIOError:
            pass               # the pipe is full: the main loop is awake anyway

    def _flush_events(self) -> None:
        try:
            while os.read(self._rfd, 4096):
                pass
        except BlockingIOError:
            pass
        with self._ev_lock:
            events, self._events = self._events, []
        for topic, ev in events:
            self.publish(topic, ev)

    def publish(self, topic: str, ev: m.Msg) -> None:
        self.pub.send_multipart(self.codec_out.build(ev, topic=topic.encode()))

    # ---------------------------------------------------------------- set-up
    def _bind(self, ctx) -> tuple[str, str, str]:
        d = self.config.daemon
        self.router = ctx.socket(zmq.ROUTER)
        self.pub = ctx.socket(zmq.PUB)
        self.router.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE)
        self.router.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        public = ""
        if d.bind:
            have_curve = bool(d.curve_secret_key and d.curve_public_key)
            connection.check_bind(d.bind, have_curve)
            if have_curve:
                for s in (self.router, self.pub):
                    s.curve_server = True
                    s.curve_secretkey = d.curve_secret_key.encode()
                    s.curve_publickey = d.curve_public_key.encode()
                public = d.curve_public_key
            host, port = d.bind.rsplit(":", 1)
            req, ev = f"{host}:{port}", f"{host}:{int(port) + 1}"
            self.router.bind(req)
            self.pub.bind(ev)
            return req, ev, public
        eps = connection.default_endpoints(self.paths.runtime_dir)
        if eps is None:
            rp = self.router.bind_to_random_port("tcp://127.0.0.1")
            ep = self.pub.bind_to_random_port("tcp://127.0.0.1")
            return f"tcp://127.0.0.1:{rp}", f"tcp://127.0.0.1:{ep}", ""
        for e in eps:
            Path(e[len("ipc://"):]).unlink(missing_ok=True)     # stale sockets of a killed daemon
        self.router.bind(eps[0])
        self.pub.bind(eps[1])
        for e in eps:
            os.chmod(e[len("ipc://"):], 0o600)
        return eps[0], eps[1], ""

    def run(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT or a Shutdown request). Raises AlreadyRunning."""
        lock = acquire_lock(self.paths.lock_file)
        ctx = zmq.Context()
        conn = self.paths.connection_file
        try:
            conn.unlink(missing_ok=True)       # stale file of a killed daemon (we hold the lock)
            key = connection.new_key()
            self.codec_in = p.Codec(key)
            self.codec_out = p.Codec(key)
            req, ev, public = self._bind(ctx)
            d = self.config.daemon
            self.store = Store(self.paths.database, self.paths.states_dir)
            self.sessions = Sessions(self.store, d.resident_states, d.cpu_states)
            self.host = Host()
            self.scheduler = Scheduler(self.host, self.store, self.sessions, self.config, self.emit)
            self.scheduler.start()
            if self.model:
                self.scheduler.submit(Job(id="startup-load", kind="load", client_id="", topic=m.DAEMON_TOPIC,
                                          request=m.Load(client_id="", topic=m.DAEMON_TOPIC, path=self.model,
                                                         strategy=self.strategy)))
            connection.write_connection_file(conn, connection.ConnectionInfo(
                request=req, events=ev, key=key.hex(), pid=os.getpid(), server_public_key=public,
                started=self.started))
            log.info("daemon %d serving %s (events %s)", os.getpid(), req, ev)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            self._loop()
        finally:
            if hasattr(self, "scheduler"):
                self.scheduler.stop()
            if hasattr(self, "host"):
                self.host.close()
            try:
                info = connection.read_connection_file(conn)
                if info.pid == os.getpid():
                    conn.unlink(missing_ok=True)
                    for path in connection.ipc_paths(info):
                        path.unlink(missing_ok=True)
            except (OSError, p.ProtocolError):
                pass
            ctx.destroy(linger=0)
            lock.close()
            log.info("daemon %d stopped", os.getpid())
        return 0

    def _on_signal(self, signum, frame) -> None:
        self._stop = True
        self.emit("", m.Ok())  # wake the loop (an Ok on the empty topic is harmless)

    # ---------------------------------------------------------------- the loop
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self._rfd, zmq.POLLIN)
        hb = self.config.daemon.heartbeat
        next_hb = 0.0
        while not self._stop:
            try:
                next_hb = self._iteration(poller, hb, next_hb)
            except MemoryError:      # the inference thread ran memory out; what it held is freed by now
                log.exception("out of memory in the main loop; serving on")
        self._flush_events()

    def _iteration(self, poller, hb: float, next_hb: float) -> float:
        """One pass of the loop: requests, queued events, the heartbeat; returns the next heartbeat time."""
        ready = dict(poller.poll(timeout=int(hb * 1000 / 2)))
        if self.router in ready:
            for _ in range(100):
                try:
                    frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(frames)
        self._flush_events()
        now = time.time()
        if now >= next_hb:
            next_hb = now + hb
            snap = self.scheduler.snapshot()
            self.publish(m.DAEMON_TOPIC, m.Heartbeat(pid=os.getpid(), uptime=now - self.started,
                                                     active=len(snap["active"])))
            self._reap_clients(snap, now)
        return next_hb

    def _reap_clients(self, snap: dict, now: float) -> None:
        timeout = self.config.daemon.client_timeout
        for cid in snap["clients"]:
            if cid and now - self.last_seen.get(cid, now) > timeout:
                n = self.scheduler.cancel(client_id=cid)
                if n:
                    log.warning("client %s sent no heartbeat for %.1f s: cancelled %d job(s)", cid, timeout, n)
        for cid in [c for c, t in self.last_seen.items() if now - t > 10 * timeout]:
            del self.last_seen[cid]

    def _handle(self, frames) -> None:
        ident = frames[0].bytes
        try:
            msg, buffers = self.codec_in.parse(frames[1:])
        except p.ProtocolError as e:
            self.dropped += 1
            log.warning("dropped a frame: %s", e)
            return
        client = getattr(msg, "client_id", "")
        if client:
            self.last_seen[client] = time.time()
        try:
            reply, out_buffers = handlers.handle(self, msg)
        except Exception as e:  # noqa: BLE001 — any failure becomes a typed Error reply
            kind, text = classify(e)
            if kind == "Internal":
                log.exception("request %s failed", type(msg).__name__)
            reply, out_buffers = m.Error(kind=kind, message=text), []
        try:
            self.router.send_multipart([ident] + self.codec_out.build(reply, out_buffers))
        except p.ProtocolError as e:
            self.router.send_multipart([ident] + self.codec_out.build(m.Error(kind="ProtocolError", message=str(e))))

    def new_job_id(self) -> str:
        return "j" + secrets.token_hex(6)

    def stop(self) -> None:
        """End the loop after this iteration (a Shutdown request)."""
        self._stop = True


def serve(paths: Paths, config: Config, model: str | None = None, strategy: str | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rwkv_chat.models import kernels

    kernels.set_cache_dir(paths.cache_dir / "kernels")     # this home's builds
    return Server(paths, config, model, strategy).run()
