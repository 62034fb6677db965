"""Tokenizers against their references: the ``rwkv`` package's TRIE tokenizer (World) and ``tokenizers`` (NeoX)."""

from __future__ import annotations

import os
import shutil
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rwkv
from rwkv.rwkv_tokenizer import TRIE_TOKENIZER
from rwkv_chat.models.errors import TokenError, TokenizerError
from rwkv_chat.models.text.tokenizers import (
    ByteTokenizer,
    IncrementalDecoder,
    NeoXTokenizer,
    WorldTokenizer,
    load_tokenizer,
)

FIXED = [
    "",
    "Hello, world!",
    "\n\nUser: hi\n\nAssistant:",
    "中文 测试，日本語のテキスト、한국어",
    "emoji 🎉👍🏽👨‍👩‍👧‍👦 🇯🇵 flags",
    "tabs\tand\t\ttabs\n\r\nCRLF\r",
    "    indented code:\n\tif x:\n\t\treturn 1",
    "mixed 中🎉a\t1 23 456 \u3000 full-width space",
    "ÀÉÎõü ß ﬁ Å (combining a\u0301)",
    "\x00\x01 control \x7f bytes",
    " " * 200 + "#" * 100,
]
MIXED_ALPHABET = st.sampled_from(list("ab Z09 \t\n\r.,!?") + list("中文字測試日本語한국") + ["🎉", "👍🏽", "👨‍👩‍👧", "é", "ß", "€"])
mixed_text = st.one_of(st.lists(MIXED_ALPHABET, max_size=40).map("".join), st.text(max_size=60))
HYP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def world() -> WorldTokenizer:
    return load_tokenizer("world")


@pytest.fixture(scope="module")
def trie() -> TRIE_TOKENIZER:
    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="module")
def neox_json(shared_dir):
    path = shared_dir / "tokenizers" / "20B_tokenizer.json"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def neox(neox_json) -> NeoXTokenizer:
    return load_tokenizer(str(neox_json))


@pytest.fixture(scope="module")
def hf(neox_json):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(neox_json))


# ---- World ----


def test_world_table_equals_reference(world, trie):
    assert world.vocab_size == 65536 and world.name == "world"
    for idx in range(world.vocab_size):
        assert world.token_bytes(idx) == trie.idx2token.get(idx, b""), idx


@pytest.mark.parametrize("text", FIXED)
def test_world_fixed_strings(world, trie, text):
    ids = world.encode(text)
    assert ids == trie.encode(text)
    assert world.decode(ids) == text


@HYP
@given(text=mixed_text)
def test_world_encode_equals_reference(world, trie, text):
    ids = world.encode(text)
    assert ids == trie.encode(text)
    assert world.decode(ids) == text
    assert b"".join(world.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_world_decode_of_partial_utf8_replaces(world):
    ids = world.encode("🎉")
    assert len(ids) > 1  # the emoji is split across tokens: the case the Rust decode panics on
    assert "\ufffd" in world.decode(ids[:1])
    assert world.decode(ids) == "🎉"


def test_lone_surrogate_is_a_tokenizer_error(world):
    for tok in (world, ByteTokenizer()):
        with pytest.raises(TokenizerError, match="UTF-8"):
            tok.encode("a\ud800b")


# ---- incremental decoding ----

SPLIT_TEXTS = ["🎉", "👨‍👩‍👧‍👦", "中文字", "a🎉b中c", "é👍🏽\t世界\n", "🇯🇵🇫🇷"]


@pytest.mark.parametrize("text", SPLIT_TEXTS)
def test_incremental_every_split_emits_whole_characters(world, text):
    byte_tok = ByteTokenizer()
    data = text.encode("utf-8")
    # every way to cut the bytes into two or three pieces, streamed through the byte tokenizer
    cuts = [(i, j) for i in range(len(data) + 1) for j in range(i, len(data) + 1)]
    for i, j in cuts:
        dec = IncrementalDecoder(byte_tok)
        out = []
        for piece in (data[:i], data[i:j], data[j:]):
            for b in piece:
                chunk = dec.push(b)
                assert "\ufffd" not in chunk
                out.append(chunk)
            emitted = "".join(out)
            assert text.startswith(emitted)  # only whole characters, in order
            assert len(dec.pending) <= 3
        assert "".join(out) + dec.flush() == text
    # and the World tokens, which split emoji inside a character
    dec = IncrementalDecoder(world)
    chunks = [dec.push(t) for t in world.encode(text)]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + dec.flush() == text


@HYP
@given(text=mixed_text)
def test_incremental_world_concatenates_to_text(world, text):
    dec = IncrementalDecoder(world)
    emitted = ""
    for t in world.encode(text):
        chunk = dec.push(t)
        assert "\ufffd" not in chunk
        emitted += chunk
        assert text.startswith(emitted)
    assert emitted + dec.flush() == text


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.integers(0, 255), max_size=40))
def test_incremental_invalid_bytes_never_stall(data):
    tok = ByteTokenizer()
    dec = IncrementalDecoder(tok)
    out = ""
    for b in data:
        out += dec.push(b)
        assert len(dec.pending) <= 3  # an impossible sequence is never held
    out += dec.flush()
    assert out == bytes(data).decode("utf-8", errors="replace") == tok.decode(data)
    assert dec.pending == b""


def test_incremental_invalid_byte_is_emitted_at_once():
    dec = IncrementalDecoder(ByteTokenizer())
    assert dec.push(0xE4) == ""  # may still become a CJK character
    assert dec.push(0xB8) == ""
    assert dec.push(ord("A")) == "\ufffdA"  # can never complete: replaced, not stalled
    assert dec.push(0xFF) == "\ufffd"
    assert dec.flush() == ""


# ---- NeoX ----


@pytest.mark.parametrize("text", FIXED)
def test_neox_fixed_strings(neox, hf, text):
    ids = neox.encode(text)
    assert ids == hf.encode(text).ids
    assert neox.decode(ids) == hf.decode(ids) == unicodedata.normalize("NFC", text)


@HYP
@given(text=mixed_text)
def test_neox_equals_tokenizers(neox, hf, text):
    ids = neox.encode(text)
    assert ids == hf.encode(text).ids
    assert neox.decode(ids) == unicodedata.normalize("NFC", text)


def test_neox_token_bytes_exact(neox, hf):
    from tokenizers.pre_tokenizers import ByteLevel

    assert neox.vocab_size == hf.get_vocab_size() == 50277
    special = {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    alphabet = set(ByteLevel.alphabet())
    for idx in range(neox.vocab_size):
        b = neox.token_bytes(idx)
        if idx in special:
            assert b == b"" and hf.decode([idx]) == ""
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:  # a partial character: both replace the same bytes
            assert hf.decode([idx]) == b.decode("utf-8", errors="replace"), idx
        else:
            assert hf.decode([idx]) == text, idx
        if idx not in hf.get_added_tokens_decoder():
            assert set(hf.id_to_token(idx)) <= alphabet
    # the one-character tokens of the byte-level alphabet map to distinct single bytes (a bijection)
    vocab = hf.get_vocab()
    singles = {neox.token_bytes(vocab[c]) for c in alphabet if c in vocab}
    assert len(singles) == len([c for c in alphabet if c in vocab]) > 200
    assert all(len(b) == 1 for b in singles)


def test_neox_pads_to_the_model_vocabulary(neox_json, tmp_path):
    shutil.copy(neox_json, tmp_path / "20B_tokenizer.json")
    model = tmp_path / "RWKV-4-Pile-169M.pth"
    tok = load_tokenizer(vocab_size=50304, model_path=model)
    assert tok.name == "neox" and tok.vocab_size == 50304
    assert tok.token_bytes(50303) == b"" and tok.decode([50280, 510]) == tok.decode([510])
    with pytest.raises(TokenError):
        tok.token_bytes(50304)
    assert load_tokenizer(vocab_size=50277, model_path=tmp_path).vocab_size == 50277


def test_neox_missing_json_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="20B_tokenizer.json"):
        load_tokenizer(vocab_size=50277, model_path=tmp_path / "model.pth")
    with pytest.raises(TokenizerError, match="20B_tokenizer.json"):
        load_tokenizer("neox")


# ---- bytes, selection, errors ----


def test_byte_tokenizer():
    tok = load_tokenizer(vocab_size=256)
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256 and tok.name == "bytes"
    text = "héllo 🎉"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text)) == text
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert tok.decode([0xF0, 0x9F]) == "\ufffd"


def test_load_tokenizer_by_size_and_name(world):
    assert load_tokenizer(vocab_size=65536).name == "world"
    assert load_tokenizer("bytes").name == "bytes"
    assert load_tokenizer("World", vocab_size=65536).vocab_size == 65536
    from pyrwkv_tokenizer import __file__ as pkg

    vocab = os.path.join(os.path.dirname(pkg), "rwkv_vocab_v20230424.txt")
    assert load_tokenizer(vocab).encode("中文 🎉") == world.encode("中文 🎉")
    with pytest.raises(TokenizerError, match="1234"):
        load_tokenizer(vocab_size=1234)
    with pytest.raises(TokenizerError, match="65536"):
        load_tokenizer("bytes", vocab_size=65536)
    with pytest.raises(TokenizerError, match="nope"):
        load_tokenizer("nope")
    with pytest.raises(TokenizerError):
        load_tokenizer()


@pytest.mark.parametrize("bad", [-1, 65536, 10**9, 1.5, "3", None, True])
def test_out_of_vocabulary_tokens_raise(world, bad):
    with pytest.raises(TokenError):
        world.token_bytes(bad)
    with pytest.raises(TokenError):
        world.decode([5, bad])
    dec = IncrementalDecoder(world)
    with pytest.raises(TokenError):
        dec.push(bad)


@pytest.mark.parametrize("bad", [-1, 256])
def test_out_of_vocabulary_bytes_and_neox(neox, bad):
    with pytest.raises(TokenError):
        ByteTokenizer().decode([bad])
    with pytest.raises(TokenError):
        neox.decode([bad if bad < 0 else neox.vocab_size])
