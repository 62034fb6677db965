"""A Hugging Face chat template (Jinja2, from ``tokenizer_config.json``) behind the daemon's template interface.

The daemon feeds a conversation piece by piece (``rwkv_chat.models.text.templates.RWKVChatTemplate`` is the
other implementation): ``system(system_prompt)`` once, then per exchange ``prompt(message)``, the generated
reply, and the closing text ``stop`` (or, when the model sampled one of ``stop_tokens``, which the state then
has consumed, ``after_stop(token)``: the rest of the closing). ``transcript(system_prompt, pairs)`` is the
concatenation of those pieces for stored exchanges.

The template is rendered as ``transformers.apply_chat_template`` renders it (source: transformers
``utils/chat_template_utils.py``): a sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension and a ``{% generation %}`` block, the ``tojson`` filter (no HTML escaping),
``raise_exception``, ``strftime_now``, ``namespace`` and ``dict``, the special tokens of
``tokenizer_config.json`` (``bos_token``, ``eos_token``, ...) and ``add_generation_prompt``.

Each piece is the difference of two renderings: the closing ``stop`` is what follows an assistant message's
content up to the next user turn; ``prompt(m)`` is what ``[user, assistant, user m]`` with the generation
prompt adds to ``[user, assistant]`` closed; ``system(s)`` is what a first turn renders before that piece.
For a *prefix-stable* template (each rendering of a conversation begins with the rendering of its earlier
turns: Qwen2, Qwen2.5, Qwen3 on replies without ``</think>``), ``system(s) + Σ(prompt(u) + reply + stop) +
prompt(m)`` equals ``apply_chat_template(messages, add_generation_prompt=True)`` — checked at load on probe
conversations (``prefix_stable``). Where a template rewrites earlier turns (DeepSeek-R1 and Qwen3 drop the
reasoning of past replies; a generation prompt that differs from an assistant turn's header), the daemon
keeps feeding the pieces — the text the model actually read while generating — and ``prefix_stable`` is
False. A template whose turns cannot be located at all raises :class:`ChatTemplateError` at load.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rwkv_chat.models.errors import TokenizerError

__all__ = ["HFChatTemplate", "NoChatTemplate", "ChatTemplateError", "render_environment"]

# probe contents: plain words no template rewrites (trim, capitalisation) and no two of which overlap
_U1, _A1, _U2, _A2, _U3, _S = "qzxuserone", "qzxreplyone", "qzxusertwo", "qzxreplytwo", "qzxuserthree", "qzxsystem"


class ChatTemplateError(TokenizerError):
    """A chat template does not compile, fails to render (``raise_exception`` in it), or its turns cannot be
    split into the pieces the daemon feeds; or the model has no chat template."""


def render_environment():
    """The Jinja2 environment transformers renders chat templates in (see the module docstring)."""
    import json

    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}…{% endgeneration %}``: renders its body (transformers tracks assistant spans)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` refusing underscore-prefixed attributes, as transformers' does."""

        def __init__(*args, **kwargs):
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **k: dict(*a, **k), namespace=Namespace)
    return env


def _msgs(system_prompt: str, *turns: str) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return out + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


class HFChatTemplate:
    """A Jinja2 chat template split into the daemon's pieces (module docstring).

    Args:
        source: the template text.
        special: special tokens by name (``{"eos_token": "<|im_end|>", ...}``), passed to the template.
        tokenizer: the model's tokenizer (``token_id``, ``decode``): finds the end token at the start of ``stop``.
        extra_stops: more ids that end a reply (generation_config's eos ids).

    Attributes:
        stop: the closing text after a reply (e.g. ``"<|im_end|>\\n"``).
        stop_tokens: ids that end a reply when sampled: the added token that ``stop`` begins with, then
            ``extra_stops`` (e.g. ``(151645, 151643)``).
        prefix_stable: whether the pieces concatenate to the template's own rendering (module docstring).
        sampling_defaults: the model's sampling defaults by ``SamplerArgs`` name (``load_hf_text`` sets them
            from generation_config.json), e.g. ``{"temperature": 0.7, "top_p": 0.8, "top_k": 20}``.

    Raises ChatTemplateError when the template does not compile or its turns cannot be located.
    """

    def __init__(self, source: str, special: dict[str, str], tokenizer, extra_stops: tuple[int, ...] = ()):
        import jinja2

        try:
            self._template = render_environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not compile: {e}") from None
        self.special = dict(special)
        self.sampling_defaults: dict[str, Any] = {}
        closed = self.render(_msgs("", _U1, _A1), generation=False)
        probe = self.render(_msgs("", _U1, _A1, _U2), generation=True)
        a1 = probe.find(_A1)
        if a1 < 0 or _A1 not in closed or probe.find(_U2, a1) < 0:
            raise ChatTemplateError("the chat template does not render the messages' contents as given; "
                                    "its turns cannot be split")
        self.stop = closed[closed.index(_A1) + len(_A1):]
        after = probe[a1 + len(_A1):]
        if not self.stop or not after.startswith(self.stop):
            raise ChatTemplateError("the chat template closes an assistant turn differently at the end of a "
                                    f"conversation ({self.stop!r}) than before the next turn ({after[:40]!r})")
        self._head = probe[:a1 + len(_A1) + len(self.stop)]    # [user, assistant] closed: prompt() follows it
        first = tokenizer.encode(self.stop)[:1]
        end = [first[0]] if first and tokenizer.decode(first) in getattr(tokenizer, "added", {}) else []
        self.stop_tokens: tuple[int, ...] = tuple(dict.fromkeys(end + list(extra_stops)))
        self._text = {t: tokenizer.decode([t]) for t in self.stop_tokens}
        self.prefix_stable = self._stable("")
        try:
            self.prefix_stable = self.prefix_stable and self._stable(_S)
        except ChatTemplateError:        # no system role (the template raises): a system prompt fails a chat
            pass

    def _stable(self, system_prompt: str) -> bool:
        pairs = [(_U1, _A1), (_U2, _A2)]
        return self.conversation(system_prompt, pairs, _U3) == self.transcript(system_prompt, pairs) + self.prompt(_U3)

    def render(self, messages: list[dict[str, Any]], generation: bool = True, **kwargs) -> str:
        """The template's text for ``messages`` (dicts with ``role`` and ``content``), with the generation prompt
        when ``generation``: what ``apply_chat_template(messages, tokenize=False, add_generation_prompt=...)``
        returns. Raises ChatTemplateError when the template raises (``raise_exception``) or fails."""
        import jinja2

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=generation, **{**self.special, **kwargs})
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None

    def prompt(self, message: str) -> str:
        """The text fed for one user message after an earlier exchange (its header, the message, the generation
        prompt), e.g. ``"<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n"``."""
        text = self.render(_msgs("", _U1, _A1, message), generation=True)
        if not text.startswith(self._head):
            raise ChatTemplateError("the chat template renders earlier turns differently after this message")
        return text[len(self._head):]

    def system(self, system_prompt: str) -> str:
        """The text fed once at the start of a conversation ("" where the template adds nothing): the first
        turn's rendering without its :meth:`prompt` piece (a default system prompt or BOS token included)."""
        text = self.render(_msgs(system_prompt, _U1), generation=True)
        piece = self.prompt(_U1)
        if not text.endswith(piece):
            raise ChatTemplateError("the chat template renders a conversation's first message differently from "
                                    "later ones; its pieces cannot be derived")
        return text[:len(text) - len(piece)]

    def after_stop(self, token: int) -> str:
        """The text fed after a reply that ended by sampling ``token`` (one of ``stop_tokens``, already consumed
        by the state): the rest of :attr:`stop` after that token's text, or all of ``stop`` when it does not
        begin with it (an eos token other than the template's end token)."""
        text = self._text.get(token)
        if text and self.stop.startswith(text):
            return self.stop[len(text):]
        return self.stop

    def transcript(self, system_prompt: str, pairs: list[tuple[str, str]]) -> str:
        """A whole conversation as the daemon fed it: ``system(system_prompt)``, then per (user, reply)
        ``prompt(user) + reply + stop``."""
        out = [self.system(system_prompt)]
        for user, reply in pairs:
            out += [self.prompt(user), reply, self.stop]
        return "".join(out)

    def conversation(self, system_prompt: str, pairs: list[tuple[str, str]], message: str) -> str:
        """The template's own rendering of the conversation with ``message`` and the generation prompt (equal to
        ``transcript(system_prompt, pairs) + prompt(message)`` where ``prefix_stable``)."""
        turns = [t for pair in pairs for t in pair] + [message]
        return self.render(_msgs(system_prompt, *turns), generation=True)

    def __repr__(self) -> str:
        return f"<HFChatTemplate stop={self.stop!r} stop_tokens={self.stop_tokens} prefix_stable={self.prefix_stable}>"


class NoChatTemplate:
    """The template of a model folder without a chat template (a base model): raw completion works; a chat
    raises ChatTemplateError naming the folder."""

    stop = ""
    stop_tokens: tuple[int, ...] = ()
    prefix_stable = True

    def __init__(self, folder: str):
        self.folder = folder
        self.sampling_defaults: dict[str, Any] = {}

    def _refuse(self, *args, **kwargs) -> str:
        raise ChatTemplateError(f"the model in {self.folder} has no chat template (tokenizer_config.json has no "
                                "chat_template): use raw completion, or a chat model")

    prompt = system = transcript = conversation = _refuse

    def after_stop(self, token: int) -> str:
        return ""
