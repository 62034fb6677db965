"""One generation's lifecycle: a raw completion or one chat exchange, from set-up to its last event.

The server queues a :class:`Job` (what a client asked for: a model load or a generation). The scheduler,
admitting a generation job, makes a :class:`Generation` of it, which holds what it needs: the model host, the
store, the in-memory conversation states (sessions), the event callback and the config. Its phases:

* ``starting`` — :meth:`Generation.start` builds the prompt tokens, the starting state (a saved one where the
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

Text: the cost of a generated token does not grow with the text before it. Text sent in Token events is kept
as a list of pieces (joined once, at the end); only the unsent tail is a string, and the stop sequences are
found by a :class:`StopScanner` (a KMP automaton per stop string: O(new characters x stops) per token). Token
events carry at most :data:`~rwkv_chat.daemon.protocol.messages.MAX_EVENT_TEXT` bytes each; a chat reply ends
(reason "length") at :data:`~rwkv_chat.daemon.protocol.messages.MAX_TEXT` bytes, so a stored turn and its Done
event stay within one frame.

Runs only in the scheduler thread (a job's ``cancel`` event is set from any thread).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from .protocol import messages as m
from .sessions import sampler_to_meta

log = logging.getLogger("rwkv_chat.daemon")

#: seconds between two rounds of Token events: each round sends, in one burst, every decoding generation's
#: text decoded since its last event (a generation's first text goes out at once; the rest at most this late).
#: One round for all generations wakes the server loop once per interval instead of once per generation;
#: publishing costs ~100 µs per event on both sides (sign, encode, send; verify, decode), as much as a whole
#: decode step of a small model.
TOKEN_INTERVAL = 0.01

#: characters of text in one Token event (4 UTF-8 bytes at most each: within MAX_EVENT_TEXT)
PIECE_CHARS = m.MAX_EVENT_TEXT // 4


class StopScanner:
    """Finds stop sequences in a text fed piece by piece: one KMP automaton per stop string, so feeding costs
    O(characters fed x stop strings) whatever the text before and the stops' lengths (their tables are built
    once, O(total stop length)).

    Args:
        stops: the stop strings (non-empty).
    """

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.tables = [self._table(s) for s in self.stops]
        self.matched = [0] * len(self.stops)     # per stop: the longest prefix of it that ends the text fed

    @staticmethod
    def _table(s: str) -> list[int]:
        fail, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = fail[k - 1]
            if s[i] == s[k]:
                k += 1
            fail[i] = k
        return fail

    def feed(self, piece: str) -> int | None:
        """Feed ``piece``. Returns None, or, when a stop sequence completed in it, how many characters to cut
        from the end of the text fed so far (``piece`` included) so that it ends where that stop begins (the
        first stop to complete; of those completing at once, the longest). The scanner is spent after a match."""
        if not self.stops:
            return None
        stops, tables, matched = self.stops, self.tables, self.matched
        for j, c in enumerate(piece, 1):
            best = 0
            for i, s in enumerate(stops):
                q = matched[i]
                while q and s[q] != c:
                    q = tables[i][q - 1]
                if s[q] == c:
                    q += 1
                if q == len(s):
                    best = max(best, q)
                    q = tables[i][q - 1]
                matched[i] = q
            if best:
                return len(piece) - j + best
        return None

    def held(self) -> int:
        """Characters at the end of the text fed so far that could begin a stop sequence."""
        return max(self.matched, default=0)


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
    owner: bytes = b""            # the connection (ROUTER identity) that sent it; b"" = the daemon itself
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
        self.owner = job.owner
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
        self.sent: list[str] = []     # the text sent in Token events, piece by piece
        self.pending = ""             # the text after it (not sent yet)
        self.ready = 0                # characters of ``pending`` that may be sent (no longer part of a stop)
        self.text_bytes = 0           # UTF-8 bytes of the whole text
        self.scanner: StopScanner | None = None
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
        from rwkv_chat.daemon.config import check_max_tokens

        check_max_tokens(args.max_tokens, self.config.daemon.max_tokens_limit)
        self.max_tokens = args.max_tokens
        self.scanner = StopScanner(self.stops)
        self.phase, self.t_start = "prefill", time.perf_counter()
        self.emit(self.topic, m.Started(job_id=self.id, kind=self.kind, conversation_id=self.conversation_id,
                                        message=m.clip_bytes(self.user_text, m.MAX_EVENT_TEXT)[0]))

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
        generation is finished (``reason`` "stop" or "length": ``max_tokens``, or a chat reply of
        ``MAX_TEXT`` bytes). Costs O(the token's text x stop strings), whatever the text before."""
        self.logits = logits
        piece = self.detok.push(self.out_tokens[-1])
        if not piece:
            return self.at_length()
        piece, full = self._append(piece)
        cut = self.scanner.feed(piece)
        if cut is not None:          # a stop starts in the unsent text: nothing sent can begin one (held back)
            self.pending = self.pending[:len(self.pending) - cut]
            self.reason = "stop"
            self._sendable(len(self.pending), force=True)
            return True
        if full:
            self.reason = "length"
            self._sendable(len(self.pending), force=True)
            return True
        if self.at_length():
            return True
        self._sendable(len(self.pending) - self.scanner.held())
        return False

    def _append(self, piece: str) -> tuple[str, bool]:
        """Add ``piece`` to the unsent text; for a chat reply, as much of it as keeps the reply within
        ``MAX_TEXT`` bytes. Returns what was added and whether a chat reply reached that size."""
        n = m.utf8_len(piece)
        full = False
        if self.kind == "chat" and self.text_bytes + n >= m.MAX_TEXT:
            piece, _ = m.clip_bytes(piece, m.MAX_TEXT - self.text_bytes)
            n, full = m.utf8_len(piece), True
        self.pending += piece
        self.text_bytes += n
        return piece, full

    @property
    def text(self) -> str:
        """The whole text so far (joins the pieces: O(length); for the end of a generation)."""
        return "".join(self.sent) + self.pending

    # ------------------------------------------------------------------ Token events
    def _send(self) -> None:
        """Token events with the first ``ready`` characters of the unsent text, at most ``PIECE_CHARS``
        characters each."""
        out, self.pending, self.ready = self.pending[:self.ready], self.pending[self.ready:], 0
        for i in range(0, len(out), PIECE_CHARS):
            self.seq += 1
            chunk = out[i:i + PIECE_CHARS]
            self.emit(self.topic, m.Token(job_id=self.id, seq=self.seq, text=chunk))
            self.sent.append(chunk)

    def _sendable(self, upto: int, force: bool = False) -> None:
        """Mark the first ``upto`` characters of the unsent text as sendable; send them now when ``force`` or
        for the first text, else at the scheduler's next round (:func:`send_round`)."""
        self.ready = upto
        if upto > 0 and (force or not self.seq):
            self._send()

    def send_pending(self) -> None:
        """Send the sendable text not yet sent, if any."""
        if self.ready > 0:
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
            self._append(self.detok.flush())      # (held bytes: at most one character)
            if self.kind == "chat":
                stop = self.host.template.stop
                _, self.state = self.host.model.forward(self.host.tokenizer.encode(stop), self.state)
        self._sendable(len(self.pending), force=True)

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
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state.save(path, metadata=sampler_to_meta(sd))
        now = time.time()
        store.commit_exchange(
            cid, m.TurnInfo(0, "user", self.user_text, self.user_tokens, self.user_created, self.user_created),
            m.TurnInfo(0, "assistant", self.reply_text(), len(self.out_tokens), self.user_created, now),
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

    def done(self) -> None:
        """Send the Done event (after :meth:`finish`)."""
        rate = len(self.out_tokens) / self.t_decode if self.t_decode > 0 else 0.0
        text, cut = m.clip_bytes(self.reply_text(), m.MAX_EVENT_TEXT)
        self.emit(self.topic, m.Done(job_id=self.id, reason=self.reason, text=text,
                                     prompt_tokens=len(self.prompt), tokens=len(self.out_tokens),
                                     prefill_s=self.t_prefill, decode_s=self.t_decode, tokens_per_s=rate,
                                     truncated=cut))

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
