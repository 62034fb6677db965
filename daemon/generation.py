"""One generation's lifecycle: a raw completion or one chat exchange, from set-up to its last event.

The server queues a :class:`Job` (what a client asked for: a model load or a generation). The scheduler,
admitting a generation job, makes a :class:`Generation` of it, which holds what it needs: the model host, the
store, the in-memory conversation states (sessions), the event callback and the config. Its phases:

* ``starting`` — :meth:`Generation.start` makes the conversation of a first message (never without a model to
  answer it), builds the prompt tokens, the starting state and the sampler; emits Started. A chat resumes from
  the newest state of the loaded model that consumed part of the stored transcript
  (:meth:`~rwkv_chat.daemon.sessions.Sessions.resume`) and reads the rest: nothing after a turn of its own, the
  whole history on a model it never ran on or when its state files are unreadable (the Progress events then
  say why). A regenerate or an edit branches off the turn it names (:func:`~rwkv_chat.daemon.branches.redo_target`)
  and starts from the state saved after the reply above it; a chat read from its start takes the shared state
  of its system prompt (:mod:`~rwkv_chat.daemon.prompt_cache`); a chat whose message was read ahead while it
  was typed (:mod:`~rwkv_chat.daemon.drafts`) starts after what was read. Done says how many prompt tokens
  were re-read history, came from the prompt cache, were read while typed;
* ``prefill`` — :meth:`Generation.prefill_chunk` feeds ``chunk_len`` prompt tokens at a time (a Progress
  event per chunk); where it re-reads history, the state at the end of the history is saved as well (so a
  regenerate or an edit of the new exchange needs no re-read either);
* ``decode`` — one token per batched decode step of the scheduler: :func:`sample_next` samples every
  generation's token from its last logits, the scheduler feeds them to the host's decoder in one step, and
  :meth:`Generation.push` takes each one's new logits (detokenize, stops, streaming);
* ``done`` — :meth:`Generation.finish` ends the reply and commits a chat exchange (state file, then the turns).
  A cancelled (stopped) chat reply is committed too, as far as it got (``reason`` "cancelled"), with its state,
  so the next message continues after it; one stopped before any reply state exists is committed without a
  state (the next message re-reads it); a regenerate or edit cancelled before it started changes nothing, nor
  does a conversation's first message (the conversation is not made). The stored reply keeps its ``reason``
  and decode speed. :meth:`Generation.done` then sends Done, or :meth:`Generation.fail` Failed.

A stateless chat (kind ``"messages"``, a ``ChatMessages`` request: the whole conversation as messages, nothing
stored) is set up by :mod:`~rwkv_chat.daemon.stateless`: its prompt starts from the longest prefix the prefix
cache holds (all of it cached: straight to ``decode``), and the states at the end of its prompt and after its
reply go back into the cache.

Randomness: without a seed every generation draws from a fresh random stream (a regenerate gives another
reply); with one, the same request on the same conversation gives the same reply. A conversation's repetition
penalties carry on from its saved sampler state.

The chat format is the model's chat template (``Model.chat_template``); for RWKV, ChatRWKV's
``"User: {message}\\n\\nAssistant:"``, the reply ending at ``"\\n\\n"``, which is fed to the state so the next
exchange starts where the reply ended. A reply also ends (reason "stop") when the sampled token is one of the
template's ``stop_tokens`` (a transformer's ``<|im_end|>``): the state consumed it, it is never shown, and the
rest of the template's closing text (``after_stop``) is fed after it; a raw completion ends so at the
tokenizer's ``eos_ids``. The context limit and its policy: :mod:`rwkv_chat.daemon.context`.

Text: the cost of a generated token does not grow with the text before it. Text sent in Token events is kept
as a list of pieces (joined once, at the end); only the unsent tail is a string, and the stop sequences are
found by a :class:`~rwkv_chat.daemon.stops.StopScanner` (a KMP automaton per stop string: O(new characters x stops) per token). Token
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
from .branches import redo_target
from .stops import StopScanner
from .store import DIGEST_KEY, title_from, transcript_digest

log = logging.getLogger("rwkv_chat.daemon")

#: seconds between two rounds of Token events: each round sends, in one burst, every decoding generation's
#: text decoded since its last event (a generation's first text goes out at once; the rest at most this late).
#: One round for all generations wakes the server loop once per interval instead of once per generation;
#: publishing costs ~100 µs per event on both sides (sign, encode, send; verify, decode), as much as a whole
#: decode step of a small model.
TOKEN_INTERVAL = 0.01

#: characters of text in one Token event (4 UTF-8 bytes at most each: within MAX_EVENT_TEXT)
PIECE_CHARS = m.MAX_EVENT_TEXT // 4


@dataclass
class Job:
    """A request the server queued for the scheduler: a model load or a generation."""

    id: str
    kind: str                     # "load" | "complete" | "chat" | "messages"
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
        self.stop_ids: frozenset[int] = frozenset()   # sampled token ids that end the generation (not shown)
        self.stop_token: int | None = None            # the one that ended it
        self.limit: int | None = None                 # context limit in tokens (rwkv_chat.daemon.context)
        self.dropped = 0                              # exchanges left out to fit the limit
        self.used: int | None = None                  # tokens the state consumed at the end (with a limit)
        self.max_tokens = 0
        self.created = False                          # start() made the conversation for this chat message
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
        self.base_n = 0               # exchanges before this one
        self.resumed_n = 0            # exchanges the starting state had consumed
        self.pairs: list[tuple[str, str]] = []    # (user, reply) of the exchanges before this one
        self.system_prompt = ""
        self.history = 0              # prompt tokens of the history re-read before the new message
        self.note = ""                # why history is re-read (Progress text)
        self.parent: int | None = None    # the turn the new message follows (None: the leaf when it commits)
        self.user_index: int | None = None   # a regenerate: the stored message answered again
        self.replies: list[int] = []      # the indices of the replies of ``pairs``
        self.user_text = ""
        self.user_created = 0.0
        self.user_tokens = 0
        self.cached = 0               # prompt tokens whose state came from a cache (stateless requests: the
                                      # prefix cache; chats: the shared prompt cache)
        self.cache_at = 0             # prompt position after which the state is shared (0: none)
        self.cache_tokens: list[int] = []
        self.draft_tokens = 0         # tokens of the message read ahead from its draft

    def info(self) -> dict:
        return {"job_id": self.id, "kind": self.kind, "client_id": self.client_id,
                "conversation_id": self.conversation_id, "phase": self.phase,
                "prefill": [self.pos, len(self.prompt)], "tokens": len(self.out_tokens)}

    # ------------------------------------------------------------------ set-up and prefill
    def start(self) -> None:
        """Build the prompt tokens, starting state and sampler; emit Started (phase -> "prefill").
        Raises NoModel, NotFound, Conflict, SamplingError, ValueError, ContextLimitExceeded; a conversation made
        for this chat message is removed again then (a refused message leaves no empty conversation)."""
        try:
            self._start()
        except BaseException:
            if self.created:
                self.created = False
                try:
                    self.store.delete(self.conversation_id)
                except Exception as e:  # noqa: BLE001 — the refusal is what the client must hear
                    log.warning("conversation %s: not removed after a refused start: %s", self.conversation_id, e)
            raise

    def _start(self) -> None:
        from rwkv_chat.models.errors import StateError
        from rwkv_chat.models.text.sampling import Sampler
        from rwkv_chat.models.text.tokenizers import IncrementalDecoder

        from .context import chat_history, exchanges, fit_chat, fit_complete, limit_of

        model, tok, template = self.host.need()
        req = self.request
        sampler_sd = None
        given = {k: v for k, v in req.sampling.items() if v is not None}
        base = self.config.sampling_base(getattr(template, "sampling_defaults", None))
        self.limit = limit_of(model, self.config.model.context_limit)
        if self.kind == "complete":
            args = base.updated(given)
            self.state, self.stops = model.zero_state(), tuple(req.stop)
            self.stop_ids = frozenset(tok.eos_ids)
            self.prompt = tok.encode(req.prompt)
            room = fit_complete(limit=self.limit, prompt=self.prompt) if self.limit else None
        elif self.kind == "messages":
            from . import stateless

            args = stateless.start(self, model, tok, template, given)
            closing = len(tok.encode(template.stop)) if template.stop else 0
            room = fit_complete(limit=self.limit, prompt=self.prompt, closing=closing) if self.limit else None
        else:
            store, cid = self.store, self.conversation_id
            if self.mode == "chat" and not store.exists(cid):     # made now, with a model to answer
                store.create(cid, title=title_from(req.message))
                self.created = True
            conv, turns = store.get(cid), store.turns(cid)
            args = base.updated({**conv.sampling, **given})
            if self.mode == "chat":
                message, before = req.message, turns
                self.parent = turns[-1].index if turns else -1
            else:
                user, before = redo_target(store, cid, self.mode, req.turn)
                message = user.text if self.mode == "regenerate" else req.text
                self.parent, self.user_index = user.parent, user.index if self.mode == "regenerate" else None
            self.pairs, self.replies = exchanges(before)
            self.system_prompt, self.base_n = conv.system_prompt, len(self.pairs)
            resume = self.sessions.resume(model, cid, conv.system_prompt, self.pairs, self.replies)
            prompts = getattr(self.sessions, "prompts", None)
            h = chat_history(tok, template, conv.system_prompt, self.pairs,
                             resume.n if resume.state is not None else None, share=prompts is not None)
            if not h.resumed:
                resume.state, resume.sampler, resume.n = None, None, 0
            history = h.tokens
            if h.shared:                        # from the start: the system prompt's state may be shared
                cached = prompts.get(model, history[:h.shared])
                if cached is not None:
                    resume.state, self.cached, history = cached, h.shared, history[h.shared:]
                else:
                    self.cache_at, self.cache_tokens = h.shared, history[:h.shared]
            self.state = resume.state if resume.state is not None else model.zero_state()
            sampler_sd, self.resumed_n = resume.sampler, resume.n
            self.prompt = history + tok.encode(template.prompt(message))
            drafts = getattr(self.sessions, "drafts", None)
            if drafts is not None and self.mode == "chat" and not history:     # read ahead while typed?
                got = drafts.take(cid, (model.fingerprint, transcript_digest(conv.system_prompt, self.pairs)),
                                  self.prompt)
                if got is not None:
                    self.pos, self.state = got
                    self.draft_tokens = self.pos
            self.history = len(history) if resume.n < self.base_n else 0
            if resume.problems:
                self.note = (f"re-reading the conversation: its saved state could not be used "
                             f"({resume.problems[0]})")
            elif self.history:
                self.note = (f"re-reading {2 * (self.base_n - resume.n)} earlier turns: this model has no saved "
                             "state after them")
            self.stops, self.user_text = (template.stop,), message
            self.stop_ids = frozenset(template.stop_tokens)
            self.user_created, self.user_tokens = time.time(), len(tok.encode(template.prompt(message)))
            room = None
            if self.limit:
                w = fit_chat(limit=self.limit, policy=self.config.model.context_policy,
                             used=self.state.token_count, prompt=self.prompt, history=self.history, tok=tok,
                             template=template, system_prompt=conv.system_prompt, pairs=self.pairs,
                             message=message, max_tokens=args.max_tokens)
                room, self.dropped = w.room, w.dropped
                if w.zero:
                    self.state, self.prompt, self.history = model.zero_state(), w.prompt, w.history
                    self.note = (f"the conversation is longer than the context limit of {self.limit:,} tokens: "
                                 f"its {2 * w.dropped} oldest turns are left out of the model's view")
        if not self.prompt:
            raise ValueError("the prompt is empty")
        self.sampler = Sampler(args, tok)
        if sampler_sd is not None:
            try:
                self.sampler.load_state_dict(sampler_sd)
            except StateError as e:      # the penalty counts start again; the state itself is fine
                log.warning("conversation %s: sampler state not used: %s", self.conversation_id, e)
                self.sampler = Sampler(args, tok)
            # the penalties carry on; the randomness never repeats an earlier generation's: a fresh draw, or the seed
            if args.seed is None:
                self.sampler.generator.seed()
            else:
                self.sampler.generator.manual_seed(args.seed)
        if self.sampler.seen is not None:       # the context that a repetition penalty applies to
            self.sampler.observe(self.prompt)
        self.detok = IncrementalDecoder(tok)
        from rwkv_chat.daemon.config import check_max_tokens

        check_max_tokens(args.max_tokens, self.config.daemon.max_tokens_limit)
        self.max_tokens = args.max_tokens if room is None else max(1, min(args.max_tokens, room))
        self.scanner = StopScanner(self.stops)
        self.phase = "prefill" if self.pos < len(self.prompt) else "decode"     # all of it cached: decode
        self.t_start = time.perf_counter()
        self.emit(self.topic, m.Started(job_id=self.id, kind=self.kind, conversation_id=self.conversation_id,
                                        message=m.clip_bytes(self.user_text, m.MAX_EVENT_TEXT)[0],
                                        cached_tokens=self.cached if self.kind == "messages" else 0))

    def prefill_chunk(self) -> None:
        """Feed the next ``chunk_len`` prompt tokens; emit Progress; phase -> "decode" after the last chunk."""
        t0 = time.perf_counter()
        n = self.config.daemon.chunk_len
        end = min(self.pos + n, len(self.prompt))
        for mark in (self.history, self.cache_at):
            if self.pos < mark < end:
                end = mark                       # a chunk ends where the re-read history / a shared prefix does
        chunk = self.prompt[self.pos:end]
        self.logits, self.state = self.host.model.forward(chunk, self.state)
        self.pos += len(chunk)
        if self.pos == self.history:
            self._save_history_state()
        if self.pos == self.cache_at and self.cache_tokens:
            self.sessions.prompts.put(self.host.model, self.cache_tokens, self.state)
        self.t_prefill += time.perf_counter() - t0
        self.t_chunk = time.perf_counter()
        self.emit(self.topic, m.Progress(job_id=self.id, phase="prefill", done=self.pos, total=len(self.prompt),
                                         text=self.note))
        if self.pos >= len(self.prompt):
            self.phase = "decode"
            if self.kind == "messages":
                from . import stateless

                stateless.prompt_read(self)

    def _save_history_state(self) -> None:
        """Save the state after the re-read history (the exchanges before this one) on this model, so a
        regenerate or edit of this exchange resumes from it. A failure to write it only costs a later re-read."""
        cid, model = self.conversation_id, self.host.model
        if not self.base_n:
            return
        path = self.store.state_path(cid, self.replies[self.base_n - 1], model.fingerprint)
        try:
            self.store.make_model_dir(cid, model.fingerprint)
            self.state.save(path, metadata={DIGEST_KEY: transcript_digest(self.system_prompt, self.pairs)})
        except OSError as e:
            log.warning("conversation %s: could not save the state after its history: %s", cid, e)

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
        if self.out_tokens[-1] in self.stop_ids:     # an end token: consumed by the state, never shown
            self.stop_token, self.reason = self.out_tokens[-1], "stop"
            self._append(self.detok.flush())
            self._sendable(len(self.pending), force=True)
            return True
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
        if self.kind in ("chat", "messages") and self.text_bytes + n >= m.MAX_TEXT:
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
        """End the generation with ``reason`` ("stop", "length", "cancelled"): leave the decoder, close the reply
        (:meth:`_close_reply`) and commit a chat exchange (:meth:`_commit`), a cancelled one too (a stopped reply
        is kept as far as it got). A generation cancelled before it started sends nothing and commits nothing,
        but a plain chat message, which is kept with an empty stopped reply. Raises what those raise (the
        caller then calls :meth:`fail`)."""
        self.reason = reason
        self.leave()
        if self.phase == "starting":
            if reason == "cancelled" and self.kind == "chat" and self.mode == "chat":
                self._commit_unstarted()
            return
        if reason == "cancelled" and self.kind != "chat":
            self.send_pending()
            return
        fed = self._close_reply()
        if self.kind == "messages":
            from . import stateless

            stateless.reply_done(self, fed)
        if self.limit is not None and self.state is not None:
            self.used = self.state.token_count
        self._commit()

    def _close_reply(self) -> list[int]:
        """Flush the detokenizer and, for a chat reply that did not end at the template's ``stop`` (cut by
        ``max_tokens`` or stopped), feed that ``stop`` to the state as the template does; after a reply ended by
        one of the template's ``stop_tokens`` (consumed already), feed the rest of its closing text
        (``template.after_stop``). A chat cancelled while its prompt was read has no reply state (``state``
        None then). Returns the tokens fed after the reply (the closing text's)."""
        fed: list[int] = []
        if self.kind in ("chat", "messages") and self.stop_token is not None and self.state is not None:
            rest = self.host.template.after_stop(self.stop_token)
            if rest:
                fed = self.host.tokenizer.encode(rest)
                _, self.state = self.host.model.forward(fed, self.state)
        if self.reason in ("length", "cancelled"):
            self._append(self.detok.flush())      # (held bytes: at most one character)
            if self.kind in ("chat", "messages"):
                if self.phase == "prefill":
                    self.state = None
                elif self.state is not None:
                    fed = self.host.tokenizer.encode(self.host.template.stop)
                    self.logits, self.state = self.host.model.forward(fed, self.state)
        self._sendable(len(self.pending), force=True)
        return fed

    def reply_text(self) -> str:
        return self.text.strip() if self.kind in ("chat", "messages") else self.text

    def _commit(self) -> None:
        """Persist a finished (or stopped) chat exchange: the turns (one transaction); the state file of the new reply after them (every reply's state is kept:
        a branch from any turn re-reads nothing above it)."""
        if self.kind != "chat":
            return
        store, cid, model = self.store, self.conversation_id, self.host.model
        fp = model.fingerprint
        n = self.base_n + 1
        reply = self.reply_text()
        digest = transcript_digest(self.system_prompt, self.pairs + [(self.user_text, reply)])
        sd = self.sampler.state_dict()
        conv = store.get(cid)                    # NotFound: deleted meanwhile
        saved = self.state is not None and conv.system_prompt == self.system_prompt   # else: consumed the old one
        now = time.time()
        turn = store.commit_exchange(
            cid, m.TurnInfo(0, "user", self.user_text, self.user_tokens, self.user_created, self.user_created),
            m.TurnInfo(0, "assistant", reply, len(self.out_tokens), self.user_created, now,
                       reason=self.reason, tokens_per_s=self.tokens_per_s(), family=model.family),
            parent=self.parent, user_index=self.user_index)
        if saved:                                # after the turns: a state file always names a stored reply
            try:
                store.make_model_dir(cid, fp)
                self.state.save(store.state_path(cid, turn, fp), metadata={**sampler_to_meta(sd), DIGEST_KEY: digest})
                store.update(cid, state_n=n, model_fingerprint=fp, state_stale=0)
            except OSError as e:
                log.warning("conversation %s: could not save the state after turn %d: %s", cid, turn, e)
            self.sessions.put(cid, self.state, sd, n, digest)
        else:
            self.sessions.drop(cid)

    def _commit_unstarted(self) -> None:
        """Keep the message of a chat cancelled before it started, with an empty stopped reply (no state), in a
        conversation that exists; a first message's conversation, made only when its reply starts, is not made."""
        if not self.store.exists(self.conversation_id):
            return
        now = time.time()
        self.user_text = self.request.message
        self.store.commit_exchange(self.conversation_id, m.TurnInfo(0, "user", self.user_text, 0, now, now),
                                   m.TurnInfo(0, "assistant", "", 0, now, now, "cancelled"),
                                   state_n=None, fingerprint="")

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
        text, cut = m.clip_bytes(self.reply_text(), m.MAX_EVENT_TEXT)
        if self.kind == "chat":
            self.emit(self.topic, m.PromptReuse(job_id=self.id, reread_tokens=self.history, cached_tokens=self.cached,
                                                draft_tokens=self.draft_tokens))
        self.emit(self.topic, m.Done(job_id=self.id, reason=self.reason, text=text,
                                     prompt_tokens=len(self.prompt), tokens=len(self.out_tokens),
                                     prefill_s=self.t_prefill, decode_s=self.t_decode, tokens_per_s=rate,
                                     truncated=cut, cached_tokens=self.cached if self.kind == "messages" else 0,
                                     context_used=self.used,
                                     context_limit=self.limit, dropped_turns=self.dropped))

    def fail(self, kind: str, message: str) -> None:
        """Send the Failed event (``kind`` as ``host.classify`` names it)."""
        self.emit(self.topic, m.Failed(job_id=self.id, kind=kind, message=message))


def sample_next(gens: list[Generation]) -> list[int | BaseException]:
    """Sample each generation's next token from its last logits (float32 [vocab]) with its own Sampler
    (greedy rows by one argmax each: ``batch_sampling.sample_rows``; rows on CUDA replay the passes as CUDA graphs)
    and append it to its ``out_tokens``. A generation whose sampling fails gets its exception in its place (the
    others still get their tokens)."""
    from rwkv_chat.models.text.batch_sampling import sample_rows

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
