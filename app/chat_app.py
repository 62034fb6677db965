"""The rwkv-chat Textual application and its link to the daemon.

Threads: one long-lived ``@work(thread=True)`` worker (:meth:`ChatApp._link`) connects to the daemon
(starting one if allowed), watches the open conversation's event topic, polls the daemon status each
``status_every`` seconds, and on loss (the client's heartbeat watch, :class:`DaemonLost`) tells the UI and
reconnects when a daemon answers again. Requests run in short ``@work(thread=True)`` workers
(:meth:`ChatApp.request`). Workers only post messages (:mod:`rwkv_chat.app.widgets.events`) or call back
on the event loop; nothing blocks the event loop.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from textual import on, work
from textual.app import App
from textual.binding import Binding
from textual.worker import get_current_worker

from rwkv_chat.daemon.paths import Paths, ensure_dirs, get_paths

from .screens.chat import ChatScreen
from .screens.first_run import ModelScreen
from .screens.help import HelpScreen
from .widgets import events as ev

DAEMON_TOPIC = "~daemon"     # rwkv_chat.daemon.protocol.messages.DAEMON_TOPIC (imported lazily with the client)


def describe(e: BaseException) -> str:
    """A user-facing sentence for a client-side exception."""
    from rwkv_chat.daemon.client import DaemonError

    if isinstance(e, DaemonError):
        kind = {"Unavailable": "daemon unreachable", "Lost": "daemon lost", "Busy": "daemon busy"}.get(e.kind)
        return f"{kind}: {e.message}" if kind else e.message
    return f"{type(e).__name__}: {e}"


def detail(e: BaseException) -> str:
    """What went wrong with the link to the daemon, without saying again that it is unreachable (the
    notice says that)."""
    from rwkv_chat.daemon.client import DaemonError

    return e.message if isinstance(e, DaemonError) else f"{type(e).__name__}: {e}"


class ChatApp(App):
    """rwkv-chat's terminal UI.

    Args:
        paths: the home to use (default: ``RWKV_CHAT_HOME`` or platformdirs).
        autostart: start a daemon when none answers (only on the first connection attempt).
        snapshot: deterministic display for snapshot tests: hides clocks, timings, speeds, memory and paths.
        lost_after: seconds of silence from the daemon (heartbeats included) before it counts as lost
            (None: the config's ``[daemon] daemon_timeout``, 2.5 s by default).
        status_every: seconds between daemon status polls (model, memory).
    """

    CSS_PATH = "rwkv_chat.tcss"
    TITLE = "rwkv-chat"
    BINDINGS = [
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False),
        Binding("ctrl+l", "load_model", "Model", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, *, paths: Paths | None = None, autostart: bool = True, snapshot: bool = False,
                 lost_after: float | None = None, status_every: float = 1.0) -> None:
        super().__init__()
        self.paths = ensure_dirs(paths or get_paths())
        self.autostart = autostart
        self.snapshot = snapshot
        self.lost_after = lost_after
        self.status_every = status_every
        self.client = None                   # request Client of the current connection (None while down)
        self.connected = False
        self.status: dict = {}
        self.watch_topic = DAEMON_TOPIC      # what the link subscribes to (set by the chat screen)
        self._watched = ""                   # what it is subscribed to now
        self._watched_cond = threading.Condition()
        self.chat = ChatScreen()
        self._model_screen: ModelScreen | None = None
        self._model_draft: tuple[str, str] | None = None     # path and strategy typed on a closed model screen

    # ---------------------------------------------------------------- start-up
    def on_mount(self) -> None:
        self.theme = "textual-dark"
        self.push_screen(self.chat)
        self._link()

    def action_toggle_theme(self) -> None:
        self.theme = "textual-light" if self.current_theme.dark else "textual-dark"

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(list(self.chat.BINDINGS) + list(self.BINDINGS)))

    def action_load_model(self, first_run: bool = False) -> None:
        if self._model_screen is not None:
            return
        model = self.status.get("model") or {}
        error = model.get("error") if not model.get("loaded") else None
        path, strategy = self._model_draft or (model.get("path", "") or (error or {}).get("path", ""),
                                               model.get("strategy", "") or (error or {}).get("strategy", ""))
        screen = ModelScreen(self.status.get("devices") or ["cpu"], path=path, strategy=strategy,
                             first_run=first_run, loading=model.get("loading", ""), error=error,
                             data_dir=self.paths.data_dir, remember=not model.get("loaded"))
        self._model_screen = screen

        def closed(_result) -> None:
            self._model_screen = None
            # what was typed comes back next time (Esc is "not now", not "forget it")
            self._model_draft = None if _result else screen.draft
            self.chat.focus_input()

        self.push_screen(screen, closed)

    # ---------------------------------------------------------------- the link worker
    @work(thread=True, exclusive=True, group="link", name="daemon link")
    def _link(self) -> None:
        from rwkv_chat.daemon.client import Client

        worker = get_current_worker()
        attempt = 0
        while not worker.is_cancelled:
            req = watch = None
            try:
                req = Client(self.paths, autostart=self.autostart and attempt == 0, timeout=5.0,
                             lost_after=self.lost_after)
                req.connect()
                watch = Client(self.paths, autostart=False, timeout=3.0, lost_after=self.lost_after)
                watch.connect()
                status, conversations = req.status(), req.conversations()
            except Exception as e:  # noqa: BLE001 — any failure to connect: say so, retry
                self._close(req, watch)
                if attempt == 0 or self.connected:
                    self.connected = False
                    self.post_message(ev.ConnectionLost(detail(e)))
                attempt += 1
                self._sleep(worker, 1.0)
                continue
            self.client, self.connected = req, True
            self.post_message(ev.Connected(status, conversations, restarted=attempt > 0))
            attempt += 1
            try:
                self._serve(watch, worker)
            except Exception as e:  # noqa: BLE001 — DaemonLost, DaemonUnavailable, zmq errors
                self.connected, self.client = False, None
                self.post_message(ev.ConnectionLost(detail(e)))
            finally:
                with self._watched_cond:
                    self._watched = ""
                self._close(req, watch)
            self._sleep(worker, 1.0)

    @staticmethod
    def _close(*clients) -> None:
        for c in clients:
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass

    @staticmethod
    def _sleep(worker, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not worker.is_cancelled and time.monotonic() < end:
            time.sleep(0.05)

    def _serve(self, watch, worker) -> None:
        """Follow ``self.watch_topic`` and poll the status until cancelled; raises when the daemon is lost."""
        next_status = 0.0
        while not worker.is_cancelled:
            topic = self.watch_topic
            gen = watch.subscribe(topic, watch_timeout=0.1)
            try:
                for event in gen:
                    if self._watched != topic:
                        with self._watched_cond:
                            self._watched = topic
                            self._watched_cond.notify_all()
                        self.post_message(ev.Watching(topic))
                    if event is not None:
                        self.post_message(ev.DaemonEvent(topic, event))
                    if worker.is_cancelled or self.watch_topic != topic:
                        break
                    if time.monotonic() >= next_status:
                        next_status = time.monotonic() + self.status_every
                        self.post_message(ev.DaemonStatus(watch.status()))
            finally:
                gen.close()

    def wait_watching(self, topic: str, timeout: float = 5.0) -> bool:
        """(Worker threads.) Point the link at ``topic`` and wait until its events are subscribed."""
        self.watch_topic = topic
        with self._watched_cond:
            return self._watched_cond.wait_for(lambda: self._watched == topic, timeout)

    # ---------------------------------------------------------------- requests
    def request(self, action: str, call: Callable, then: Callable | None = None,
                on_error: Callable | None = None) -> None:
        """Run ``call(client)`` in a thread worker; ``then(result)`` runs on the event loop. A failure posts
        :class:`RequestFailed` (and calls ``on_error(message)`` on the event loop)."""
        if self.client is None:
            self.post_message(ev.RequestFailed(action, "not connected to the daemon"))
            if on_error:
                on_error("not connected to the daemon")
            return
        self._request(action, call, then, on_error)

    @work(thread=True, group="requests")
    def _request(self, action, call, then, on_error) -> None:
        client = self.client
        try:
            if client is None:
                raise ConnectionError("not connected to the daemon")
            result = call(client)
        except Exception as e:  # noqa: BLE001 — shown to the user
            message = describe(e)
            self.post_message(ev.RequestFailed(action, message))
            if on_error:
                self._call_soon(on_error, message)
            return
        if then:
            self._call_soon(then, result)

    def _call_soon(self, fn, *args) -> None:
        """Run ``fn(*args)`` on the event loop, unless the app has begun shutting down by then (a reply that
        arrives while the screens are taken down has no widgets left to update)."""
        def run() -> None:
            if self.is_running:
                fn(*args)

        try:
            self.call_from_thread(run)
        except RuntimeError:      # the app is shutting down
            pass

    @work(thread=True, group="load", exclusive=True)
    def load_model(self, path: str, strategy: str, remember: bool) -> None:
        from rwkv_chat.daemon.protocol import messages as m

        client = self.client
        try:
            if client is None:
                raise ConnectionError("not connected to the daemon")
            info = {}
            for event in client.load(path, strategy):
                if isinstance(event, m.Done):
                    if event.reason == "cancelled":
                        raise RuntimeError("the load was cancelled (the daemon stopped)")
                    info = {"path": path, "strategy": strategy}
            if remember:
                from rwkv_chat.daemon.config import load_config, save_config

                cfg = load_config(self.paths.config_file)
                cfg.model.path, cfg.model.strategy = path, strategy
                save_config(cfg, self.paths.config_file)
            self.post_message(ev.LoadFinished(True, info=info))
        except Exception as e:  # noqa: BLE001
            self.post_message(ev.LoadFinished(False, describe(e), kind=getattr(e, "kind", None) or type(e).__name__))

    # ---------------------------------------------------------------- messages from the link
    def _chat_ready(self) -> bool:
        return self.chat.is_attached and bool(self.chat.query("StatusBar"))

    @on(ev.Connected)
    def _connected(self, message: ev.Connected) -> None:
        if not self._chat_ready():           # the chat screen is still composing
            self.set_timer(0.05, lambda: self._connected(message))
            return
        self.status = message.status
        self.chat.link_connected(message)
        model = message.status.get("model") or {}
        if not model.get("loaded"):
            self.action_load_model(first_run=not model.get("loading"))

    @on(ev.ConnectionLost)
    def _lost(self, message: ev.ConnectionLost) -> None:
        if not self._chat_ready():
            return
        self.chat.link_lost(message.reason)

    @on(ev.DaemonStatus)
    def _status(self, message: ev.DaemonStatus) -> None:
        self.status = message.status
        if not self._chat_ready():
            return
        self.chat.link_status(message.status)
        if self._model_screen is not None:
            self._model_screen.link_status(message.status)

    @on(ev.DaemonEvent)
    def _event(self, message: ev.DaemonEvent) -> None:
        if not self._chat_ready():
            return
        self.chat.link_event(message.topic, message.event)

    @on(ev.RequestFailed)
    def _failed(self, message: ev.RequestFailed) -> None:
        self.notify(f"{message.action}: {message.message}", severity="error", timeout=6)

    @on(ModelScreen.LoadRequested)
    def _load_requested(self, message: ModelScreen.LoadRequested) -> None:
        self.load_model(message.path, message.strategy, message.remember)

    @on(ev.LoadFinished)
    def _load_finished(self, message: ev.LoadFinished) -> None:
        if self._model_screen is not None:
            self._model_screen.finished(message.ok, message.message, message.kind)
        if message.ok:
            self.notify("model loaded", timeout=3)
            self.chat.refresh_conversations()
            # the new model's status now, not at the next poll (a message sent at once must not be refused)
            self.request("status", lambda c: c.status(), lambda st: self._status(ev.DaemonStatus(st)))
