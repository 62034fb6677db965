"""The inference thread: owns the model, admits queued jobs fairly, steps active generations.

Threading: the server's main loop (socket I/O) calls :meth:`Scheduler.submit` / :meth:`cancel` /
:meth:`snapshot`; everything else runs in the scheduler's one thread, which alone touches the model.
Events go back through ``emit(topic, event)`` (thread-safe; the server publishes them).

Fairness: pending jobs wait in one FIFO per client; admission takes them round-robin across clients, at
most ``max_active`` at once and one per conversation. At most ``queue_limit`` jobs wait in all
(``submit`` returns a :class:`~rwkv_chat.daemon.messages.Busy` past that). A load job waits for the active
generations to finish and runs alone; jobs behind it wait for the model.

Continuous batching: one loop iteration = at most one prefill chunk (``chunk_len`` tokens of one prompt,
taken round-robin among the prompts being prefilled) followed by ONE batched decode step
(:meth:`_decode_step`) that feeds a token to every decoding generation through the engine's
``BatchDecoder``. A generation joins the decoder after its last prefill chunk and leaves it (taking its
state back) when it is done, fails or is cancelled, always between steps; so a long prompt never stalls
the streams already decoding, and sampling stays per generation (each job's own Sampler). The decoder's
batch sizes are chosen so that a generation's logits do not depend on which others share its step
(``[daemon] batch_invariant``, see :func:`runner.decode_buckets`).

Out of memory (MemoryError, torch.OutOfMemoryError, allocator errors) in a load, prefill or decode step
fails the jobs concerned with kind "OOM"; the daemon serves on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict, deque

from . import runner as engine
from . import messages as m
from .jobs import Job
from .sessions import Sessions

log = logging.getLogger("rwkv_chat.daemon")


class Scheduler:
    def __init__(self, store, config, emit, on_model=None):
        self.store = store
        self.config = config            # rwkv_chat.daemon.config.Config
        self.emit = emit                # emit(topic: str, event: Msg) — thread-safe
        self.sessions = Sessions(store, config.daemon.resident_states, config.daemon.cpu_states)
        self.engine = engine.Engine()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: OrderedDict[str, deque[Job]] = OrderedDict()   # client_id -> FIFO
        self._admin: deque[Job] = deque()                              # load jobs
        self.active: list[Job] = []
        self._t_round = 0.0             # perf_counter of the last round of Token events
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="rwkv-inference", daemon=True)

    # ------------------------------------------------------------------ called from the main loop
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            for j in self._all_jobs_locked():
                j.cancel.set()
            self._wake.notify_all()
        self._thread.join(timeout)

    def queued(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._pending.values()) + len(self._admin)

    def submit(self, job: Job) -> m.Msg:
        """Queue ``job``; returns Accepted, or Busy when ``queue_limit`` jobs already wait."""
        limit = self.config.daemon.queue_limit
        with self._lock:
            queued = sum(len(q) for q in self._pending.values()) + len(self._admin)
            if queued >= limit:
                return m.Busy(reason=f"{queued} jobs queued (limit {limit})", queued=queued, limit=limit)
            if job.kind == "load":
                self._admin.append(job)
            else:
                self._pending.setdefault(job.client_id, deque()).append(job)
            self._wake.notify_all()
        return m.Accepted(job_id=job.id, topic=job.topic, queued=queued)

    def cancel(self, job_id: str = "", conversation_id: str = "", client_id: str = "") -> int:
        """Flag matching jobs (queued or active) for cancellation; returns how many."""
        n = 0
        with self._lock:
            for j in self._all_jobs_locked():
                if ((job_id and j.id == job_id) or (conversation_id and j.conversation_id == conversation_id)
                        or (client_id and j.client_id == client_id)):
                    j.cancel.set()
                    n += 1
            self._wake.notify_all()
        return n

    def snapshot(self) -> dict:
        with self._lock:
            active = [j.info() for j in self.active]
            jobs = list(self._all_jobs_locked())
        return {"active": active, "queued": self.queued(), "clients": sorted({j.client_id for j in jobs}),
                "model": self.engine.info(), "sessions": self.sessions.stats()}

    def _all_jobs_locked(self):
        yield from self.active
        yield from self._admin
        for q in self._pending.values():
            yield from q

    # ------------------------------------------------------------------ the inference thread
    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    break
                admin = self._take_admin_locked()
                if admin is None:
                    self._admit_locked()
                if admin is None and not self.active:
                    self._wake.wait(0.5)
                    continue
            try:
                if admin is not None:
                    self._run_load(admin)
                else:
                    self._step_all()
            except BaseException as e:    # noqa: BLE001 — the inference thread must survive anything
                log.exception("scheduler step failed")
                for job in list(self.active):
                    self._fail(job, e)
                gc.collect()
        for j in list(self.active):
            self._finish(j, "cancelled")

    def _take_admin_locked(self):
        if self._admin and not self.active:
            return self._admin.popleft()
        return None

    def _admit_locked(self) -> None:
        if self._admin or not self._pending:
            return                       # a load waits: admit nothing new; or nothing waits
        busy = {j.conversation_id for j in self.active if j.conversation_id}
        progressed = True
        while len(self.active) < self.config.daemon.max_active and progressed:
            progressed = False
            for cid in list(self._pending):
                q = self._pending[cid]
                job = next((j for j in q if not j.conversation_id or j.conversation_id not in busy), None)
                if job is None:
                    continue
                q.remove(job)
                self._pending.move_to_end(cid)        # round-robin across clients
                if not q:
                    del self._pending[cid]
                self.active.append(job)
                job.phase = "starting"
                if job.conversation_id:
                    busy.add(job.conversation_id)
                progressed = True
                break

    def _run_load(self, job: Job) -> None:
        req, d = job.request, self.config.daemon
        self.emit(job.topic, m.Started(job_id=job.id, kind="load"))
        t0 = time.perf_counter()

        def progress(done: int, total: int) -> None:
            self.emit(job.topic, m.Progress(job_id=job.id, phase="load", done=done, total=total, text=req.path))

        try:
            self.engine.load(req.path, req.strategy, self.config.model.tokenizer, max_batch=d.max_batch,
                             batch_invariant=d.batch_invariant, threads=d.threads, progress=progress)
        except BaseException as e:     # noqa: BLE001 — a failed load must not end the daemon
            kind, msg = engine.classify(e)
            del e
            gc.collect()               # drop the half-built model before serving on
            log.warning("load of %s failed: %s: %s", req.path, kind, msg)
            self.emit(job.topic, m.Failed(job_id=job.id, kind=kind, message=msg))
            return
        self.sessions.clear()
        self.emit(job.topic, m.Done(job_id=job.id, reason="loaded", text=str(self.engine.info()), prompt_tokens=0,
                                    tokens=0, prefill_s=time.perf_counter() - t0, decode_s=0.0, tokens_per_s=0.0))

    def _step_all(self) -> None:
        """One iteration: cancellations and set-ups, one prefill chunk, one batched decode step."""
        prefilling, decoding = [], []
        for job in list(self.active):
            if job.cancel.is_set():
                self._finish(job, "cancelled")
                continue
            try:
                if job.phase == "starting":
                    engine.setup(self, job)
                    self.emit(job.topic, m.Started(job_id=job.id, kind=job.kind, conversation_id=job.conversation_id,
                                                   message=job.user_text))
            except BaseException as e:   # noqa: BLE001
                self._fail(job, e)
                continue
            (prefilling if job.phase == "prefill" else decoding).append(job)
        if prefilling:
            job = min(prefilling, key=lambda j: j.t_chunk)          # round-robin: longest without a chunk
            try:
                engine.prefill_chunk(self, job)
                job.t_chunk = time.perf_counter()
            except BaseException as e:   # noqa: BLE001
                self._fail(job, e)
        if decoding:
            self._decode_step(decoding)

    def _decode_step(self, jobs: list[Job]) -> None:
        """One batched decode step: sample every job's token (each with its own Sampler, greedy rows in one
        reduction: :func:`runner.next_tokens`), feed all tokens in one ``BatchDecoder.step``, then detokenize
        and check stops per job. Jobs join the decoder here (after their prefill) while slots are free;
        finished jobs leave it. A failing step fails its jobs."""
        dec = self.engine.decoder
        ready: list[Job] = []
        for job in jobs:
            if job.handle is None:
                if dec.size >= dec.max_batch:
                    continue                         # waits for a free slot
                try:
                    job.handle = dec.add(job.state)
                except BaseException as e:   # noqa: BLE001
                    self._fail(job, e)
                    continue
                job.state = None                     # the decoder holds it now
            if len(job.out_tokens) >= job.max_tokens:   # max_tokens reached before this step
                self._finish(job, "length")
                continue
            ready.append(job)
        if not ready:
            return
        t0 = time.perf_counter()
        tokens: dict[int, int] = {}
        stepping: list[Job] = []
        for job, token in zip(ready, engine.next_tokens(ready)):
            if isinstance(token, BaseException):
                self._fail(job, token)
                continue
            tokens[job.handle] = token
            stepping.append(job)
        if not tokens:
            return
        try:
            out = dec.step(tokens)                   # {handle: float32 [vocab]}
        except BaseException as e:   # noqa: BLE001
            for job in stepping:
                self._fail(job, e)
            return
        finished: list[Job] = []
        for job in stepping:
            try:
                if engine.after_token(self, job, out[job.handle]):
                    finished.append(job)
            except BaseException as e:   # noqa: BLE001
                self._fail(job, e)
        now = time.perf_counter()
        dt = now - t0                                # every stepping job waited the whole step for its token
        for job in stepping:
            job.t_decode += dt
        if now - self._t_round >= engine.TOKEN_INTERVAL:   # one round of Token events for all generations
            self._t_round = now
            engine.send_ready(self, stepping)
        for job in finished:
            self._finish(job, job.reason)

    def _fail(self, job: Job, e: BaseException) -> None:
        kind, msg = engine.classify(e)
        log.warning("job %s failed: %s: %s", job.id, kind, msg)
        if kind == "Internal":
            log.exception("internal error", exc_info=e)
        self._remove(job)
        self.emit(job.topic, m.Failed(job_id=job.id, kind=kind, message=msg))

    def _finish(self, job: Job, reason: str) -> None:
        job.reason = reason
        try:
            self._leave(job)
            if reason != "cancelled":
                engine.close_reply(self, job)
                engine.commit(self, job)
            else:
                engine.flush_text(self, job)
        except BaseException as e:   # noqa: BLE001
            self._fail(job, e)
            return
        self._remove(job)
        self.emit(job.topic, engine.done_event(job))

    def _leave(self, job: Job) -> None:
        """Take the job's state back from the batch decoder (it leaves between two steps)."""
        if job.handle is not None:
            h, job.handle = job.handle, None
            dec = self.engine.decoder
            if dec is not None and h in dec.handles():
                job.state = dec.remove(h)

    def _remove(self, job: Job) -> None:
        try:
            self._leave(job)
        except BaseException:   # noqa: BLE001 — the slot is freed below in any case
            log.exception("job %s could not leave the decoder", job.id)
        with self._lock:
            if job in self.active:
                self.active.remove(job)
        job.phase = "done"
        job.state = job.logits = None
