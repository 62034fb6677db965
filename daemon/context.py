"""The context limit of a conversation: how many tokens its state may consume, and what happens past it.

The limit is the model's own (``model.context_limit``: a transformer's KV cache length; None for RWKV, whose
state has no length) or ``[model] context_limit`` of the config when set (> 0; the smaller of the two where
both are), so an RWKV model can be given one too. Tokens are counted by the state (``State.token_count``:
every token it consumed, the reply's closing text included).

The reply is always cut (reason "length") where the template's closing text would no longer fit. What a
turn needs, and what happens when it does not get it, is ``[model] context_policy``'s:

* ``"error"`` (default): the state's tokens, the new prompt (the history re-read, if any, and the message),
  one reply token and the closing text must fit; else the request fails with :class:`ContextLimitExceeded`
  (kind "ContextLimitExceeded"), saying how many tokens it needs and how to go on;
* ``"truncate"``: they must leave room for a reply of ``min(max_tokens, limit // 2)`` tokens; else the oldest
  exchanges are left out of the model's view — the state restarts from the zero state and re-reads the rest
  of the stored transcript — as few as leave that room (where no number does, the turn goes on as it is
  while one reply token fits, else with every earlier exchange left out). The stored turns stay as they
  are; the prefill's Progress event says how many were left out and the Done event carries
  ``dropped_turns``. A message that does not fit even alone fails as under "error".

A raw completion has no history to drop: it fails when its prompt does not fit, and is cut at the limit; a
stateless chat (``ChatMessages``) likewise, its reply cut where its closing text still fits.

What a chat turn reads before its message (:func:`chat_history`) is one computation for the turn itself and for
the context use a conversation reports before its next turn (:func:`conversation_used`, in
``GetConversation(context=True)``): the tokens the starting state consumed (a saved state's ``token_count``; 0
for the zero state) plus the history re-read after it — the number the next Done's ``context_used`` starts from.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("error", "truncate")


def exchanges(turns) -> tuple[list[tuple[str, str]], list[int]]:
    """The completed exchanges of a path of turns (``TurnInfo``, root first, user and reply alternating):
    ``(pairs, replies)`` — (user text, reply text) of each, and the stored index of each reply. A last user
    turn without its reply is left out."""
    pairs = [(turns[i].text, turns[i + 1].text) for i in range(0, len(turns) - 1, 2)]
    replies = [turns[i + 1].index for i in range(0, len(turns) - 1, 2)]
    return pairs, replies


@dataclass
class History:
    """What a chat turn reads before its message (:func:`chat_history`): ``tokens``, read after the starting
    state; ``resumed``: that state is the resumed one (else the zero state); ``shared``: the first ``shared`` of
    ``tokens`` are the system prompt's transcript, whose state the shared prompt cache may hold (0: none)."""

    tokens: list[int]
    resumed: bool
    shared: int = 0


def chat_history(tok, template, system_prompt: str, pairs: list[tuple[str, str]], resumed: int | None,
                 share: bool) -> History:
    """The history a chat turn reads before its message.

    Args:
        tok, template: the model's tokenizer and chat template.
        system_prompt, pairs: the conversation (pairs = its completed exchanges, (user text, reply text)).
        resumed: exchanges of ``pairs`` a saved state consumed (None: no state to resume from).
        share: whether the system prompt's state may come from (or go to) the shared prompt cache.
    Returns:
        The transcript after the resumed state's exchanges, tokenized; where there is no resumed state or its
        transcript is no longer a prefix of the whole, the whole transcript from the zero state — with
        ``share``, the system prompt's transcript tokenized on its own first (``shared`` tokens).
    """
    full = template.transcript(system_prompt, pairs)

    def rest(head: str) -> list[int]:
        return tok.encode(full[len(head):]) if len(full) > len(head) else []

    if resumed is not None:
        head = template.transcript(system_prompt, pairs[:resumed])
        if full.startswith(head):
            return History(rest(head), True)
    head = template.transcript(system_prompt, []) if share and system_prompt else ""
    if head and full.startswith(head):
        shared = tok.encode(head)
        return History(shared + rest(head), False, len(shared))
    return History(rest(""), False)


def conversation_used(conversation, turns, *, model, tok, template, sessions) -> int:
    """Tokens of a conversation's context in use before its next message: what the next chat turn on ``model``
    finds consumed when its message starts (that turn's Done ``context_used`` is this plus the message's,
    the reply's and the closing text's tokens), where it drops no turns (policy "truncate").

    Args:
        conversation: its ``ConversationInfo`` (``id``, ``system_prompt``). turns: its chosen path
            (``Store.turns``). model, tok, template: the loaded model, its tokenizer and chat template.
        sessions: the daemon's ``Sessions`` (:meth:`~rwkv_chat.daemon.sessions.Sessions.peek` finds the state
            the turn would resume from, reading only state-file metadata; ``prompts`` set: the system prompt's
            state is shared).
    Returns:
        The resumed state's ``token_count`` (0 for the zero state) plus the tokens of the history read after
        it (:func:`chat_history`).
    """
    pairs, replies = exchanges(turns)
    found = sessions.peek(model, conversation.id, conversation.system_prompt, pairs, replies)
    n, count = found if found is not None else (None, 0)
    h = chat_history(tok, template, conversation.system_prompt, pairs, n,
                     share=getattr(sessions, "prompts", None) is not None)
    return (count if h.resumed else 0) + len(h.tokens)


class ContextLimitExceeded(ValueError):
    """A turn does not fit in the conversation's context limit (see the module docstring)."""


def limit_of(model, configured: int) -> int | None:
    """The context limit in tokens for ``model`` given ``[model] context_limit`` (0 = the model's own);
    None where there is none."""
    own = getattr(model, "context_limit", None)
    if configured and configured > 0:
        return min(configured, own) if own else configured
    return own or None


@dataclass
class Window:
    """What :func:`fit_chat` decided: ``prompt`` tokens to feed from ``zero`` (True: from the zero state, the
    resumed state dropped), ``history`` of them re-read before the message, ``dropped`` exchanges left out,
    ``room``: the most reply tokens that still leave room for the closing text."""

    prompt: list[int]
    history: int
    zero: bool
    dropped: int
    room: int


def _room(limit: int, used: int, prompt: int, closing: int) -> int:
    return limit - used - prompt - closing


def fit_chat(*, limit: int, policy: str, used: int, prompt: list[int], history: int, tok, template,
             system_prompt: str, pairs: list[tuple[str, str]], message: str, max_tokens: int) -> Window:
    """Fit one chat turn in ``limit`` tokens.

    Args:
        used: tokens the starting state consumed. prompt: the tokens to feed after it (``history`` of them
            re-read from the transcript, then the message's). tok, template: the model's tokenizer and chat
            template. system_prompt, pairs, message: the conversation (pairs = stored exchanges before this one).
        max_tokens: the reply's token budget ("truncate" leaves room for ``min(max_tokens, limit // 2)``).
    Raises:
        ContextLimitExceeded: it does not fit (policy "error"), or the message alone does not (any policy).
    """
    closing = len(tok.encode(template.stop)) if template.stop else 0
    room = _room(limit, used, len(prompt), closing)
    truncate = policy == "truncate" and bool(pairs)
    want = min(max_tokens, limit // 2)
    if room >= (want if truncate else 1):
        return Window(prompt, history, False, 0, room)
    msg = tok.encode(template.prompt(message))
    need = used + len(prompt) + closing + 1
    if not truncate:
        if len(tok.encode(template.system(system_prompt))) + len(msg) + closing + 1 > limit:
            raise ContextLimitExceeded(f"the message needs {len(msg):,} tokens: more than the context limit of "
                                       f"{limit:,} tokens leaves for it; shorten it")
        raise ContextLimitExceeded(
            f"the conversation needs {need:,} tokens, beyond the context limit of {limit:,}: start a new "
            "conversation, or set [model] context_policy = \"truncate\" to leave out its oldest turns")

    def window(k: int) -> tuple[list[int], int]:
        hist = tok.encode(template.transcript(system_prompt, pairs[k:]))
        return hist + msg, len(hist)

    lo, hi = 1, len(pairs)                   # the fewest exchanges to drop that leave ``want`` reply tokens
    best = None
    while lo <= hi:
        k = (lo + hi) // 2
        ids, hist = window(k)
        if _room(limit, 0, len(ids), closing) >= want:
            best, hi = (k, ids, hist), k - 1
        else:
            lo = k + 1
    if best is None and room >= 1:
        return Window(prompt, history, False, 0, room)
    if best is None:
        ids, hist = window(len(pairs))
        if _room(limit, 0, len(ids), closing) < 1:
            raise ContextLimitExceeded(f"the message needs {len(msg):,} tokens: more than the context limit of "
                                       f"{limit:,} tokens leaves for it; shorten it")
        best = (len(pairs), ids, hist)
    k, ids, hist = best
    return Window(ids, hist, True, k, _room(limit, 0, len(ids), closing))


def fit_complete(*, limit: int, prompt: list[int], closing: int = 0) -> int:
    """The most tokens a raw completion of ``prompt`` may generate within ``limit``, leaving room for ``closing``
    tokens fed after it (a stateless chat's: the template's closing text). Raises ContextLimitExceeded when the
    prompt leaves no room for one."""
    room = limit - len(prompt) - closing
    if room < 1:
        raise ContextLimitExceeded(f"the prompt has {len(prompt):,} tokens: the context limit of {limit:,} "
                                   "tokens leaves no room for a reply; shorten it")
    return room
