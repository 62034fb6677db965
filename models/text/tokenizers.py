"""Tokenizers of RWKV models: World (65,536), GPT-NeoX 20B (50,277, the RWKV-4 Pile models) and bytes (256).

Every tokenizer maps token ids to raw bytes through one table (``token_bytes``) and decodes through that table,
so a token that holds only part of a UTF-8 character (the first token of many emoji and CJK characters) is
never a crash: ``decode`` replaces invalid bytes with U+FFFD, and :class:`IncrementalDecoder` streams whole
characters only.

    tok = load_tokenizer(vocab_size=model.vocab_size, model_path=path)   # or load_tokenizer("world")
    ids = tok.encode("Hello 世界")            # list[int]
    tok.decode(ids)                           # "Hello 世界"
    dec = IncrementalDecoder(tok); "".join(dec.push(t) for t in ids) + dec.flush()

Sources: the World vocabulary file format (``idx repr(bytes|str) len`` per line) and its greedy longest-match
encoding are those of the reference ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``; encoding runs in the Rust
``pyrwkv_tokenizer`` package, whose ``decode`` is never called (it panics on partial UTF-8). The NeoX tokenizer is a
byte-level BPE (GPT-2 byte-to-unicode alphabet) run by the ``tokenizers`` library.
"""

from __future__ import annotations

import ast
import codecs
import functools
import operator
from pathlib import Path
from typing import Iterable

from rwkv_chat.models.errors import TokenError, TokenizerError

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "WorldTokenizer",
    "NeoXTokenizer",
    "IncrementalDecoder",
    "load_tokenizer",
    "world_vocab_path",
    "NEOX_TOKENIZER_FILE",
]

WORLD_VOCAB_SIZE = 65536
NEOX_VOCAB_SIZES = (50277, 50304)  # 50,277 ids in the json; RWKV-4 Pile checkpoints pad the head to 50,304
NEOX_TOKENIZER_FILE = "20B_tokenizer.json"
_WORLD_VOCAB_FILE = "rwkv_vocab_v20230424.txt"


class Tokenizer:
    """Base class: a table ``token id -> bytes`` plus an encoder.

    Attributes:
        name: short name ("world", "neox", "bytes").
        vocab_size: number of valid token ids; valid ids are ``0 <= id < vocab_size``.
        eos_ids: ids that end a raw completion when sampled (none for the RWKV vocabularies; a Hugging Face
            folder's eos tokens, ``rwkv_chat.models.text.hf``).

    Subclasses fill ``self._table`` (``list[bytes]``, one entry per id; ``b""`` for control/padding ids such as
    World's end-of-text token 0) and implement :meth:`encode`.
    """

    name: str = "tokenizer"
    eos_ids: tuple[int, ...] = ()
    _table: list[bytes]

    @property
    def vocab_size(self) -> int:
        return len(self._table)

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        """Encode ``text`` to token ids. Raises TokenizerError if ``text`` is not encodable (lone surrogates)."""
        raise NotImplementedError

    def _check(self, token) -> int:
        try:
            t = operator.index(token)
        except TypeError:
            raise TokenError(f"token {token!r} is not an integer") from None
        if isinstance(token, bool) or not 0 <= t < len(self._table):
            raise TokenError(f"token {token!r} is outside the {self.name} vocabulary (0..{len(self._table) - 1})")
        return t

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes of one token. Raises TokenError for ids outside ``0..vocab_size-1``."""
        return self._table[self._check(token)]

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        """Concatenated bytes of ``tokens``. Raises TokenError for ids outside the vocabulary."""
        table = self._table
        return b"".join([table[self._check(t)] for t in tokens])

    def decode(self, tokens: Iterable[int]) -> str:
        """Text of ``tokens``; bytes that are not valid UTF-8 become U+FFFD (``errors="replace"``).

        Raises TokenError for ids outside the vocabulary.
        """
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} vocab_size={self.vocab_size}>"


def _utf8(text: str) -> bytes:
    if not isinstance(text, str):
        raise TokenizerError(f"encode() takes a str, got {type(text).__name__}")
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text is not encodable as UTF-8 ({e.reason} at index {e.start})") from None


class ByteTokenizer(Tokenizer):
    """Vocabulary of 256 tokens, token = byte value of the UTF-8 text (the tiny test models)."""

    name = "bytes"

    def __init__(self) -> None:
        self._table = [bytes([i]) for i in range(256)]

    def encode(self, text: str) -> list[int]:
        return list(_utf8(text))


def world_vocab_path() -> Path:
    """Path of the World vocabulary file shipped in the ``pyrwkv_tokenizer`` wheel.

    Raises TokenizerError if the package or its vocabulary file is missing.
    """
    try:
        import pyrwkv_tokenizer
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise TokenizerError(f"the World tokenizer needs the pyrwkv-tokenizer package ({e})") from None
    path = Path(pyrwkv_tokenizer.__file__).resolve().parent / _WORLD_VOCAB_FILE
    if not path.is_file():  # pragma: no cover
        raise TokenizerError(f"World vocabulary file {path} is missing from the pyrwkv-tokenizer package")
    return path


def read_world_vocab(path: str | Path, vocab_size: int = WORLD_VOCAB_SIZE) -> list[bytes]:
    """Read a World vocabulary file into a ``token id -> bytes`` table of ``vocab_size`` entries.

    Each line is ``idx repr(bytes|str) len`` (the reference TRIE_TOKENIZER format); str entries encode as UTF-8.
    Ids absent from the file (0 = end-of-text, and the padding ids above the last entry) map to ``b""``.
    Raises TokenizerError on a malformed line, a length mismatch, or an id outside ``1..vocab_size-1``.
    """
    table = [b""] * vocab_size
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read World vocabulary {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            idx = int(line[: line.index(" ")])
            value = ast.literal_eval(line[line.index(" ") : line.rindex(" ")].strip())
            length = int(line[line.rindex(" ") :])
        except (ValueError, SyntaxError) as e:
            raise TokenizerError(f"{path}:{n}: malformed vocabulary line ({e})") from None
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes) or len(value) != length or not 0 < idx < vocab_size:
            raise TokenizerError(f"{path}:{n}: bad vocabulary entry (id {idx}, length {length})")
        table[idx] = value
    return table


class WorldTokenizer(Tokenizer):
    """RWKV World tokenizer (65,536 ids; greedy longest match over the vocabulary's bytes).

    Encoding runs in ``pyrwkv_tokenizer.WorldTokenizer`` (Rust); decoding goes through the byte table read from
    the same vocabulary file. Token 0 (end-of-text) and the unused ids 65,530..65,535 decode to ``b""``.
    """

    name = "world"

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        import pyrwkv_tokenizer

        path = Path(vocab_path) if vocab_path is not None else world_vocab_path()
        self._table = _world_table(str(path.resolve()))
        try:
            self._rust = pyrwkv_tokenizer.WorldTokenizer(str(path))
        except BaseException as e:  # pyo3 PanicException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise TokenizerError(f"cannot load World vocabulary {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        _utf8(text)  # rejects lone surrogates with a clear error
        try:
            return list(self._rust.encode(text))
        except BaseException as e:  # pyo3 PanicException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise TokenizerError(f"World tokenizer failed to encode the text: {e}") from None


@functools.lru_cache(maxsize=4)
def _world_table(path: str) -> list[bytes]:
    return read_world_vocab(path)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (the ByteLevel alphabet): printable bytes map to themselves,
    the other 68 bytes to U+0100 onwards in byte order. Source: openai/gpt-2 ``encoder.py``."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


class NeoXTokenizer(Tokenizer):
    """GPT-NeoX 20B byte-level BPE tokenizer (``20B_tokenizer.json``) of the RWKV-4 Pile models.

    Args:
        path: the ``tokenizers`` json file.
        vocab_size: the model's vocabulary size when the head is padded beyond the json's ids (50,304);
            the padding ids decode to ``b""``. Raises TokenizerError if smaller than the json's vocabulary.

    Encoding applies the json's NFC normalizer, so ``decode(encode(s)) == unicodedata.normalize("NFC", s)``.
    Special tokens (``<|endoftext|>``, ``<|padding|>``) decode to ``b""``, as ``tokenizers`` does by default.
    """

    name = "neox"

    def __init__(self, path: str | Path, vocab_size: int | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._hf = HFTokenizer.from_file(str(self.path))
        except Exception as e:
            raise TokenizerError(f"cannot load tokenizer {self.path}: {e}") from None
        n = self._hf.get_vocab_size(with_added_tokens=True)
        if vocab_size is not None and vocab_size < n:
            raise TokenizerError(f"{self.path} has {n} tokens, more than the model's vocabulary of {vocab_size}")
        table = [b""] * (vocab_size or n)
        added = self._hf.get_added_tokens_decoder()
        inverse = _byte_decoder()
        for token, idx in self._hf.get_vocab(with_added_tokens=True).items():
            if idx in added:
                table[idx] = b"" if added[idx].special else added[idx].content.encode("utf-8")
                continue
            try:
                table[idx] = bytes(inverse[c] for c in token)
            except KeyError:
                raise TokenizerError(f"{self.path}: token {idx} {token!r} is not in the byte-level alphabet") from None
        self._table = table

    def encode(self, text: str) -> list[int]:
        _utf8(text)
        return list(self._hf.encode(text, add_special_tokens=False).ids)


_ALIASES = {
    "world": "world",
    "rwkv_vocab_v20230424": "world",
    "neox": "neox",
    "20b": "neox",
    "20b_tokenizer": "neox",
    "bytes": "bytes",
    "byte": "bytes",
}


def _find_neox(model_path: str | Path | None) -> Path:
    if model_path is not None:
        p = Path(model_path)
        for candidate in (p / NEOX_TOKENIZER_FILE, p.parent / NEOX_TOKENIZER_FILE):
            if candidate.is_file():
                return candidate
    where = f" beside {model_path}" if model_path is not None else ""
    raise TokenizerError(
        f"the model uses the GPT-NeoX 20B vocabulary but no {NEOX_TOKENIZER_FILE} was found{where}; "
        f"give its path as the tokenizer name"
    )


def load_tokenizer(
    name: str | Path | None = None, vocab_size: int | None = None, model_path: str | Path | None = None
) -> Tokenizer:
    """Pick and load a tokenizer.

    Args:
        name: "world", "neox", "bytes", or a path: a ``.json`` (``tokenizers`` byte-level BPE, loaded as NeoX) or
            a ``.txt`` World-format vocabulary. ``None`` picks by ``vocab_size``.
        vocab_size: the model's vocabulary size: 256 -> bytes, 65,536 -> world, 50,277 / 50,304 -> neox. With a
            name, the tokenizer must fit it (NeoX is padded up to it).
        model_path: the checkpoint; "neox" looks for ``20B_tokenizer.json`` beside it (or inside it, if a folder).

    Raises TokenizerError if nothing fits, the NeoX json cannot be found, or the tokenizer's vocabulary does not
    match ``vocab_size``.
    """
    if name is None and vocab_size is None:
        raise TokenizerError("load_tokenizer needs a tokenizer name or the model's vocabulary size")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
        raise TokenizerError(f"vocabulary size must be a positive integer, got {vocab_size!r}")
    kind: str
    path: Path | None = None
    if name is None:
        if vocab_size == 256:
            kind = "bytes"
        elif vocab_size == WORLD_VOCAB_SIZE:
            kind = "world"
        elif vocab_size in NEOX_VOCAB_SIZES:
            kind = "neox"
        else:
            raise TokenizerError(
                f"no known tokenizer has a vocabulary of {vocab_size} tokens (256 bytes, 65536 world, "
                f"50277/50304 neox); give the tokenizer explicitly"
            )
    else:
        key = str(name).lower()
        if key in _ALIASES:
            kind = _ALIASES[key]
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise TokenizerError(f"unknown tokenizer {str(name)!r}: not one of world, neox, bytes, nor a file")
            kind = "neox" if path.suffix == ".json" else "world"
    if kind == "bytes":
        tok: Tokenizer = ByteTokenizer()
    elif kind == "world":
        tok = WorldTokenizer(path)
    else:
        tok = NeoXTokenizer(path if path is not None else _find_neox(model_path), vocab_size)
    if vocab_size is not None and tok.vocab_size != vocab_size:
        raise TokenizerError(
            f"the {tok.name} tokenizer has {tok.vocab_size} tokens but the model's vocabulary has {vocab_size}"
        )
    return tok


class IncrementalDecoder:
    """Streams text from tokens one at a time, emitting whole UTF-8 characters only.

    Bytes of a character split across tokens are held until it completes. A byte sequence that can never become
    valid UTF-8 is emitted as U+FFFD at once (it does not stall the stream), exactly as
    ``bytes.decode("utf-8", errors="replace")`` would replace it; so the concatenation of every ``push`` and the
    final ``flush`` equals ``tok.decode(all_tokens)``.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Add one token; return the text it completes (possibly ""). Raises TokenError for ids outside the
        vocabulary (the stream is left unchanged)."""
        return self._dec.decode(self.tokenizer.token_bytes(token), final=False)

    @property
    def pending(self) -> bytes:
        """Bytes held back because they start a character that is not complete yet (at most 3)."""
        return self._dec.getstate()[0]

    def flush(self) -> str:
        """End of stream: return the held bytes (as U+FFFD, being incomplete) and reset."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out

    def reset(self) -> None:
        """Drop held bytes without emitting them."""
        self._dec.reset()
