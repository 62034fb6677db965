"""The daemon process: one per home (fcntl lock), a ROUTER for requests, a PUB for events.

The main loop (this module) does all socket I/O: it parses requests and answers each through the table of
handlers (:data:`rwkv_chat.daemon.handlers.HANDLERS`), forwards the scheduler's events to the PUB socket,
publishes heartbeats, cancels the generations of clients that went away or stopped sending heartbeats,
and answers the ZAP requests of CURVE handshakes (:mod:`rwkv_chat.daemon.auth`: only the connection
file's client key gets in). The model lives in the scheduler's inference thread (the
:class:`~rwkv_chat.daemon.host.Host`): loads never run on the loop, which answers throughout one (torch is
imported before serving, so the status never waits on the inference thread's import of it).

Stopping (SIGTERM, SIGINT or a Shutdown request): the connection file goes first (new clients see no
daemon), then every running or queued generation ends with ``Done(reason="cancelled")``, published before
the process exits (the PUB socket lingers up to :data:`STOP_LINGER` seconds for slow subscribers).

Ownership: a queued job belongs to the connection that sent it (its ROUTER identity). When that connection
closes (a socket monitor reports it), its jobs are cancelled at once; a connection that stays open but goes
silent loses its jobs after ``[daemon] client_timeout`` seconds without a request from it or a heartbeat
(``Ping``) naming the job's client id.

Malformed, unsigned, tampered, replayed, stale, oversized or foreign-version frames are dropped
(``ProtocolError``): the first of each :data:`DROP_LOG_INTERVAL` is logged, then one line per interval counts
the rest. Nothing on the send path ends the loop: an event or reply that cannot be sent is logged, its request
or job fails with a typed error (``Error`` / ``Failed``), and the daemon serves on.
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

from . import auth, handlers, registry
from .generation import Job
from .host import Host, classify
from .launcher import acquire_lock
from .protocol import codec as p
from .protocol import connection
from .protocol import messages as m
from .scheduler import Scheduler
from .drafts import Drafts
from .prompt_cache import PromptCache
from .sessions import Sessions
from .store import Store

log = logging.getLogger("rwkv_chat.daemon")

#: seconds between two log lines about dropped frames (the first drop of an interval is logged, the rest counted)
DROP_LOG_INTERVAL = 10.0
#: seconds the PUB socket may take, at exit, to deliver the last events (the Done of cancelled generations)
STOP_LINGER = 1.0


class Server:
    def __init__(self, paths: Paths, config: Config, model: str | None = None, strategy: str | None = None):
        self.paths = ensure_dirs(paths)
        self.config = config
        self.model = model if model is not None else (config.model.path or None)
        self.strategy = strategy or ""      # "": the config's, fitted to the checkpoint (host.strategy_for)
        self.started = time.time()
        self.last_seen: dict[str, float] = {}     # client id -> time of its last request or heartbeat
        self.conn_seen: dict[bytes, float] = {}   # connection (ROUTER identity) -> time of its last request
        self.peer = b""                           # the connection whose request is being handled
        self._fd_peer: dict[int, bytes] = {}      # socket fd -> the connection last seen on it
        self._stale_disconnects: dict[int, int] = {}
        self.dropped = 0
        self._drop_log_at = 0.0                   # monotonic time the current drop-log interval ends
        self._drops_unlogged = 0
        self._last_drop = ""
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
        """Send ``ev`` on ``topic``. An event that cannot be built or sent is logged; a job's event fails
        the job (``Failed`` kind "ProtocolError", the job cancelled) instead. Never raises."""
        try:
            self.pub.send_multipart(self.codec_out.build(ev, topic=topic.encode()))
            return
        except Exception as e:  # noqa: BLE001 — the send path never ends the loop
            log.error("could not publish %s on %s: %s", type(ev).__name__, m.quote(topic), m.quote(str(e), 200))
            job_id = getattr(ev, "job_id", "")
            if not job_id or isinstance(ev, m.Failed):
                return
        if hasattr(self, "scheduler"):
            self.scheduler.cancel(job_id=job_id)
        try:
            failed = m.Failed(job_id=job_id, kind="ProtocolError",
                              message=f"the daemon could not send a {type(ev).__name__} event; the job was stopped")
            self.pub.send_multipart(self.codec_out.build(failed, topic=topic.encode()))
        except Exception as e:  # noqa: BLE001
            log.error("could not publish Failed for %s: %s", job_id, m.quote(str(e), 200))

    # ---------------------------------------------------------------- set-up
    def _bind(self, ctx) -> tuple[str, str]:
        """Bind the ROUTER and the PUB socket, CURVE servers behind the ZAP handler where libzmq has CURVE;
        returns ``(request, events)`` endpoints. Raises ProtocolError for an endpoint refused by
        :func:`~rwkv_chat.daemon.protocol.connection.check_bind` or no usable ipc path, zmq.ZMQError."""
        d = self.config.daemon
        configured = bool(d.curve_secret_key and d.curve_public_key)
        self.keys = auth.new_keys(d.curve_public_key, d.curve_secret_key) if configured else auth.new_keys()
        self.zap = auth.ZapHandler(ctx, [self.keys.client_public] if self.keys else [])   # before any bind
        self.ipc_dir: Path | None = None
        self.router = ctx.socket(zmq.ROUTER)
        self.pub = ctx.socket(zmq.PUB)
        self.router.setsockopt(zmq.MAXMSGSIZE, p.MAX_MESSAGE)
        self.router.setsockopt(zmq.LINGER, 0)
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 100_000)
        if self.keys is not None:
            for s in (self.router, self.pub):
                auth.make_server(s, self.keys)
        if d.bind:
            connection.check_bind(d.bind, configured)
            host, port = d.bind.rsplit(":", 1)
            req, ev = f"{host}:{port}", f"{host}:{int(port) + 1}"
            self.router.bind(req)
            self.pub.bind(ev)
            return req, ev
        eps = connection.ipc_endpoints(self.paths.runtime_dir)
        if eps is None:                   # no ipc in libzmq: loopback tcp, always encrypted
            if self.keys is None:
                raise p.ProtocolError("libzmq has neither ipc nor CURVE: no private endpoint is possible")
            rp = self.router.bind_to_random_port("tcp://127.0.0.1")
            ep = self.pub.bind_to_random_port("tcp://127.0.0.1")
            return f"tcp://127.0.0.1:{rp}", f"tcp://127.0.0.1:{ep}"
        req, ev, self.ipc_dir = eps
        for e in (req, ev):
            Path(e[len("ipc://"):]).unlink(missing_ok=True)     # stale sockets of a killed daemon
        self.router.bind(req)
        self.pub.bind(ev)
        for e in (req, ev):
            os.chmod(e[len("ipc://"):], 0o600)
        return req, ev

    def run(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT or a Shutdown request). Raises AlreadyRunning."""
        lock = acquire_lock(self.paths.lock_file)
        ctx = zmq.Context()
        conn = self.paths.connection_file
        try:
            try:                               # a killed daemon's file and sockets (we hold the lock)
                connection.remove_ipc(connection.read_connection_file(conn))
            except (OSError, p.ProtocolError):
                pass
            conn.unlink(missing_ok=True)
            key = connection.new_key()
            self.codec_in = p.Codec(key)
            self.codec_out = p.Codec(key)
            req, ev = self._bind(ctx)
            keys = self.keys
            d = self.config.daemon
            self.store = Store(self.paths.database, self.paths.states_dir)
            n = self.store.remove_partial_saves()
            if n:
                log.info("removed %d temporary file(s) of a save that was interrupted", n)
            self.sessions = Sessions(self.store, d.resident_states, d.cpu_states)
            self.sessions.prompts = PromptCache(self.paths.data_dir / "prompt_states", d.prompt_cache_ram_bytes,
                                                d.prompt_cache_disk_bytes, d.prompt_cache_device_bytes)
            import torch  # noqa: F401 — here: a status during a first load would wait on its import

            self.host = Host(resolve=lambda ref: registry.resolve(ref, self.paths.data_dir))
            self.scheduler = Scheduler(self.host, self.store, self.sessions, self.config, self.emit)
            self.scheduler.config_file = self.paths.config_file
            self.scheduler.drafts = self.sessions.drafts = Drafts(d.draft_prefill)
            self.scheduler.start()
            self.sessions.prefix.budget = d.prefix_cache_bytes     # states of stateless chat requests (none yet)
            if self.model:
                self.strategy = self.host.strategy_for(self.model, self.strategy, self.config.model.strategy)
                self.host.expect(self.model, self.strategy)    # status says so before any client can ask
                self.scheduler.submit(Job(id="startup-load", kind="load", client_id="", topic=m.DAEMON_TOPIC,
                                          request=m.Load(client_id="", topic=m.DAEMON_TOPIC, path=self.model,
                                                         strategy=self.strategy)))
            connection.write_connection_file(conn, connection.ConnectionInfo(
                request=req, events=ev, key=key.hex(), pid=os.getpid(), started=self.started,
                server_public_key=keys.server_public.decode() if keys else "",
                client_public_key=keys.client_public.decode() if keys else "",
                client_secret_key=keys.client_secret.decode() if keys else "",
                ipc_dir=str(self.ipc_dir or "")))
            log.info("daemon %d serving %s (events %s)", os.getpid(), req, ev)
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            self._loop()
        finally:
            try:
                info = connection.read_connection_file(conn)
                if info.pid == os.getpid():
                    conn.unlink(missing_ok=True)          # new clients see no daemon from here on
            except (OSError, p.ProtocolError):
                info = None
            if hasattr(self, "scheduler"):
                self.scheduler.stop()                     # Done(cancelled) for every generation
            if hasattr(self, "host"):
                self.host.close()                         # background kernel builds stop (resumed at next start)
            if hasattr(self, "codec_out") and hasattr(self, "pub"):
                try:
                    self._flush_events()
                except Exception:  # noqa: BLE001 — exiting anyway
                    log.exception("could not publish the last events")
                self.pub.close(linger=int(STOP_LINGER * 1000))
            if info is not None and info.pid == os.getpid():
                connection.remove_ipc(info)
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
        poller.register(self.monitor, zmq.POLLIN)
        poller.register(self.zap.socket, zmq.POLLIN)
        poller.register(self._rfd, zmq.POLLIN)
        hb = self.config.daemon.heartbeat
        next_hb = 0.0
        while not self._stop:
            try:
                next_hb = self._iteration(poller, hb, next_hb)
            except MemoryError:      # the inference thread ran memory out; what it held is freed by now
                log.exception("out of memory in the main loop; serving on")
            except Exception:        # noqa: BLE001 — nothing a client sends may end the daemon
                log.exception("the main loop failed; serving on")
                time.sleep(0.01)
        self._flush_events()
        self._log_drops(force=True)

    def _iteration(self, poller, hb: float, next_hb: float) -> float:
        """One pass of the loop: closed connections, requests, queued events, the heartbeat; returns the next
        heartbeat time."""
        ready = dict(poller.poll(timeout=int(hb * 1000 / 2)))
        if self.monitor in ready:
            self._disconnects()
        if self.zap.socket in ready:
            self.zap.handle()
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
        self._log_drops()
        return next_hb

    def _reap_clients(self, snap: dict, now: float) -> None:
        """Cancel the jobs of connections that sent nothing, and whose client id no heartbeat named, for
        ``client_timeout`` seconds."""
        timeout = self.config.daemon.client_timeout
        for owner, cid in snap["owners"]:
            seen = max(self.conn_seen.get(owner, 0.0), self.last_seen.get(cid, 0.0) if cid else 0.0)
            if now - seen > timeout:
                n = self.scheduler.cancel(owner=owner)
                if n:
                    log.warning("client %s (connection %s) silent for %.1f s: cancelled %d job(s)",
                                m.quote(cid), owner.hex(), timeout, n)
        for table in (self.last_seen, self.conn_seen):
            for k in [k for k, t in table.items() if now - t > 10 * timeout]:
                del table[k]

    def _disconnects(self) -> None:
        """Cancel the jobs of the connections the socket monitor reports closed."""
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if ev["event"] != zmq.EVENT_DISCONNECTED:
                continue
            fd = int(ev["value"])
            if self._stale_disconnects.get(fd):          # its fd was reused already: handled then
                self._stale_disconnects[fd] -= 1
                continue
            peer = self._fd_peer.pop(fd, None)
            if peer is not None:
                self._gone(peer)

    def _gone(self, peer: bytes) -> None:
        self.conn_seen.pop(peer, None)
        n = self.scheduler.cancel(owner=peer)
        if n:
            log.info("connection %s closed: cancelled %d job(s)", peer.hex(), n)

    def _track(self, peer: bytes, frame) -> None:
        """Remember which socket fd ``peer``'s frames come from (to know it when the monitor reports the fd
        closed). A different peer on a known fd means the one before closed (the fd was reused before its
        disconnect was seen)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except (zmq.ZMQError, AttributeError, TypeError):
            return
        old = self._fd_peer.get(fd)
        if old is not None and old != peer:
            self._stale_disconnects[fd] = self._stale_disconnects.get(fd, 0) + 1
            self._gone(old)
        self._fd_peer[fd] = peer

    def _dropped_frame(self, e: Exception) -> None:
        self.dropped += 1
        self._drops_unlogged += 1
        self._last_drop = m.quote(str(e), 200)
        self._log_drops()

    def _log_drops(self, force: bool = False) -> None:
        """Log dropped frames: the first of an interval at once, then one line per interval with a count."""
        if not self._drops_unlogged:
            return
        now = time.monotonic()
        if now < self._drop_log_at and not force:
            return
        if self._drops_unlogged == 1:
            log.warning("dropped a frame: %s", self._last_drop)
        else:
            log.warning("dropped %d frames in the last %.0f s (the last: %s)", self._drops_unlogged,
                        DROP_LOG_INTERVAL, self._last_drop)
        self._drops_unlogged = 0
        self._drop_log_at = now + DROP_LOG_INTERVAL

    def _handle(self, frames) -> None:
        ident = frames[0].bytes
        try:
            msg, buffers = self.codec_in.parse(frames[1:])
        except p.ProtocolError as e:
            self._dropped_frame(e)
            return
        now = time.time()
        self.conn_seen[ident] = now
        self._track(ident, frames[-1])
        client = getattr(msg, "client_id", "")
        if isinstance(client, str) and client and len(client) <= m.MAX_ID:
            self.last_seen[client] = now
        self.peer = ident
        try:
            reply, out_buffers = handlers.handle(self, msg)
        except Exception as e:  # noqa: BLE001 — any failure becomes a typed Error reply
            kind, text = classify(e)
            if kind == "Internal":
                log.exception("request %s failed", type(msg).__name__)
            reply, out_buffers = m.Error(kind=kind, message=text), []
        finally:
            self.peer = b""
        self._reply(ident, msg, reply, out_buffers)

    def _reply(self, ident: bytes, msg: m.Msg, reply: m.Msg, buffers) -> None:
        """Send ``reply``; one that cannot be built is logged and replaced by an Error of kind
        "ProtocolError"; a send that fails is logged. Never raises."""
        try:
            frames = self.codec_out.build(reply, buffers)
        except Exception as e:  # noqa: BLE001
            log.error("could not build the %s reply to %s: %s", type(reply).__name__, type(msg).__name__,
                      m.quote(str(e), 200))
            frames = self.codec_out.build(m.Error(kind="ProtocolError", message=(
                f"the daemon could not send its {type(reply).__name__} reply: {m.quote(str(e), 200)}")))
        try:
            self.router.send_multipart([ident] + frames)
        except zmq.ZMQError as e:
            log.error("could not send the reply to %s: %s", type(msg).__name__, e)

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
