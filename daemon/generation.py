"""One generation's lifecycle: a raw completion or one chat exchange, from set-up to its last event.

The server queues a :class:`Job` (what a client asked for: a model load or a generation). The scheduler,
admitting a generation job, makes a :class:`Generation` of it, which holds what it needs: the model host, the
store, the in-memory conversation states (sessions), the event callback and the config. Its phases:

* ``starting`` — :meth:`Generation.start` makes the conversation of a first message (never without a model to
  answer it), builds the prompt tokens, the starting state (a saved one where the
  conversation has it, else the model's zero state and the whole transcript) and the sampler; emits Started;
* ``prefill`` — :meth:`Generation.prefill_chunk` feeds ``chunk_len`` prompt tokens at a time (a Progress
  event per chunk);
* ``decode`` — one token per batched decode step of the scheduler: :func:`sample_next` samples every
  generation's token from its last logits, the scheduler feeds them to the host's decoder in one step, and
  :meth:`Generation.push` takes each one's new logits (detokenize, stops, streaming);
* ``done`` — :meth:`Generation.finish` ends the reply and commits a chat exchange (state file, then the turns)
  or, cancelled, commits nothing; :meth:`Generation.done` then sends Done, or :meth:`Generation.fail` Failed.

The chat format is the model's chat template (``Model.chat_template``); for RWKV, ChatRWKV's
``"User: {message}\\n\\nAssistant:"``, the reply ending at ``"\\n\\n"``, which is fed to the state so the next
exchange starts where the reply ended.

Runs only in the scheduler thread (a job's ``cancel`` event is set from any thread).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from .protocol import messages as m
from .sessions import sampler_to_meta
from .store import title_from

log = logging.getLogger("rwkv_chat.daemon")

#: seconds between two rounds of Token events: each round sends, in one burst, every decoding generation's
#: text decoded since its last event (a generation's first text goes out at once; the rest at most this late).
#: One round for all generations wakes the server loop once per interval instead of once per generation;
#: publishing costs ~100 µs per event on both sides (sign, encode, send; verify, decode), as much as a whole
#: decode step of a small model.
TOKEN_INTERVAL = 0.01


@dataclass
class Job:
    """A request the server queued for the scheduler: a model load or a generation."""

    id: str
    kind: str                     # "load" | "complete" | "chat"
    client_id: str
    topic: str
    request: m.Msg
    conversation_id: str = ""
    mode: str = ""                # chat: "chat" | "regenerate" | "edit"
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.time)


class Generation:
    """One admitted generation job (see the module docstring).

    Args:
        job: what was asked; its ``cancel`` event is this generation's.
        host: the model host (``rwkv_chat.daemon.host.Host``) with the loaded model.
        store: the conversation store. sessions: the in-memory conversation states.
        emit: ``emit(topic, event)``, thread-safe.
        config: the daemon's ``Config`` (``[sampling]`` defaults, ``[daemon] chunk_len``).
    """

    def __init__(self, job: Job, host, store, sessions, emit, config):
        self.id, self.kind, self.client_id, self.topic = job.id, job.kind, job.client_id, job.topic
        self.request, self.conversation_id, self.mode = job.request, job.conversation_id, job.mode
        self.cancel = job.cancel
        self.host, self.store, self.sessions, self.emit, self.config = host, store, sessions, emit, config
        self.phase = "starting"
        self.prompt: list[int] = []
        self.pos = 0
        self.state = None
        self.logits = None
        self.sampler = None
        self.detok = None             # IncrementalDecoder of the model's tokenizer
        self.stops: tuple[str, ...] = ()
        self.max_tokens = 0
        self.out_tokens: list[int] = []
        self.text = ""
        self.emitted = 0              # characters of ``text`` sent in Token events
        self.ready = 0                # characters of ``text`` that may be sent (no longer part of a stop)
        self.seq = 0
        self.reason = ""
        self.t_start = self.t_prefill = self.t_decode = 0.0
        self.t_chunk = 0.0            # perf_counter of the last prefill chunk (round-robin among prompts)
        self.handle: int | None = None   # slot handle in the host's decoder while decoding
        # chat bookkeeping
        self.base_n = 0
        self.drop_from: int | None = None
        self.user_text = ""
        self.user_created = 0.0
        self.user_tokens = 0

    def info(self) -> dict:
        return {"job_id": self.id, "kind": self.kind, "client_id": self.client_id,
                "conversation_id": self.conversation_id, "phase": self.phase,
                "prefill": [self.pos, len(self.prompt)], "tokens": len(self.out_tokens)}

    # ------------------------------------------------------------------ set-up and prefill
    def start(self) -> None:
        """Build the prompt tokens, starting state and sampler; emit Started (phase -> "prefill").
        Raises NoModel, StateError (a saved state of other weights), SamplingError, ValueError."""
        from rwkv_chat.models.text.sampling import Sampler
        from rwkv_chat.models.text.tokenizers import IncrementalDecoder

        model, tok, template = self.host.need()
        req = self.request
        sampler_sd = None
        given = {k: v for k, v in req.sampling.items() if v is not None}
        if self.kind == "complete":
            args = self.config.sampling.updated(given)
            text, self.state, self.stops = req.prompt, model.zero_state(), tuple(req.stop)
        else:
            store, cid = self.store, self.conversation_id
            if self.mode == "chat" and not store.exists(cid):     # made now, with a model to answer
                store.create(cid, title=title_from(req.message))
            conv, turns = store.get(cid), store.turns(cid)
            args = self.config.sampling.updated({**conv.sampling, **given})
            if self.mode == "chat":
                message, before = req.message, turns
                self.drop_from = None
            else:
                if len(turns) < 2 or turns[-1].role != "assistant":
                    raise ValueError(f"conversation {cid} has no assistant turn to {self.mode}")
                message = turns[-2].text if self.mode == "regenerate" else req.text
                before = turns[:-2]
                self.drop_from = turns[-2].index
            self.base_n = len(before) // 2
            state = None
            if (not conv.state_stale and 0 < self.base_n <= conv.state_n
                    and (self.sessions.has(cid, self.base_n) or store.state_path(cid, self.base_n).exists())):
                state, sampler_sd = self.sessions.get(model, cid, self.base_n)   # StateError if foreign
            if state is None:
                state, sampler_sd = model.zero_state(), None
                pairs = [(before[i].text, before[i + 1].text) for i in range(0, len(before) - 1, 2)]
                text = template.transcript(conv.system_prompt, pairs) + template.prompt(message)
            else:
                text = template.prompt(message)
            self.state, self.stops, self.user_text = state, (template.stop,), message
            self.user_created, self.user_tokens = time.time(), len(tok.encode(template.prompt(message)))
        self.prompt = tok.encode(text)
        if not self.prompt:
            raise ValueError("the prompt is empty")
        self.sampler = Sampler(args, tok)
        if sampler_sd is not None:
            self.sampler.load_state_dict(sampler_sd)
            if args.seed is not None:
                self.sampler.generator.manual_seed(args.seed)
        self.detok = IncrementalDecoder(tok)
        self.max_tokens = args.max_tokens
        self.phase, self.t_start = "prefill", time.perf_counter()
        self.emit(self.topic, m.Started(job_id=self.id, kind=self.kind, conversation_id=self.conversation_id,
                                        message=self.user_text))

    def prefill_chunk(self) -> None:
        """Feed the next ``chunk_len`` prompt tokens; emit Progress; phase -> "decode" after the last chunk."""
        t0 = time.perf_counter()
        n = self.config.daemon.chunk_len
        chunk = self.prompt[self.pos:self.pos + n]
        self.logits, self.state = self.host.model.forward(chunk, self.state)
        self.pos += len(chunk)
        self.t_prefill += time.perf_counter() - t0
        self.t_chunk = time.perf_counter()
        self.emit(self.topic, m.Progress(job_id=self.id, phase="prefill", done=self.pos, total=len(self.prompt)))
        if self.pos >= len(self.prompt):
            self.phase = "decode"

    # ------------------------------------------------------------------ decode
    def join(self, decoder) -> None:
        """Take a slot of the host's batch decoder with this generation's state (the decoder holds it now)."""
        self.handle = decoder.add(self.state)
        self.state = None

    def leave(self) -> None:
        """Take the state back from the batch decoder (between two steps)."""
        if self.handle is not None:
            h, self.handle = self.handle, None
            dec = self.host.decoder
            if dec is not None and h in dec.handles():
                self.state = dec.remove(h)

    def at_length(self) -> bool:
        """Whether ``max_tokens`` tokens are out (``reason`` "length")."""
        if len(self.out_tokens) >= self.max_tokens:
            self.reason = "length"
            return True
        return False

    def push(self, logits) -> bool:
        """Take the logits (float32 [vocab]) that followed the last sampled token; detokenize it, look for a
        stop sequence and stream the text that can no longer be part of one. Returns True when the
        generation is finished (``reason`` "stop" or "length")."""
        self.logits = logits
        piece = self.detok.push(self.out_tokens[-1])
        if not piece:
            return self.at_length()
        start = len(self.text)
        self.text += piece
        for s in self.stops:
            i = self.text.find(s, max(0, start - len(s) + 1))    # a stop can only end in the new text
            if i >= 0:
                self.text = self.text[:i]
                self.reason = "stop"
                self._sendable(len(self.text), force=True)
                return True
        if self.at_length():
            return True
        self._sendable(len(self.text) - held_back(self.text, self.stops))
        return False

    # ------------------------------------------------------------------ Token events
    def _send(self) -> None:
        """One Token event with the text from ``emitted`` to ``ready`` (characters)."""
        self.seq += 1
        self.emit(self.topic, m.Token(job_id=self.id, seq=self.seq, text=self.text[self.emitted:self.ready]))
        self.emitted = self.ready

    def _sendable(self, upto: int, force: bool = False) -> None:
        """Mark ``text[:upto]`` as sendable; send it now when ``force`` or for the first text, else at the
        scheduler's next round (:func:`send_round`)."""
        self.ready = upto
        if upto > self.emitted and (force or not self.seq):
            self._send()

    def send_pending(self) -> None:
        """Send the sendable text not yet sent, if any."""
        if self.ready > self.emitted:
            self._send()

    # ------------------------------------------------------------------ the end
    def finish(self, reason: str) -> None:
        """End the generation with ``reason`` ("stop", "length", "cancelled"): leave the decoder; a cancelled
        one sends its pending text and commits nothing; else the reply is closed (:meth:`_close_reply`) and a
        chat exchange committed (:meth:`_commit`). Raises what those raise (the caller then calls :meth:`fail`)."""
        self.reason = reason
        self.leave()
        if reason == "cancelled":
            self.send_pending()
            return
        self._close_reply()
        self._commit()

    def _close_reply(self) -> None:
        """Flush the detokenizer (reason "length") and, for a chat reply cut by ``max_tokens``, feed the
        template's end (``stop``) to the state as the template does."""
        if self.reason == "length":
            self.text += self.detok.flush()
            if self.kind == "chat":
                stop = self.host.template.stop
                _, self.state = self.host.model.forward(self.host.tokenizer.encode(stop), self.state)
        self._sendable(len(self.text), force=True)

    def reply_text(self) -> str:
        return self.text.strip() if self.kind == "chat" else self.text

    def _commit(self) -> None:
        """Persist a finished chat exchange: state file (atomic), then the turns (one transaction)."""
        if self.kind != "chat":
            return
        store, cid = self.store, self.conversation_id
        n = self.base_n + 1
        sd = self.sampler.state_dict()
        path = store.state_path(cid, n)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.state.save(path, metadata=sampler_to_meta(sd))
        now = time.time()
        store.commit_exchange(
            cid, m.TurnInfo(0, "user", self.user_text, self.user_tokens, self.user_created, self.user_created),
            m.TurnInfo(0, "assistant", self.reply_text(), len(self.out_tokens), self.user_created, now,
                       reason=self.reason, tokens_per_s=self.tokens_per_s()),
            state_n=n, fingerprint=self.host.model.fingerprint, drop_from=self.drop_from)
        self.sessions.put(cid, self.state, sd, n)
        store.prune_states(cid, keep_from=self.base_n)

    def release(self) -> None:
        """Leave the decoder whatever happens and drop the state and logits (phase -> "done")."""
        try:
            self.leave()
        except BaseException:   # noqa: BLE001 — the slot is given up in any case
            log.exception("job %s could not leave the decoder", self.id)
        self.phase = "done"
        self.state = self.logits = None

    def tokens_per_s(self) -> float:
        """The decode speed so far (tokens per second of decode steps)."""
        return len(self.out_tokens) / self.t_decode if self.t_decode > 0 else 0.0

    def done(self) -> None:
        """Send the Done event (after :meth:`finish`)."""
        rate = self.tokens_per_s()
        self.emit(self.topic, m.Done(job_id=self.id, reason=self.reason, text=self.reply_text(),
                                     prompt_tokens=len(self.prompt), tokens=len(self.out_tokens),
                                     prefill_s=self.t_prefill, decode_s=self.t_decode, tokens_per_s=rate))

    def fail(self, kind: str, message: str) -> None:
        """Send the Failed event (``kind`` as ``host.classify`` names it)."""
        self.emit(self.topic, m.Failed(job_id=self.id, kind=kind, message=message))


def sample_next(gens: list[Generation]) -> list[int | BaseException]:
    """Sample each generation's next token from its last logits (float32 [vocab]) with its own Sampler
    (greedy rows by one argmax each: ``sampling.sample_rows``) and append it to its ``out_tokens``. A
    generation whose sampling fails gets its exception in its place (the others still get their tokens)."""
    from rwkv_chat.models.text.sampling import sample_rows

    tokens = sample_rows([g.sampler for g in gens], [g.logits for g in gens], return_errors=True)
    for g, t in zip(gens, tokens):
        if not isinstance(t, BaseException):
            g.out_tokens.append(t)
    return tokens


def send_round(gens: list[Generation]) -> None:
    """A round of Token events: every generation with sendable text not yet sent gets one event (the
    scheduler calls this at most every :data:`TOKEN_INTERVAL` s)."""
    for g in gens:
        g.send_pending()


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that could begin a stop sequence (withheld from the stream)."""
    k = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                k = max(k, n)
                break
    return k
