"""Draft prefill: a message is read while it is typed, so that on Enter only its untyped remainder is.

A client sends the draft of the next message of a conversation (``Draft``, debounced by the TUI) as it
changes; the daemon keeps the newest per conversation (:meth:`Drafts.update`, any thread). The scheduler,
when no generation is admitted (:meth:`Drafts.due`; draft work never runs before another client's prefill
or decode step), feeds the draft's tokens in chunks into a scratch copy of the state the conversation's
next message starts from (:meth:`Drafts.step`); that base state is the conversation's own (``Sessions.resume``
covering every exchange of its chosen path) or, for a first message, the shared state of its system prompt
(``PromptCache``) or the model's zero state.

Which tokens: the message sits in the template's prompt (``template.prompt``) after a fixed head (``"User: "``
for RWKV); the draft's tokens are those of that head and the draft text, less the last :data:`HOLD` (they
may still change as the text grows or when the rest of the prompt follows). States are kept at a few
checkpoints (at most :data:`CHECKPOINTS` chunk ends, dense near the end, sparse towards the start:
:func:`thin`); a draft edited before its end rolls back to the last checkpoint within the tokens it still
shares with the old one, and is read on from there.

On Enter (:meth:`Drafts.take`) a chat whose prompt is just the new message, from the same base (the same model
and transcript digest), takes the state of the latest checkpoint whose tokens are a prefix of the message's
prompt tokens: the same tokens read in other chunks, so the same reply. Anything else (another base, a template
that does not quote the message) leaves the draft unused.

Runs in the scheduler thread but for :meth:`update` / :meth:`stats` (a lock guards the table).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from .store import transcript_digest

log = logging.getLogger("rwkv_chat.daemon")

#: trailing tokens of a draft not read ahead (they may change as the text grows)
HOLD = 2
#: states kept per draft: the base's, the latest chunk's end, and between them ends spaced wider the older
#: they are (:func:`thin`)
CHECKPOINTS = 6
#: conversations whose drafts are kept at once (least recently updated out first)
MAX_DRAFTS = 4
#: tokens per draft chunk
DRAFT_CHUNK = 64


@dataclass
class Draft:
    text: str
    key: tuple | None = None                 # (fingerprint, transcript digest) of the base state
    tokens: list[int] = field(default_factory=list)     # the draft's tokens to read (HOLD left out)
    fed: int = 0                             # tokens of ``tokens`` read into ``state``
    state: object = None                     # the scratch state after ``fed`` tokens
    checkpoints: list = field(default_factory=list)     # [(n, state)] ascending, n tokens read
    dirty: bool = True                       # text changed since ``tokens`` were computed
    rollbacks: int = 0
    rolled_to: int = -1                      # tokens kept by the last rollback (the checkpoint read on from)


def message_head(template) -> str | None:
    """The text the template puts before the message in its prompt (None when it does not quote the message
    verbatim once)."""
    parts = template.prompt("\x00").split("\x00")
    return parts[0] if len(parts) == 2 else None


def thin(checkpoints: list, keep: int) -> list:
    """``checkpoints`` ``[(n, state)]`` (ascending ``n``) cut to ``keep`` entries: the first and the last stay;
    of the others, the one whose removal leaves the smallest gap for its distance from the end goes first (so
    the kept ones end up dense near the end, where edits are likely, and sparse towards the start)."""
    cps = list(checkpoints)
    while len(cps) > max(2, keep):
        last = cps[-1][0]
        _, i = min(((cps[i + 1][0] - cps[i - 1][0]) / (last - cps[i][0] + 1), i) for i in range(1, len(cps) - 1))
        del cps[i]
    return cps


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Drafts:
    """The drafts of conversations being typed (see the module docstring)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._drafts: OrderedDict[str, Draft] = OrderedDict()
        self._lock = threading.Lock()

    # -- any thread
    def update(self, cid: str, text: str) -> None:
        """The newest draft of ``cid`` ("" forgets it)."""
        if not self.enabled:
            return
        with self._lock:
            if not text:
                self._drafts.pop(cid, None)
                return
            d = self._drafts.get(cid)
            if d is None:
                d = self._drafts[cid] = Draft(text)
            elif d.text != text:
                d.text, d.dirty = text, True
            self._drafts.move_to_end(cid)
            while len(self._drafts) > MAX_DRAFTS:
                self._drafts.popitem(last=False)

    def forget(self, cid: str) -> None:
        with self._lock:
            self._drafts.pop(cid, None)

    def stats(self) -> dict:
        """Per conversation: tokens read ahead (``fed``), tokens to read (``tokens``), whether a newer text
        waits to be tokenized (``pending``), rollbacks and where the last one went (``rolled_to``)."""
        with self._lock:
            return {cid: {"fed": d.fed, "tokens": len(d.tokens), "pending": d.dirty, "rollbacks": d.rollbacks,
                          "rolled_to": d.rolled_to}
                    for cid, d in self._drafts.items()}

    def due(self) -> bool:
        """Whether some draft has work to do."""
        with self._lock:
            return any(d.dirty or d.fed < len(d.tokens) for d in self._drafts.values())

    # -- the scheduler thread
    def base(self, host, store, sessions, cid: str):
        """``(key, state)``: the state the next message of ``cid`` starts from and its key, or None when the
        conversation would first re-read turns (no saved state on this model) or there is no model."""
        from .protocol.messages import check_conversation_id

        model, tok, template = host.model, host.tokenizer, host.template
        if model is None or template is None:
            return None
        check_conversation_id(cid)
        if not store.exists(cid):
            return (model.fingerprint, transcript_digest("", [])), model.zero_state()
        conv, turns = store.get(cid), store.turns(cid)
        pairs = [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns) - 1, 2)]
        replies = [turns[i + 1].index for i in range(0, len(turns) - 1, 2)]
        key = (model.fingerprint, transcript_digest(conv.system_prompt, pairs))
        if pairs:
            resume = sessions.resume(model, cid, conv.system_prompt, pairs, replies)
            return (key, resume.state) if resume.state is not None and resume.n == len(pairs) else None
        if not conv.system_prompt:
            return key, model.zero_state()
        prompts = getattr(sessions, "prompts", None)
        if prompts is None:
            return None
        head = tok.encode(template.transcript(conv.system_prompt, []))
        state = prompts.get(model, head)
        if state is None:                  # read the system prompt once, for every conversation that has it
            _, state = model.forward(head, model.zero_state())
            prompts.put(model, head, state)
        return key, state

    def step(self, host, store, sessions, chunk: int = DRAFT_CHUNK) -> bool:
        """Read one chunk of the draft most recently updated that has work; returns whether one was read."""
        with self._lock:
            item = next(((c, d) for c, d in reversed(self._drafts.items())
                         if d.dirty or d.fed < len(d.tokens)), None)
            if item is None:
                return False
            cid, d = item
            text, dirty = d.text, d.dirty
        try:
            if dirty:
                if not self._retokenize(host, store, sessions, cid, d, text):
                    return True
                with self._lock:               # pending until the tokens are those of the newest text
                    d.dirty = d.text != text
            end = min(d.fed + chunk, len(d.tokens))
            if end <= d.fed:
                return True
            _, d.state = host.model.forward(d.tokens[d.fed:end], d.state)
            d.fed = end
            d.checkpoints = thin(d.checkpoints + [(end, d.state.clone())], CHECKPOINTS)
        except Exception as e:  # noqa: BLE001 — a draft is only a head start; drop it
            log.warning("draft of %s dropped: %s", cid, e)
            self.forget(cid)
        return True

    def _retokenize(self, host, store, sessions, cid: str, d: Draft, text: str) -> bool:
        """New text: its tokens; roll back to the last checkpoint they still share (a new base: start over).
        Returns False when the draft cannot be read ahead (it is dropped)."""
        head = message_head(host.template) if host.template is not None else None
        base = self.base(host, store, sessions, cid) if head is not None else None
        if base is None:
            self.forget(cid)
            return False
        key, state = base
        tokens = host.tokenizer.encode(head + text)
        tokens = tokens[:max(0, len(tokens) - HOLD)]
        if key != d.key:
            d.key, d.fed, d.state, d.checkpoints = key, 0, state.clone(), [(0, state.clone())]
        keep = common_prefix(d.tokens, tokens)
        if keep < d.fed:                       # edited before what was read: back to a checkpoint
            d.checkpoints = [(n, s) for n, s in d.checkpoints if n <= keep]     # the base's (0) always
            n, s = d.checkpoints[-1]
            d.fed, d.state = n, s.clone()
            d.rollbacks, d.rolled_to = d.rollbacks + 1, n
        d.tokens = tokens
        return True

    def take(self, cid: str, key: tuple, prompt: list[int]):
        """For a chat of ``cid`` from the base ``key`` whose prompt tokens are ``prompt`` (the new message's
        only): ``(n, state)``, a private state after ``prompt[:n]`` read ahead (n < len(prompt)), or None. The
        draft is used up either way."""
        with self._lock:
            d = self._drafts.pop(cid, None)
        if d is None or d.key != key:
            return None
        k = common_prefix(d.tokens[:d.fed], prompt)
        best = max(((n, s) for n, s in d.checkpoints if 0 < n <= k and n < len(prompt)),
                   key=lambda x: x[0], default=None)
        if best is None:
            return None
        return best[0], best[1].clone()
