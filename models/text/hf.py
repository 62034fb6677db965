"""The text side of a Hugging Face checkpoint folder: tokenizer, chat template and generation defaults.

    text = load_hf_text("/path/to/Qwen2.5-0.5B-Instruct", vocab_size=151936)
    ids = text.tokenizer.encode("<|im_start|>user\\nhi")    # list[int], as transformers.AutoTokenizer encodes
    text.chat_template.prompt("hi")          # "<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n"
    text.chat_template.stop_tokens                           # (151645, 151643): <|im_end|>, <|endoftext|>
    text.generation.sampling_defaults()                      # {"temperature": 0.7, "top_p": 0.8, "top_k": 20}

Files read (only these): ``tokenizer.json`` (the ``tokenizers`` library runs it), ``tokenizer_config.json``
(special tokens, the ``chat_template``), ``chat_template.jinja`` (preferred over the config's template, as
transformers does) and ``generation_config.json`` (optional).

The tokenizer maps every id to its exact bytes (:class:`ByteLevelTable`, decoded on first use, so loading costs
about what ``tokenizers.Tokenizer.from_file`` costs):
byte-level BPE tokens through GPT-2's byte decoder, added and special tokens as their UTF-8 text (as
``transformers``' ``decode`` with ``skip_special_tokens=False`` shows them), so
:class:`~rwkv_chat.models.text.tokenizers.IncrementalDecoder` streams whole characters whatever a token splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rwkv_chat.models.errors import TokenizerError
from rwkv_chat.models.text.chat_template import HFChatTemplate, NoChatTemplate
from rwkv_chat.models.text.tokenizers import Tokenizer, _byte_decoder, _utf8

__all__ = ["HFTokenizer", "HFGeneration", "HFText", "load_hf_text", "read_json", "ByteLevelTable"]

#: the special-token names of tokenizer_config.json that a chat template sees (transformers' special_tokens_map)
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def read_json(path: Path, required: bool = True) -> dict | None:
    """The JSON object in ``path``; None when the file is absent and not ``required``.
    Raises TokenizerError naming the file when it is missing (required), unreadable or not an object."""
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path} is missing (a Hugging Face checkpoint folder has it)")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} does not hold a JSON object")
    return data


def _latin1_map() -> dict[int, str]:
    """``str.translate`` table: each character of GPT-2's byte-level alphabet -> the latin-1 character of its
    byte (the printable bytes are themselves: left out); the latin-1 characters outside the alphabet ->
    U+10FFFF, which latin-1 cannot encode (so a token outside the alphabet is an error, never a wrong byte)."""
    alphabet = {ord(c): chr(b) for c, b in _byte_decoder().items()}
    out = {c: chr(0x10FFFF) for c in range(256) if c not in alphabet}
    out.update({c: b for c, b in alphabet.items() if c != ord(b)})
    return out


_LATIN1 = _latin1_map()


class ByteLevelTable:
    """The ``id -> bytes`` table of a byte-level BPE tokenizer, each id decoded on first use and kept.

    A sequence of ``size`` ``bytes`` (``len``, ``table[i]`` for ``0 <= i < size``): ``added`` ids give their
    UTF-8 text, the other ids below ``n`` the bytes of their BPE token (``id_to_token`` through GPT-2's byte
    decoder; source: openai/gpt-2 ``encoder.py``, ``bytes_to_unicode``), ids without a token and the padding ids
    ``n..size-1`` ``b""``. Nothing is decoded at load (a 151k-token vocabulary costs no load time); one id costs
    microseconds once.

    Raises TokenizerError (from ``table[i]``) when token ``i`` has a character outside the byte-level alphabet.
    """

    __slots__ = ("_hf", "_bytes", "_where")

    def __init__(self, hf, n: int, size: int, added: dict[int, bytes], where: object) -> None:
        self._hf, self._where = hf, where
        self._bytes: list[bytes | None] = [None] * n + [b""] * (size - n)
        for i, b in added.items():
            self._bytes[i] = b

    def __len__(self) -> int:
        return len(self._bytes)

    def __getitem__(self, i: int) -> bytes:
        b = self._bytes[i]
        if b is None:
            token = self._hf.id_to_token(i)
            try:
                b = b"" if token is None else token.translate(_LATIN1).encode("latin-1")
            except UnicodeEncodeError:
                raise TokenizerError(f"{self._where}: token {i} {token!r} is not in the byte-level alphabet") from None
            self._bytes[i] = b
        return b


class HFTokenizer(Tokenizer):
    """A byte-level BPE ``tokenizer.json`` (Qwen2/2.5/3: 151,643 BPE tokens + added tokens).

    Args:
        path: the ``tokenizer.json``.
        vocab_size: the model's vocabulary (logits per position) when its head is padded beyond the json's ids
            (Qwen2: 151,936); the padding ids decode to ``b""``. None: the json's size.

    ``encode`` equals ``transformers.AutoTokenizer(...).encode(text, add_special_tokens=False)``: the json's
    normalizer (NFC) and pre-tokenizer apply, and special/added tokens written in the text (``<|im_start|>``)
    become their ids. ``decode`` equals transformers' ``decode(ids)`` (special tokens shown as their text).

    Attributes:
        eos_ids: ids that end a raw completion (set by :func:`load_hf_text`: generation_config's eos ids and
            tokenizer_config's ``eos_token``); ``()`` here.
        special: the ids of the special added tokens.

    Raises TokenizerError when the file cannot be loaded, is not byte-level BPE, or has more ids than ``vocab_size``;
    ``token_bytes``/``decode`` raise it for a token outside the byte-level alphabet (decoded on first use).
    """

    name = "hf"

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self.path = Path(path)
        from tokenizers import decoders, models

        if not self.path.is_file():
            raise TokenizerError(f"{self.path} is missing (a Hugging Face checkpoint folder has it)")
        try:
            self._hf = RustTokenizer.from_file(str(self.path))
        except Exception as e:  # noqa: BLE001 — the library raises plain Exception
            raise TokenizerError(f"cannot load tokenizer {self.path}: {e}") from None
        if not isinstance(self._hf.model, models.BPE) or not isinstance(self._hf.decoder, decoders.ByteLevel):
            raise TokenizerError(f"{self.path}: only byte-level BPE tokenizers are supported (model "
                                 f"{type(self._hf.model).__name__}, decoder {type(self._hf.decoder).__name__})")
        added = self._hf.get_added_tokens_decoder()
        n = max([self._hf.get_vocab_size(with_added_tokens=True), *(i + 1 for i in added)])
        if vocab_size is not None and vocab_size < n:
            raise TokenizerError(f"{self.path} has {n} tokens, more than the model's vocabulary of {vocab_size}")
        self._table = ByteLevelTable(self._hf, n, vocab_size or n, {i: t.content.encode("utf-8")
                                                                     for i, t in added.items()}, self.path)
        self.added = {t.content: i for i, t in added.items()}
        self.special = frozenset(i for i, t in added.items() if t.special)

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return list(self._hf.encode(text, add_special_tokens=False).ids)

    def token_id(self, text: str) -> int | None:
        """The id of an added/special token written as ``text`` (e.g. ``"<|im_end|>"``), or of a text that is one
        vocabulary token; None otherwise."""
        if text in self.added:
            return self.added[text]
        ids = self.encode(text) if text else []
        return ids[0] if len(ids) == 1 else None


@dataclass(frozen=True)
class HFGeneration:
    """``generation_config.json``'s defaults (None where the file does not set one).

    Fields: ``temperature`` (>= 0), ``top_p`` (0..1), ``top_k`` (0 = off), ``repetition_penalty`` (> 0, HF's
    multiplicative penalty on the context's tokens), ``do_sample`` (False = greedy), ``eos_token_ids``.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    eos_token_ids: tuple[int, ...] = ()

    def sampling_defaults(self) -> dict[str, Any]:
        """The defaults that map onto ``SamplerArgs`` by name: ``temperature`` (0 when ``do_sample`` is false),
        ``top_p``, ``top_k``, ``repetition_penalty``; ``alpha_presence`` and ``alpha_frequency`` always 0
        (``transformers`` has no presence or frequency penalty, so the reference sampler's RWKV defaults do not
        apply)."""
        out: dict[str, Any] = {"alpha_presence": 0.0, "alpha_frequency": 0.0}
        if self.do_sample is False:
            out["temperature"] = 0.0
        elif self.temperature is not None:
            out["temperature"] = self.temperature
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = self.repetition_penalty
        return out


def _ids(value, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
        raise TokenizerError(f"{where}: eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(items)


def read_generation(path: Path) -> HFGeneration:
    """Read ``generation_config.json`` (absent: no defaults). Raises TokenizerError for a malformed value."""
    data = read_json(path, required=False) or {}

    def num(key, kind, lo=None, hi=None):
        v = data.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
            raise TokenizerError(f"{path}: {key} must be a number, got {v!r}")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise TokenizerError(f"{path}: {key} {v!r} is out of range")
        return kind(v)

    do_sample = data.get("do_sample")
    if data.get("repetition_penalty") == 0:
        raise TokenizerError(f"{path}: repetition_penalty must be more than 0 (1 = off), got 0")
    return HFGeneration(temperature=num("temperature", float, 0.0), top_p=num("top_p", float, 0.0, 1.0),
                        top_k=num("top_k", int, 0), repetition_penalty=num("repetition_penalty", float, 0.0),
                        do_sample=do_sample if isinstance(do_sample, bool) else None,
                        eos_token_ids=_ids(data.get("eos_token_id"), str(path)))


@dataclass(frozen=True)
class HFText:
    """What :func:`load_hf_text` reads: ``tokenizer`` (:class:`HFTokenizer`), ``chat_template``
    (:class:`~rwkv_chat.models.text.chat_template.HFChatTemplate`, or ``NoChatTemplate`` for a folder without
    one) and ``generation`` (:class:`HFGeneration`)."""

    tokenizer: HFTokenizer
    chat_template: Any
    generation: HFGeneration = field(default_factory=HFGeneration)


def _token_text(value) -> str | None:
    """A special token of tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(folder: Path, config: dict) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"cannot read {jinja}: {e}") from None
    source = config.get("chat_template")
    if isinstance(source, list):                 # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is not None and not isinstance(source, str):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string")
    return source


def load_hf_text(folder: str | Path, vocab_size: int | None = None) -> HFText:
    """Read the tokenizer, chat template and generation defaults of a Hugging Face checkpoint folder.

    Args:
        folder: holds ``tokenizer.json`` and ``tokenizer_config.json`` (``generation_config.json`` and
            ``chat_template.jinja`` optional).
        vocab_size: the model's vocabulary size (the tokenizer's table is padded to it).
    Returns:
        :class:`HFText`; its tokenizer's ``eos_ids`` are generation_config's eos ids then tokenizer_config's
        ``eos_token``; the template's ``stop_tokens`` are its end token then those; its ``sampling_defaults``
        are ``generation.sampling_defaults()``.
    Raises:
        TokenizerError: a file missing or malformed, a tokenizer that does not fit ``vocab_size``.
        ChatTemplateError: a chat template that does not compile or cannot be split into the daemon's pieces.
    """
    folder = Path(folder)
    config = read_json(folder / "tokenizer_config.json")
    tokenizer = HFTokenizer(folder / "tokenizer.json", vocab_size)
    generation = read_generation(folder / "generation_config.json")
    special = {k: t for k in SPECIAL_NAMES if (t := _token_text(config.get(k))) is not None}
    eos = list(generation.eos_token_ids)
    eos_text = special.get("eos_token")
    if eos_text is not None and (i := tokenizer.token_id(eos_text)) is not None and i not in eos:
        eos.append(i)
    for i in eos:
        if not 0 <= i < tokenizer.vocab_size:
            raise TokenizerError(f"{folder}: eos token id {i} is outside the vocabulary "
                                 f"(0..{tokenizer.vocab_size - 1})")
    tokenizer.eos_ids = tuple(eos)
    source = _template_source(folder, config)
    if source is None:
        template: Any = NoChatTemplate(str(folder))
    else:
        template = HFChatTemplate(source, special, tokenizer, extra_stops=tuple(eos))
    template.sampling_defaults = generation.sampling_defaults()
    return HFText(tokenizer, template, generation)
