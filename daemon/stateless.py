"""Stateless chat requests (``ChatMessages``): render a list of messages with the model's chat template and run
the reply from the longest prefix the :mod:`~rwkv_chat.daemon.prefix_cache` holds.

Rendering (:func:`render`): each message becomes a segment of text, tokenized on its own, so that the tokens
of a conversation's first turns are the same in every later request that repeats them (a tokenizer may join
text across a segment boundary differently; segments never are):

* ``system`` -> ``template.system(content)``;
* ``user`` -> ``template.prompt(content)`` (consecutive user messages are joined with a line break first);
* ``assistant`` -> the reply as the template's transcript writes it (for RWKV ``" " + reply + "\\n\\n"``), the
  content stripped as the daemon stores replies: the text of ``template.transcript("", [("", reply)])`` after
  ``template.prompt("")``.

So a first message (with or without a system prompt) reads the same tokens as a conversation's first message
(``Chat``), and its reply is the same at temperature 0.

A :class:`~rwkv_chat.daemon.generation.Generation` of kind ``"messages"`` calls :func:`start` (prompt tokens,
the starting state from the cache, the sampler's settings), :func:`prompt_read` after its last prefill chunk
and :func:`reply_done` when its reply ended ("stop" or "length"): those store the state at the end of the
prompt and after the reply (prompt, reply tokens, and the template's stop where the reply did not produce it)
in the cache, keyed by exactly the tokens the state consumed. The cache only saves work: when it fails (out of
memory copying a state, which also empties it) the request goes on, reading its whole prompt.
"""

from __future__ import annotations

import logging

from .protocol import messages as m

log = logging.getLogger("rwkv_chat.daemon")


def reply_segment(template, text: str) -> str:
    """The text of an assistant reply ``text`` in a transcript of ``template`` (stripped, with its stop)."""
    head = template.system("") + template.prompt("")
    return template.transcript("", [("", text.strip())])[len(head):]


def segments(template, messages: list[m.ChatMessage]) -> list[str]:
    """The texts the model reads for ``messages`` (see the module docstring), in order, empty ones left out."""
    out: list[str] = []
    user: str | None = None
    for msg in messages:
        if msg.role == "user":
            user = msg.content if user is None else user + "\n" + msg.content
            continue
        if user is not None:
            out.append(template.prompt(user))
            user = None
        out.append(template.system(msg.content) if msg.role == "system" else reply_segment(template, msg.content))
    if user is not None:
        out.append(template.prompt(user))
    return [s for s in out if s]


def render(template, tokenizer, messages: list[m.ChatMessage]) -> list[int]:
    """The prompt tokens of ``messages``: each segment tokenized on its own, concatenated."""
    tokens: list[int] = []
    for text in segments(template, messages):
        tokens += tokenizer.encode(text)
    return tokens


def start(gen, model, tokenizer, template, given: dict):
    """Set up ``gen`` (a Generation of kind "messages"): its prompt, starting state, logits and read position
    from the prefix cache (``gen.cached`` tokens taken from it), its stops (the template's, then the request's).
    Returns the sampler settings (the model's defaults under the config's ``[sampling]``, updated with
    ``given``)."""
    req = gen.request
    args = gen.config.sampling_base(getattr(template, "sampling_defaults", None)).updated(given)
    gen.prompt = render(template, tokenizer, req.messages)
    try:
        hit = gen.sessions.prefix.lookup(gen.prompt, model.fingerprint)
    except Exception as e:  # noqa: BLE001 — the cache only saves work: the prompt is read whole instead
        _trouble(gen, "use", e)
        hit = None
    if hit is not None and hit.state is not None:
        gen.state, gen.logits, gen.pos, gen.cached = hit.state, hit.logits, hit.length, hit.length
    else:
        gen.state = model.zero_state()
    gen.stops = (template.stop, *req.stop)
    gen.stop_ids = frozenset(template.stop_tokens)
    gen.user_text = req.messages[-1].content
    return args


def prompt_read(gen) -> None:
    """After the last prefill chunk: keep the state at the end of the prompt (it is about to enter the
    decoder) and the logits that followed it."""
    _store(gen, gen.prompt)


def reply_done(gen, fed: list[int]) -> None:
    """After the reply (reason "stop" or "length"; ``fed``: the tokens fed after the reply's own, the
    template's stop for a reply cut by ``max_tokens``): keep the state after them."""
    if gen.state is None or gen.logits is None:
        return
    _store(gen, gen.prompt + gen.out_tokens + fed)


def _store(gen, tokens: list[int]) -> None:
    """Keep ``gen``'s state and logits as those after ``tokens``; a failure (out of memory copying the state)
    costs only the cache, never the request."""
    try:
        gen.sessions.prefix.store(tokens, gen.host.model.fingerprint, gen.state, gen.logits)
    except Exception as e:  # noqa: BLE001
        _trouble(gen, "keep a state in", e)


def _trouble(gen, what: str, e: Exception) -> None:
    """Log a prefix cache failure; out of memory empties the cache (its states hold device memory)."""
    from .host import is_oom

    if is_oom(e):
        gen.sessions.prefix.clear()
    log.warning("job %s: could not %s the prefix cache: %s: %s", gen.id, what, type(e).__name__, e)
