"""Model-facing steps of the scheduler's jobs: set-up, prefill chunk, one decode step, commit.

Runs only in the scheduler thread. Uses the engine contract of ``rwkv_chat.models`` (``RWKV.forward``,
``zero_state``, ``load_state``, ``State.save``) and the tokenizer/sampler of ``rwkv_chat.models``.
"""

from __future__ import annotations

import os
import re
import time

from . import messages as m
from .jobs import CHAT_STOP, Job, chat_prompt, held_back, transcript
from .sessions import sampler_to_meta
from .store import InvalidId, NotFound, Turn


class NoModel(RuntimeError):
    """No model is loaded (start the daemon with --model, set [model] path, or `rwkv-chat load`)."""


class Engine:
    """The loaded model, its tokenizer and its batch decoder (scheduler thread only, apart from :meth:`info`)."""

    def __init__(self):
        self.model = None
        self.tokenizer = None
        self.decoder = None           # rwkv_chat.models.rwkv.decode.BatchDecoder of the loaded model
        self.threads = 0
        self._info: dict = {"loaded": False}

    def load(self, path: str, strategy: str, tokenizer: str = "", *, max_batch: int = 16,
             batch_invariant: bool | str = "auto", threads: int = 0, progress=None) -> None:
        """Load ``path`` with ``strategy``; ``progress(done_layers, total_layers)`` is called while the
        layers are placed. Sets torch's intra-op threads (``threads``, 0 = :func:`auto_threads`) and the
        decoder's batch sizes (:func:`decode_buckets` of ``batch_invariant``: True, False or "auto").
        Raises what ``RWKV`` and ``load_tokenizer`` raise (CheckpointError, StrategyError, MemoryError, …);
        the previous model stays loaded then."""
        import torch

        from rwkv_chat.models import RWKV
        from rwkv_chat.models.rwkv.decode import BatchDecoder
        from rwkv_chat.models.text.tokenizers import load_tokenizer
        from rwkv_chat.models import kernels

        path = os.path.abspath(os.path.expanduser(path))
        self._info = {**self._info, "loading": path}
        # a first use builds the compiled kernels (tens of seconds): status shows what is happening
        kernels.set_progress(lambda note: self._info.update(note=note))
        old_threads = torch.get_num_threads()
        try:
            model = RWKV(model=path, strategy=strategy, verbose=False, progress=progress)
            tok = load_tokenizer(tokenizer or None, vocab_size=model.vocab_size, model_path=path)
            n_threads = threads or auto_threads(model)
            torch.set_num_threads(n_threads)                    # the buckets are measured with these threads
            self._info["note"] = "measuring decode batch sizes"
            decoder = BatchDecoder(model, max_batch=max_batch,
                                   buckets=decode_buckets(model, max_batch, batch_invariant))
        except BaseException:
            torch.set_num_threads(old_threads)
            self._info = {k: v for k, v in self._info.items() if k not in ("loading", "note")}
            raise
        finally:
            kernels.set_progress(None)
        self.model = self.tokenizer = self.decoder = None      # release the old weights first
        self.model, self.tokenizer, self.decoder = model, tok, decoder
        self.threads = n_threads
        self._info = {"loaded": True, "path": path, "strategy": strategy, "version": model.version,
                      "plan": str(model.plan), "fingerprint": model.fingerprint, "n_layer": model.n_layer,
                      "n_embd": model.n_embd, "vocab_size": model.vocab_size, "tokenizer": tok.name,
                      "threads": self.threads, "max_batch": max_batch, "buckets": list(decoder.buckets)}

    def info(self) -> dict:
        return dict(self._info)

    def need(self):
        if self.model is None:
            raise NoModel("no model is loaded: start the daemon with --model PATH, set [model] path in the "
                          "config, or run `rwkv-chat load PATH`")
        return self.model, self.tokenizer


#: models with n_embd below this decode fastest on one CPU thread (measured: bench/results/daemon_overhead_cpu.md)
SMALL_EMBD = 512


def auto_threads(model) -> int:
    """Default torch intra-op threads: 1 for small models (n_embd < SMALL_EMBD: per-op overhead dominates
    and extra threads only add synchronisation), else min(4, CPU cores)."""
    if model.n_embd < SMALL_EMBD:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def batch_invariance(setting: bool | str, device_types) -> bool:
    """Whether decode steps must be batch-invariant, from ``[daemon] batch_invariant`` (True, False or
    "auto") and the device types of the model's layers (e.g. ``{"cpu"}``, ``{"cuda"}``): "auto" means
    invariant where every layer is on the CPU (where :func:`decode_buckets` still drops it if the measured
    buckets have a floor above 1 row) and not on CUDA or any other accelerator (invariance there can cost a
    ``max_batch``-row step for one conversation, and fp16 results of the graph, batched and plain paths
    agree only within a tolerance anyway). Raises ConfigError for any other setting."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return all(t == "cpu" for t in device_types)
    from rwkv_chat.daemon.config import ConfigError

    raise ConfigError(f'[daemon] batch_invariant must be true, false or "auto", got {setting!r}')


def decode_buckets(model, max_batch: int, batch_invariant: bool | str) -> tuple[int, ...]:
    """Batch sizes (rows) the daemon's decode step may run at, ascending, the last one ``max_batch``.

    Invariant (:func:`batch_invariance` of ``batch_invariant`` and the model's devices): a conversation's
    logits must be bit-identical whichever others share its step, so only the buckets that compute a row
    exactly as the ``max_batch`` bucket does are used, measured at load by :func:`invariant_buckets` (the
    kernels pick their GEMM by shape: on CPU the fused kernel is row-count invariant for small matrices up
    to 16 rows and BLAS from about 4 rows on, so the tiny models keep every bucket and larger ones a floor;
    on CUDA cuBLAS and the fused GEMV choose by row count, so often only ``max_batch`` is left, and the
    measurement captures a CUDA graph per bucket: slower to load and to decode). Not invariant: the
    engine's default buckets (``models.decode.DEFAULT_BUCKETS``), a lone conversation stepping one row.
    "auto" on CPU keeps the measured buckets only when they start at 1 (invariance costs a lone conversation
    nothing: the tiny models); otherwise (a floor, e.g. (4, 8, 16) for RWKV-7 0.1B, where MKL computes 1-3
    rows with other kernels and a 4-row step costs ~3x a 1-row step on 2 cores) it takes the default buckets.
    Call it with the daemon's torch thread count already set (CPU kernels can choose by thread count).
    Raises ConfigError for a bad setting; what ``BatchDecoder.step`` raises during the measurement."""
    from rwkv_chat.models.rwkv.decode import DEFAULT_BUCKETS

    if not batch_invariance(batch_invariant, {d.type for d in model._devices}):
        return DEFAULT_BUCKETS
    measured = invariant_buckets(model, max_batch)
    if batch_invariant == "auto" and measured[0] != 1:
        return DEFAULT_BUCKETS                   # auto: invariance only where a lone conversation pays nothing
    return measured


def invariant_buckets(model, max_batch: int, steps: int = 2) -> tuple[int, ...]:
    """The candidate buckets (the engine's default ones below ``max_batch``, and ``max_batch``) whose decode
    steps give every row bit-identical logits (float32 [vocab]) to the ``max_batch`` bucket's, found by
    running ``steps`` steps per bucket from the zero state with a distinct token per row (kernels are chosen
    by shape and thread count, never by value, so one set of values shows their choice). Always includes
    ``max_batch``. Cost: ``steps`` decode steps per candidate (milliseconds for the tiny models on CPU, about a
    second for a 1.5B model; on CUDA each bucket's graph capture as well)."""
    import torch

    from rwkv_chat.models.rwkv.decode import DEFAULT_BUCKETS, BatchDecoder

    cands = tuple(b for b in DEFAULT_BUCKETS if b < max_batch) + (max_batch,)
    dec = BatchDecoder(model, max_batch=max_batch, buckets=cands)
    vocab = model.vocab_size
    rows: dict[int, torch.Tensor] = {}
    for b in reversed(cands):                                # max_batch first: a mismatch stops nothing
        hs = [dec.add(None) for _ in range(b)]
        outs = []
        for s in range(steps):
            out = dec.step({h: (31 * i + 7 * s + 1) % vocab for i, h in enumerate(hs)})
            outs.append(torch.stack([out[h] for h in hs]).float().cpu())
        rows[b] = torch.stack(outs)                          # [steps, b, vocab]
        for h in hs:
            dec.remove(h)
    ref = rows[max_batch]
    del dec
    return tuple(b for b in cands if torch.equal(rows[b], ref[:, :b]))


_OOM_TEXT = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|not enough memory", re.I)


def is_oom(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from (``__cause__``/``__context__``, e.g. a
    CheckpointError wrapping a failed allocation), is an out-of-memory condition: MemoryError,
    torch.OutOfMemoryError, ENOMEM, or an allocator RuntimeError."""
    import errno

    import torch

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            return True
        if isinstance(e, OSError) and e.errno == errno.ENOMEM:
            return True
        if isinstance(e, (RuntimeError, OSError)) and _OOM_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def classify(e: BaseException) -> tuple[str, str]:
    """``(kind, message)`` of an exception for an Error/Failed message."""
    from rwkv_chat.models.errors import RWKVError

    if is_oom(e):
        return "OOM", f"out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if isinstance(e, (RWKVError, NoModel, NotFound, InvalidId)):
        return type(e).__name__, str(e)
    if isinstance(e, FileNotFoundError):
        return "NotFound", str(e)
    if isinstance(e, ValueError):
        return "ValueError", str(e)
    return "Internal", f"{type(e).__name__}: {e}"


def sampler_args(config, *layers):
    """SamplerArgs from config defaults overridden by each dict/Sampling in ``layers`` (None = keep)."""
    from rwkv_chat.models.text.sampling import SamplerArgs

    d = {k: getattr(config.sampling, k) for k in
         ("temperature", "top_p", "top_k", "alpha_frequency", "alpha_presence", "alpha_decay", "max_tokens")}
    d["seed"] = None
    for layer in layers:
        items = layer.items() if isinstance(layer, dict) else ((f, getattr(layer, f)) for f in layer.__struct_fields__)
        for k, v in items:
            if v is not None and k in d:
                d[k] = v
    return SamplerArgs(**d)


def _pairs(turns) -> list[tuple[str, str]]:
    return [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns) - 1, 2)]


def setup(sched, job: Job) -> None:
    """Build the job's prompt tokens, starting state and sampler (phase -> "prefill")."""
    from rwkv_chat.models.text.sampling import Sampler
    from rwkv_chat.models.text.tokenizers import IncrementalDecoder

    model, tok = sched.engine.need()
    req = job.request
    sampler_sd = None
    if job.kind == "complete":
        args = sampler_args(sched.config, req.sampling)
        text, job.state, job.stops = req.prompt, model.zero_state(), tuple(req.stop)
    else:
        store, cid = sched.store, job.conversation_id
        conv, turns = store.get(cid), store.turns(cid)
        args = sampler_args(sched.config, conv.sampling, req.sampling)
        if job.mode == "chat":
            message, before = req.message, turns
            job.drop_from = None
        else:
            if len(turns) < 2 or turns[-1].role != "assistant":
                raise ValueError(f"conversation {cid} has no assistant turn to {job.mode}")
            message = turns[-2].text if job.mode == "regenerate" else req.text
            before = turns[:-2]
            job.drop_from = turns[-2].index
        job.base_n = len(before) // 2
        state = None
        if (not conv.state_stale and 0 < job.base_n <= conv.state_n
                and (sched.sessions.has(cid, job.base_n) or store.state_path(cid, job.base_n).exists())):
            state, sampler_sd = sched.sessions.get(model, cid, job.base_n)   # StateError if foreign
        if state is None:
            state, sampler_sd = model.zero_state(), None
            text = transcript(conv.system_prompt, _pairs(before)) + chat_prompt(message)
        else:
            text = chat_prompt(message)
        job.state, job.stops, job.user_text = state, (CHAT_STOP,), message
        job.user_created, job.user_tokens = time.time(), len(tok.encode(chat_prompt(message)))
    job.prompt = tok.encode(text)
    if not job.prompt:
        raise ValueError("the prompt is empty")
    job.sampler = Sampler(args, tok)
    if sampler_sd is not None:
        job.sampler.load_state_dict(sampler_sd)
        if args.seed is not None:
            job.sampler.generator.manual_seed(args.seed)
    job.decoder = IncrementalDecoder(tok)
    job.max_tokens = args.max_tokens
    job.phase, job.t_start = "prefill", time.perf_counter()


def prefill_chunk(sched, job: Job) -> None:
    """Feed the next ``chunk_len`` prompt tokens; emit Progress; phase -> "decode" after the last chunk."""
    t0 = time.perf_counter()
    n = sched.config.daemon.chunk_len
    chunk = job.prompt[job.pos:job.pos + n]
    job.logits, job.state = sched.engine.model.forward(chunk, job.state)
    job.pos += len(chunk)
    job.t_prefill += time.perf_counter() - t0
    sched.emit(job.topic, m.Progress(job_id=job.id, phase="prefill", done=job.pos, total=len(job.prompt)))
    if job.pos >= len(job.prompt):
        job.phase = "decode"


#: seconds between two rounds of Token events: each round sends, in one burst, every decoding generation's
#: text decoded since its last event (a generation's first text goes out at once; the rest at most this late).
#: One round for all generations wakes the server loop once per interval instead of once per generation;
#: publishing costs ~100 µs per event on both sides (sign, encode, send; verify, decode), as much as a whole
#: decode step of a small model.
TOKEN_INTERVAL = 0.01


def _send(sched, job: Job) -> None:
    """One Token event with the job's text from ``job.emitted`` to ``job.ready`` (characters)."""
    job.seq += 1
    sched.emit(job.topic, m.Token(job_id=job.id, seq=job.seq, text=job.text[job.emitted:job.ready]))
    job.emitted = job.ready


def _emit_text(sched, job: Job, upto: int, force: bool = False) -> None:
    """Mark ``job.text[:upto]`` as sendable; send it now when ``force`` or for the job's first text, else at
    the scheduler's next round (:func:`send_ready`)."""
    job.ready = upto
    if upto > job.emitted and (force or not job.seq):
        _send(sched, job)


def send_ready(sched, jobs: list[Job]) -> None:
    """A round of Token events: every job in ``jobs`` with sendable text not yet sent gets one event (the
    scheduler calls this at most every ``TOKEN_INTERVAL`` s)."""
    for job in jobs:
        if job.ready > job.emitted:
            _send(sched, job)


def flush_text(sched, job: Job) -> None:
    """Send the job's pending sendable text now (a cancelled job's last Token event)."""
    if job.ready > job.emitted:
        _send(sched, job)


def next_tokens(jobs: list[Job]) -> list[int | BaseException]:
    """Sample each job's next token from its last logits (float32 [vocab]) with its own Sampler (greedy
    rows by one argmax each: ``sampling.sample_rows``) and append it to ``job.out_tokens``. A job whose
    sampling fails gets its exception in its place (the others still get their tokens)."""
    from rwkv_chat.models.text.sampling import sample_rows

    tokens = sample_rows([j.sampler for j in jobs], [j.logits for j in jobs], return_errors=True)
    for j, t in zip(jobs, tokens):
        if not isinstance(t, BaseException):
            j.out_tokens.append(t)
    return tokens


def _at_length(job: Job) -> bool:
    if len(job.out_tokens) >= job.max_tokens:
        job.reason = "length"
        return True
    return False


def after_token(sched, job: Job, logits) -> bool:
    """Take the logits (float32 [vocab]) that followed the job's last token; detokenize it, look for a
    stop sequence and stream the text that can no longer be part of one. Returns True when the job is
    finished (``job.reason`` "stop" or "length"; call :func:`close_reply` after taking its state)."""
    job.logits = logits
    piece = job.decoder.push(job.out_tokens[-1])
    if not piece:
        return _at_length(job)
    start = len(job.text)
    job.text += piece
    for s in job.stops:
        i = job.text.find(s, max(0, start - len(s) + 1))    # a stop can only end in the new text
        if i >= 0:
            job.text = job.text[:i]
            job.reason = "stop"
            _emit_text(sched, job, len(job.text), force=True)
            return True
    if _at_length(job):
        return True
    _emit_text(sched, job, len(job.text) - held_back(job.text, job.stops))
    return False


def close_reply(sched, job: Job) -> None:
    """End a finished job's text: flush the detokenizer (reason "length") and, for a chat reply cut by
    ``max_tokens``, feed the template's end ``"\\n\\n"`` to ``job.state`` as the template does."""
    if job.reason == "length":
        job.text += job.decoder.flush()
        if job.kind == "chat":
            _, job.state = sched.engine.model.forward(sched.engine.tokenizer.encode(CHAT_STOP), job.state)
    _emit_text(sched, job, len(job.text), force=True)


def reply_text(job: Job) -> str:
    return job.text.strip() if job.kind == "chat" else job.text


def commit(sched, job: Job) -> None:
    """Persist a finished chat exchange: state file (atomic), then the turns (one transaction)."""
    if job.kind != "chat":
        return
    store, cid, model = sched.store, job.conversation_id, sched.engine.model
    n = job.base_n + 1
    sd = job.sampler.state_dict()
    path = store.state_path(cid, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    job.state.save(path, metadata=sampler_to_meta(sd))
    now = time.time()
    store.commit_exchange(
        cid, Turn(0, "user", job.user_text, job.user_tokens, job.user_created, job.user_created),
        Turn(0, "assistant", reply_text(job), len(job.out_tokens), job.user_created, now),
        state_n=n, fingerprint=model.fingerprint, drop_from=job.drop_from)
    sched.sessions.put(cid, job.state, sd, n)
    store.prune_states(cid, keep_from=job.base_n)


def done_event(job: Job) -> m.Done:
    rate = len(job.out_tokens) / job.t_decode if job.t_decode > 0 else 0.0
    return m.Done(job_id=job.id, reason=job.reason, text=reply_text(job), prompt_tokens=len(job.prompt),
                  tokens=len(job.out_tokens), prefill_s=job.t_prefill, decode_s=job.t_decode, tokens_per_s=rate)
