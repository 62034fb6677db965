"""Keep-alive of the scheduler: unloading an idle model and loading it again for the next request.

``[daemon] keep_alive`` seconds (0 = never) after a generation last ran or waited (or a load ended), the
model is unloaded (:meth:`rwkv_chat.daemon.host.Host.unload`: weights and device memory freed; the in-memory
conversation states are forgotten, they are on disk). A request that needs the model then waits in the
queue while the scheduler loads it again (:meth:`Host.reload`, with ``Progress(phase="load")`` events on the
waiting requests' topics) and is admitted after; if that load fails, the waiting requests fail with its
error. An ``Unload`` request parks the model the same way at once (queued like a load: after the
generations in flight).

A mixin of :class:`rwkv_chat.daemon.scheduler.Scheduler` (its ``host``, ``sessions``, ``config``, ``emit``,
lock and queues); runs in the scheduler's thread, apart from :meth:`KeepAlive.keep_alive_info`.
"""

from __future__ import annotations

import gc
import logging
import time

from .generation import Job
from .host import classify
from .protocol import messages as m

log = logging.getLogger("rwkv_chat.daemon")


class KeepAlive:
    """Keep-alive methods of the scheduler (see the module docstring)."""

    last_used: float     # monotonic time a generation last ran or waited, or a load ended

    def idle_due(self, now: float) -> bool:
        """Whether the model has been idle (nothing running or waiting) for ``[daemon] keep_alive`` seconds."""
        keep = self.config.daemon.keep_alive
        return (keep > 0 and self.host.model is not None and not self.active and not self._pending
                and not self._admin and now - self.last_used >= keep)

    def keep_alive_info(self) -> dict:
        """``keep_alive`` (seconds, 0 = never) and ``idle_s``: seconds since a generation last ran or waited
        (0 while one does)."""
        with self._lock:
            busy = bool(self.active or self._pending or self._admin)
        return {"keep_alive": self.config.daemon.keep_alive,
                "idle_s": 0.0 if busy else max(0.0, time.monotonic() - self.last_used)}

    def _unload(self, reason: str) -> bool:
        if not self.host.unload(reason):
            return False
        self.sessions.clear()
        gc.collect()
        return True

    def _reload(self) -> None:
        """Load the parked model again for the requests waiting for it (their topics get the load's Progress
        events); if it fails, they fail with the load's error."""
        with self._lock:
            jobs = [j for j in self._queued_locked() if isinstance(j, Job)]
        path = m.clip_bytes(str(self.host.info().get("path", "")), m.MAX_PATH)[0]

        def progress(done: int, total: int) -> None:
            for job in jobs:
                self.emit(job.topic, m.Progress(job_id=job.id, phase="load", done=done, total=total, text=path))

        log.info("loading %s again for %d waiting request(s)", path, len(jobs))
        try:
            self.host.reload(progress)
        except BaseException as e:     # noqa: BLE001 — a failed load must not end the daemon
            kind, msg = classify(e)
            del e
            gc.collect()
            with self._lock:
                for job in jobs:
                    self._remove_queued_locked(job)
                    self._forget(job.id)
            for job in jobs:
                self.emit(job.topic, m.Failed(job_id=job.id, kind=kind,
                                              message=f"the model unloaded while idle did not load again: {msg}"))
        self.last_used = time.monotonic()

    def _run_unload(self, job: Job) -> None:
        self.emit(job.topic, m.Started(job_id=job.id, kind="unload"))
        freed = self._unload("request")
        self.emit(job.topic, m.Done(job_id=job.id, reason="unloaded", text="" if freed else "no model was loaded",
                                    prompt_tokens=0, tokens=0, prefill_s=0.0, decode_s=0.0, tokens_per_s=0.0))
