"""The inference thread: admits queued jobs fairly and steps the admitted generations, batching their decode.

Threading: the server's main loop (socket I/O) calls :meth:`Scheduler.submit` / :meth:`cancel` /
:meth:`snapshot`; everything else runs in the scheduler's one thread, which alone touches the model (through
the :class:`~rwkv_chat.daemon.host.Host` and the :class:`~rwkv_chat.daemon.generation.Generation` objects).
Events go back through ``emit(topic, event)`` (thread-safe; the server publishes them).

Fairness: pending jobs wait in one FIFO per client; admission takes them round-robin across clients, at
most ``max_active`` at once and one per conversation. At most ``queue_limit`` jobs wait in all
(``submit`` returns a :class:`~rwkv_chat.daemon.protocol.messages.Busy` past that). A load job waits for the
generations in flight to finish and runs alone; jobs behind it wait for the model.

Bounded waits: while jobs wait for a place, an admitted generation that has held its place for ``[daemon]
time_slice`` seconds yields it: it leaves the decoder with its state, logits and sampler and goes, paused, to
the back of its client's queue; admitted again, it continues where it stopped (its stream only pauses). So
behind any number of endless generations a queued one starts within about ``time_slice`` seconds per
round. A job still queued after ``[daemon] queue_timeout`` seconds (a load behind running generations, or
anything when ``time_slice`` is 0) fails with kind "QueueTimeout". A cancelled queued job ends at once
(``Done(reason="cancelled")``). Every waiting job gets ``Queued`` events: when queued, when its position
changes, and every :data:`QUEUE_REPORT_INTERVAL` seconds.

Continuous batching: one loop iteration = at most one prefill chunk (``chunk_len`` tokens of one prompt,
taken round-robin among the prompts being prefilled) followed by ONE batched decode step
(:meth:`_decode_step`) that feeds a token to every decoding generation through the host's batch decoder.
A generation joins the decoder after its last prefill chunk and leaves it (taking its state back) when it
is done, fails or is cancelled, always between steps; so a long prompt never stalls the streams already
decoding, and sampling stays per generation (each its own Sampler). The decoder's batch sizes are chosen so
that a generation's logits do not depend on which others share its step (``[daemon] batch_invariant``, see
:func:`~rwkv_chat.daemon.host.decode_buckets`).

Keep-alive (``[daemon] keep_alive`` seconds, 0 = never): once no generation has run or waited for that long,
the model is unloaded (:meth:`Host.unload`; in-memory states are forgotten, they are on disk). The next
request that needs it loads it again before it is admitted, with ``Progress(phase="load")`` events on the
waiting requests' topics; a load that fails then fails them. An ``Unload`` request parks the model the same way
at once (after the generations in flight, like a load).

Draft prefill (:mod:`~rwkv_chat.daemon.drafts`): when no generation is admitted or waiting, an iteration
reads one chunk of a message being typed into its scratch state instead of sleeping; it never runs before
another client's prefill or decode step.

Out of memory (MemoryError, torch.OutOfMemoryError, allocator errors) in a load, prefill or decode step
fails the jobs concerned with kind "OOM"; the daemon serves on.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict, deque

from .generation import TOKEN_INTERVAL, Generation, Job, sample_next, send_round
from .host import classify
from .keepalive import KeepAlive
from .protocol import messages as m

log = logging.getLogger("rwkv_chat.daemon")


#: seconds between two Queued events of a waiting job whose position did not change
QUEUE_REPORT_INTERVAL = 1.0


class QueueTimeout(RuntimeError):
    """A job waited longer than ``[daemon] queue_timeout`` seconds for a place."""


class Scheduler(KeepAlive):
    """Queues, admission and the inference thread's loop over a :class:`~rwkv_chat.daemon.host.Host`, the
    store and the in-memory conversation states (``sessions``); ``emit(topic, event)`` is thread-safe."""

    def __init__(self, host, store, sessions, config, emit):
        self.host = host
        self.store = store
        self.sessions = sessions
        self.config = config            # rwkv_chat.daemon.config.Config
        self.config_file = None         # the file it was read from (server): default_strategy reads it again
        self.emit = emit                # emit(topic: str, event: Msg) — thread-safe
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        # client_id -> FIFO of jobs and paused generations
        self._pending: OrderedDict[str, deque[Job | Generation]] = OrderedDict()
        self._admin: deque[Job] = deque()                              # load jobs
        self.active: list[Generation] = []
        self._since: dict[str, float] = {}         # job id -> monotonic time it (re)entered the queue
        self._slice_start: dict[str, float] = {}   # job id -> monotonic time it was (re)admitted
        self._reported: dict[str, tuple[int, float]] = {}   # job id -> (position, time) of its last Queued
        self._t_round = 0.0             # perf_counter of the last round of Token events
        self.last_used = time.monotonic()  # the last time a generation ran or waited, or a load ended
        self.drafts = None              # messages being typed (daemon.drafts.Drafts): read ahead when idle
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

    def poke(self) -> None:
        """Wake the inference thread (a draft to read ahead)."""
        with self._lock:
            self._wake.notify_all()

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
            self._since[job.id] = time.monotonic()
            if job.kind in ("load", "unload"):
                self._admin.append(job)
            else:
                self._pending.setdefault(job.client_id, deque()).append(job)
            self._wake.notify_all()
        return m.Accepted(job_id=job.id, topic=job.topic, queued=queued)

    def cancel(self, job_id: str = "", conversation_id: str = "", owner: bytes = b"") -> int:
        """Flag the jobs (queued or active) with this id, of this conversation or of this connection
        (``owner``, a ROUTER identity; b"" matches none) for cancellation; returns how many."""
        n = 0
        with self._lock:
            for j in self._all_jobs_locked():
                if j.cancel.is_set():
                    continue
                if ((job_id and j.id == job_id) or (conversation_id and j.conversation_id == conversation_id)
                        or (owner and j.owner == owner)):
                    j.cancel.set()
                    n += 1
            self._wake.notify_all()
        return n

    def snapshot(self) -> dict:
        """``active``: info of the admitted generations; ``queued``: jobs waiting; ``owners``: the
        ``(connection, client id)`` pairs of every job not cancelled (the daemon's own jobs left out)."""
        with self._lock:
            active = [j.info() for j in self.active]
            jobs = list(self._all_jobs_locked())
        owners = sorted({(j.owner, j.client_id) for j in jobs if j.owner and not j.cancel.is_set()})
        return {"active": active, "queued": self.queued(), "owners": owners}

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
                now = time.monotonic()
                dropped = self._take_cancelled_locked()
                expired = self._take_expired_locked(now)
                paused = self._preempt_locked(now)
                admin = self._take_admin_locked()
                parked = self.host.parked
                if admin is None and not parked:
                    self._admit_locked(now)
                reload = admin is None and parked and bool(self._pending)     # a request needs the model
                if admin is not None or self.active or self._pending:
                    self.last_used = now
                unload = self.idle_due(now)
                reports = self._reports_locked(now)
                draft = (admin is None and not self.active and not self._pending and self.drafts is not None
                         and self.drafts.due())    # idle only: a draft never delays another's step
                if (admin is None and not self.active and not (dropped or expired or paused or reports or draft)
                        and not self.host.switch_due() and not reload and not unload):
                    self._wake.wait(0.5)
                    continue
            try:
                for item in dropped:
                    self._end_queued(item)
                for job, waited in expired:
                    self._time_out(job, waited)
                for gen in paused:
                    gen.leave()                      # the state comes back from the decoder; it waits queued
                    gen.send_pending()               # with its text so far out
                for topic, ev in reports:
                    self.emit(topic, ev)
                if self.host.switch_due():
                    self._use_kernels()
                if unload:
                    self._unload("keep-alive")
                if reload:
                    self._reload()
                if admin is not None:
                    self._run_load(admin)
                elif self.active:
                    self._step_all()
                elif draft:
                    self.drafts.step(self.host, self.store, self.sessions)
            except BaseException as e:    # noqa: BLE001 — the inference thread must survive anything
                log.exception("scheduler step failed")
                for gen in list(self.active):
                    self._fail(gen, e)
                gc.collect()
        for j in list(self.active):
            self._finish(j, "cancelled")
        with self._lock:
            queued = list(self._admin) + [j for q in self._pending.values() for j in q]
            self._admin.clear()
            self._pending.clear()
        for item in queued:
            self._end_queued(item)

    def _queued_locked(self):
        """Every queued item in the order admission would take it: loads first, then round-robin across
        the clients' FIFOs."""
        yield from self._admin
        queues = list(self._pending.values())
        for i in range(max((len(q) for q in queues), default=0)):
            for q in queues:
                if i < len(q):
                    yield q[i]

    def _remove_queued_locked(self, item) -> None:
        if item in self._admin:
            self._admin.remove(item)
            return
        for cid, q in list(self._pending.items()):
            if item in q:
                q.remove(item)
                if not q:
                    del self._pending[cid]
                return

    def _take_cancelled_locked(self) -> list:
        """Queued jobs and paused generations whose cancel is set, taken out of the queue."""
        out = [j for j in self._queued_locked() if j.cancel.is_set()]
        for item in out:
            self._remove_queued_locked(item)
            self._forget(item.id)
        return out

    def _take_expired_locked(self, now: float) -> list[tuple[Job, float]]:
        """Queued jobs (not paused generations) that waited ``queue_timeout`` seconds, taken out of the queue."""
        limit = self.config.daemon.queue_timeout
        if limit <= 0:
            return []
        out = [(j, now - self._since.get(j.id, now)) for j in self._queued_locked() if isinstance(j, Job)]
        out = [(j, w) for j, w in out if w >= limit]
        for job, _ in out:
            self._remove_queued_locked(job)
            self._forget(job.id)
        return out

    def _paused_locked(self) -> list[Generation]:
        return [g for q in self._pending.values() for g in q if isinstance(g, Generation)]

    def _preempt_locked(self, now: float) -> list[Generation]:
        """Active generations that yield their place (``time_slice`` over, someone admissible waits, all
        places taken, no load waiting), longest-running first; moved to the back of their client's queue."""
        d = self.config.daemon
        if d.time_slice <= 0 or self._admin or len(self.active) < d.max_active or not self._pending:
            return []
        held = {g.conversation_id for g in self.active + self._paused_locked() if g.conversation_id}
        waiting = sum(1 for j in self._queued_locked()
                      if isinstance(j, Generation) or not j.conversation_id or j.conversation_id not in held)
        due = sorted((g for g in self.active if g.phase in ("prefill", "decode") and not g.cancel.is_set()
                      and now - self._slice_start.get(g.id, now) >= d.time_slice),
                     key=lambda g: self._slice_start.get(g.id, now))[:waiting]
        for gen in due:
            self.active.remove(gen)
            self._slice_start.pop(gen.id, None)
            self._since[gen.id] = now
            q = self._pending.setdefault(gen.client_id, deque())
            q.append(gen)
            self._pending.move_to_end(gen.client_id)
        return due

    def _take_admin_locked(self):
        if self._admin and not self.active and not self._paused_locked():
            job = self._admin.popleft()
            self._forget(job.id)
            return job
        return None

    def _admit_locked(self, now: float) -> None:
        """Admit queued jobs and paused generations round-robin across clients while places are free; while a
        load waits, only paused generations (work in flight) come back."""
        if not self._pending:
            return
        paused = self._paused_locked()
        if self._admin and not paused:
            return
        held = {g.conversation_id for g in self.active + paused if g.conversation_id}
        progressed = True
        while len(self.active) < self.config.daemon.max_active and progressed:
            progressed = False
            for cid in list(self._pending):
                q = self._pending[cid]
                item = next((j for j in q if isinstance(j, Generation) or (
                    not self._admin and (not j.conversation_id or j.conversation_id not in held))), None)
                if item is None:
                    continue
                q.remove(item)
                self._pending.move_to_end(cid)        # round-robin across clients
                if not q:
                    del self._pending[cid]
                if isinstance(item, Generation):
                    gen = item
                else:
                    gen = Generation(item, self.host, self.store, self.sessions, self.emit, self.config)
                self.active.append(gen)
                self._forget(gen.id)
                self._slice_start[gen.id] = now
                if gen.conversation_id:
                    held.add(gen.conversation_id)
                progressed = True
                break

    def _reports_locked(self, now: float) -> list[tuple[str, m.Queued]]:
        """Queued events due (new position, or :data:`QUEUE_REPORT_INTERVAL` since the last one)."""
        order = list(self._queued_locked())
        out = []
        for pos, item in enumerate(order, 1):
            last = self._reported.get(item.id)
            if last is None or last[0] != pos or now - last[1] >= QUEUE_REPORT_INTERVAL:
                self._reported[item.id] = (pos, now)
                out.append((item.topic, m.Queued(job_id=item.id, position=pos, queued=len(order),
                                                 active=len(self.active),
                                                 waited=now - self._since.get(item.id, now))))
        return out

    def _forget(self, job_id: str) -> None:
        self._since.pop(job_id, None)
        self._reported.pop(job_id, None)

    def _end_queued(self, item) -> None:
        """End a queued job or paused generation as cancelled (Done, nothing committed)."""
        if isinstance(item, Generation):
            self._finish(item, "cancelled")
            return
        self.emit(item.topic, m.Done(job_id=item.id, reason="cancelled", text="", prompt_tokens=0, tokens=0,
                                     prefill_s=0.0, decode_s=0.0, tokens_per_s=0.0))

    def _time_out(self, job: Job, waited: float) -> None:
        d = self.config.daemon
        with self._lock:
            running = len(self.active)
        msg = (f"waited {waited:.1f} s in the queue behind {running} running generation(s) "
               f"([daemon] queue_timeout = {d.queue_timeout:g} s); retry later or cancel some")
        log.warning("job %s: %s", job.id, msg)
        self.emit(job.topic, m.Failed(job_id=job.id, kind=QueueTimeout.__name__, message=msg))

    def _release_prompt_states(self) -> None:
        """Demote the shared prompt states held on the model's devices to RAM (``PromptCache.release_device``)."""
        prompts = getattr(self.sessions, "prompts", None)
        if prompts is not None:
            prompts.release_device()

    def default_strategy(self) -> str:
        """The strategy of a load that names none: ``[model] strategy`` of the config file as it is now (so a
        ``rwkv-chat load --default`` or an edit of the file applies without a restart), else, where there is no
        file or it does not read, the one read at start."""
        from .config import ConfigError, load_config

        if self.config_file is not None and self.config_file.is_file():
            try:
                return load_config(self.config_file).model.strategy
            except (ConfigError, OSError):
                pass
        return self.config.model.strategy

    def _run_load(self, job: Job) -> None:
        if job.kind == "unload":
            return self._run_unload(job)
        req, d = job.request, self.config.daemon
        self.emit(job.topic, m.Started(job_id=job.id, kind="load"))
        t0 = time.perf_counter()

        path = m.clip_bytes(req.path, m.MAX_PATH)[0]

        def progress(done: int, total: int) -> None:
            self.emit(job.topic, m.Progress(job_id=job.id, phase="load", done=done, total=total, text=path))

        self._release_prompt_states()         # off the devices before the new weights come
        try:
            strategy = self.host.strategy_for(req.path, req.strategy, self.default_strategy())
            self.host.load(req.path, strategy, self.config.model.tokenizer, max_batch=d.max_batch,
                           batch_invariant=d.batch_invariant, threads=d.threads, progress=progress,
                           context_limit=self.config.model.context_limit)
        except BaseException as e:     # noqa: BLE001 — a failed load must not end the daemon
            kind, msg = classify(e)
            del e
            gc.collect()               # drop the half-built model before serving on
            log.warning("load of %s failed: %s: %s", req.path, kind, msg)
            self.emit(job.topic, m.Failed(job_id=job.id, kind=kind, message=msg))
            return
        self.sessions.clear()
        self.last_used = time.monotonic()
        self.emit(job.topic, m.Done(job_id=job.id, reason="loaded", text=str(self.host.info()), prompt_tokens=0,
                                    tokens=0, prefill_s=time.perf_counter() - t0, decode_s=0.0, tokens_per_s=0.0))

    def _use_kernels(self) -> None:
        """The kernels built in the background are ready: move the model to them between two steps. The
        generations in the decoder leave it (their states come back), the host makes a new decoder, and they
        join it again; their output is the same to rounding (the engine's promise for both paths)."""
        joined = [g for g in self.active if g.handle is not None]
        for gen in joined:
            gen.leave()
        try:
            self.host.use_kernels()
        finally:
            for gen in joined:
                try:
                    gen.join(self.host.decoder)
                except BaseException as e:   # noqa: BLE001
                    self._fail(gen, e)

    def _step_all(self) -> None:
        """One iteration: cancellations and set-ups, one prefill chunk, one batched decode step."""
        prefilling, decoding = [], []
        for gen in list(self.active):
            if gen.cancel.is_set():
                self._finish(gen, "cancelled")
                continue
            try:
                if gen.phase == "starting":
                    gen.start()
            except BaseException as e:   # noqa: BLE001
                self._fail(gen, e)
                continue
            (prefilling if gen.phase == "prefill" else decoding).append(gen)
        if prefilling:
            gen = min(prefilling, key=lambda g: g.t_chunk)          # round-robin: longest without a chunk
            try:
                gen.prefill_chunk()
            except BaseException as e:   # noqa: BLE001
                self._fail(gen, e)
        if decoding:
            self._decode_step(decoding)

    def _decode_step(self, gens: list[Generation]) -> None:
        """One batched decode step: sample every generation's token (each with its own Sampler, greedy rows in
        one reduction: :func:`~rwkv_chat.daemon.generation.sample_next`), feed all tokens in one decoder step,
        then detokenize and check stops per generation. Generations join the decoder here (after their
        prefill) while slots are free; finished ones leave it. A failing step fails its generations."""
        dec = self.host.decoder
        ready: list[Generation] = []
        for gen in gens:
            if gen.handle is None:
                if dec.size >= dec.max_batch:
                    continue                         # waits for a free slot
                try:
                    gen.join(dec)
                except BaseException as e:   # noqa: BLE001
                    self._fail(gen, e)
                    continue
            if gen.at_length():                      # max_tokens reached before this step
                self._finish(gen, "length")
                continue
            ready.append(gen)
        if not ready:
            return
        t0 = time.perf_counter()
        tokens: dict[int, int] = {}
        stepping: list[Generation] = []
        for gen, token in zip(ready, sample_next(ready)):
            if isinstance(token, BaseException):
                self._fail(gen, token)
                continue
            tokens[gen.handle] = token
            stepping.append(gen)
        if not tokens:
            return
        try:
            out = dec.step(tokens)                   # {handle: float32 [vocab]}
        except BaseException as e:   # noqa: BLE001
            for gen in stepping:
                self._fail(gen, e)
            return
        finished: list[Generation] = []
        for gen in stepping:
            try:
                if gen.push(out[gen.handle]):
                    finished.append(gen)
            except BaseException as e:   # noqa: BLE001
                self._fail(gen, e)
        now = time.perf_counter()
        dt = now - t0                                # every stepping generation waited the whole step
        for gen in stepping:
            gen.t_decode += dt
        if now - self._t_round >= TOKEN_INTERVAL:    # one round of Token events for all generations
            self._t_round = now
            send_round(stepping)
        for gen in finished:
            self._finish(gen, gen.reason)

    def _fail(self, gen: Generation, e: BaseException) -> None:
        kind, msg = classify(e)
        log.warning("job %s failed: %s: %s", gen.id, kind, msg)
        if kind == "OOM":
            self._release_prompt_states()     # the next step gets the device memory they held
        if kind == "Internal":
            log.exception("internal error", exc_info=e)
        self._remove(gen)
        gen.fail(kind, msg)

    def _finish(self, gen: Generation, reason: str) -> None:
        try:
            gen.finish(reason)
        except BaseException as e:   # noqa: BLE001
            self._fail(gen, e)
            return
        self._remove(gen)
        gen.done()

    def _remove(self, gen: Generation) -> None:
        gen.release()
        with self._lock:
            if gen in self.active:
                self.active.remove(gen)
            self._slice_start.pop(gen.id, None)
            self._forget(gen.id)
