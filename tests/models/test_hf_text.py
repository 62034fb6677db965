"""The Hugging Face text side (tokenizer.json, the Jinja2 chat template, generation_config.json) against
``transformers`` on the real Qwen2/2.5/3 tokenizer in ../shared/tokenizers/qwen."""

from __future__ import annotations

import json
import shutil

import pytest

from rwkv_chat.models.errors import TokenizerError
from rwkv_chat.models.text.chat_template import ChatTemplateError, HFChatTemplate, NoChatTemplate
from rwkv_chat.models.text.hf import HFTokenizer, load_hf_text
from rwkv_chat.models.text.templates import RWKV_CHAT
from rwkv_chat.models.text.tokenizers import IncrementalDecoder

TEXTS = [
    "Hello, world!",
    "中文 测试，日本語のテキスト、한국어 and 🎉👍🏽👨‍👩‍👧‍👦 🇯🇵 flags",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\n\tif x  >= 10:\n\t\tpass\r\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nok<|endoftext|>",
    "spaces     runs\t\t\ttabs \n \n\n\n   trailing   ",
    "mixed 中🎉a\t1 23 456 \u3000 full-width ÀÉÎõü ß ﬁ a\u0301 <|im_end|>x<tool_call>",
    "numbers 1234567890 3.14159 and don't we'll I'M",
    "",
]

CONVERSATIONS = [
    ("", []),
    ("You are a helpful assistant.", []),
    ("", [("Hi!", "Hello! How can I help?")]),
    ("Answer briefly.", [("What is 2+2?", "4"), ("和 3+3 呢？", "6 🎉"), ("code?", "```py\nprint(1)\n```")]),
    ("", [("  leading spaces", "trailing  \n"), ("multi\nline\n\nmessage", "reply with <tool_call> text")]),
]


@pytest.fixture(scope="module")
def qwen_dir(shared_dir):
    from tests.conftest import _require

    return _require(shared_dir / "tokenizers" / "qwen")


@pytest.fixture(scope="module")
def text(qwen_dir):
    return load_hf_text(qwen_dir)


@pytest.fixture(scope="module")
def reference(qwen_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(qwen_dir))


@pytest.mark.parametrize("s", TEXTS)
def test_encode_decode_equal_transformers(text, reference, s):
    ids = text.tokenizer.encode(s)
    assert ids == reference.encode(s, add_special_tokens=False)
    assert text.tokenizer.decode(ids) == reference.decode(ids)
    assert text.tokenizer.decode(ids) == s or "\u0301" in s or "ﬁ" in s    # NFC normalization only


def test_special_tokens_and_vocab(text, reference):
    tok = text.tokenizer
    assert tok.vocab_size == len(reference)
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>"):
        i = reference.convert_tokens_to_ids(t)
        assert tok.token_id(t) == i and tok.token_bytes(i) == t.encode()
    padded = HFTokenizer(tok.path, vocab_size=151936)
    assert padded.vocab_size == 151936 and padded.token_bytes(151935) == b""
    with pytest.raises(TokenizerError):
        HFTokenizer(tok.path, vocab_size=1000)


@pytest.mark.parametrize("s", [TEXTS[1], "🎉👨‍👩‍👧‍👦中文🇯🇵 ok", TEXTS[5]])
def test_streaming_every_token_joins_to_the_text(text, reference, s):
    tok = text.tokenizer
    ids = tok.encode(s)
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(t) for t in ids]
    assert "".join(pieces) + dec.flush() == reference.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert any(len(tok.token_bytes(t).decode("utf-8", errors="replace")) != len(tok.token_bytes(t).decode(
        "utf-8", errors="ignore")) for t in ids) or s == TEXTS[5]   # some token splits a character


def _messages(system, pairs, message=None):
    out = [{"role": "system", "content": system}] if system else []
    for u, a in pairs:
        out += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    if message is not None:
        out.append({"role": "user", "content": message})
    return out


@pytest.mark.parametrize("system, pairs", CONVERSATIONS)
def test_chat_pieces_equal_apply_chat_template(text, reference, system, pairs):
    tpl = text.chat_template
    assert tpl.prefix_stable
    message = "And now? 🎉 中文"
    want = reference.apply_chat_template(_messages(system, pairs, message), tokenize=False,
                                         add_generation_prompt=True)
    fed = tpl.transcript(system, pairs) + tpl.prompt(message)
    assert fed == want
    assert tpl.conversation(system, pairs, message) == want
    # the daemon's feed, piece by piece: system once, then per exchange prompt, reply, closing
    pieces = [tpl.system(system)]
    for u, a in pairs:
        pieces += [tpl.prompt(u), a, tpl.stop]
    assert "".join(pieces + [tpl.prompt(message)]) == want
    # token ids: the pieces encoded one by one give apply_chat_template's ids (cuts at special tokens)
    ids = [i for p in pieces + [tpl.prompt(message)] for i in text.tokenizer.encode(p)]
    assert ids == reference.apply_chat_template(_messages(system, pairs, message), tokenize=True,
                                                add_generation_prompt=True, return_dict=False)


def test_stop_tokens(text, reference):
    tpl = text.chat_template
    im_end = reference.convert_tokens_to_ids("<|im_end|>")
    assert tpl.stop == "<|im_end|>\n" and tpl.stop_tokens[0] == im_end
    assert tpl.after_stop(im_end) == "\n"
    # a reply ended by <|im_end|> (consumed) then "\n" is the rendering of the closed exchange
    closed = reference.apply_chat_template(_messages("", [("hi", "yo")], "next"), tokenize=False,
                                           add_generation_prompt=True)
    assert closed.startswith(tpl.system("") + tpl.prompt("hi") + "yo" + "<|im_end|>" + tpl.after_stop(im_end))
    assert text.tokenizer.eos_ids == (im_end,)      # tokenizer_config's eos_token; no generation_config here
    assert RWKV_CHAT.stop_tokens == () and RWKV_CHAT.after_stop(0) == ""


def test_generation_config_and_other_eos(qwen_dir, tmp_path, reference):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen_dir / name, tmp_path / name)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
         "eos_token_id": [151645, 151643]}))
    t = load_hf_text(tmp_path, vocab_size=151936)
    no_penalties = {"alpha_presence": 0.0, "alpha_frequency": 0.0}           # transformers has none
    assert t.generation.sampling_defaults() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                "repetition_penalty": 1.05, **no_penalties}
    assert t.generation.repetition_penalty == 1.05
    assert t.tokenizer.eos_ids == (151645, 151643)
    assert t.chat_template.stop_tokens == (151645, 151643)
    assert t.chat_template.after_stop(151643) == "<|im_end|>\n"     # another eos: the whole closing follows
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.7}))
    assert load_hf_text(tmp_path).generation.sampling_defaults() == {"temperature": 0.0, **no_penalties}
    (tmp_path / "generation_config.json").write_text(json.dumps({"repetition_penalty": 0}))
    with pytest.raises(TokenizerError, match="repetition_penalty must be more than 0"):
        load_hf_text(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(TokenizerError, match="generation_config.json"):
        load_hf_text(tmp_path)


def _folder_with_template(qwen_dir, tmp_path, template):
    shutil.copy(qwen_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    if template is None:
        config.pop("chat_template")
    else:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


QWEN25_LIKE = (  # Qwen2.5's shape: a default system prompt when the conversation has none
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
R1_LIKE = (  # DeepSeek-R1's shape: a generation prompt other than an assistant turn's header; bos_token
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ '<|im_start|>' + m['content'] }}{% else %}"
    "{{ '<|im_end|>' + m['content'].split('</think>')[-1] + '<|endoftext|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_end|><think>\\n' }}{% endif %}")


@pytest.mark.parametrize("source, stable", [(QWEN25_LIKE, True), (R1_LIKE, False)])
def test_other_templates(qwen_dir, tmp_path, source, stable):
    from transformers import AutoTokenizer

    folder = _folder_with_template(qwen_dir, tmp_path, source)
    tpl = load_hf_text(folder).chat_template
    ref = AutoTokenizer.from_pretrained(str(folder))
    assert tpl.prefix_stable is stable
    for system, pairs in CONVERSATIONS:
        pairs = [(u, a.strip()) for u, a in pairs]      # the daemon stores replies stripped (this one trims)
        want = ref.apply_chat_template(_messages(system, pairs, "m"), tokenize=False, add_generation_prompt=True)
        assert tpl.conversation(system, pairs, "m") == want
        if stable:
            assert tpl.transcript(system, pairs) + tpl.prompt("m") == want
    if not stable:        # the fallback: the pieces are what the model read while generating
        assert tpl.prompt("m").endswith("<|im_end|><think>\n")


def test_template_errors(qwen_dir, tmp_path):
    folder = _folder_with_template(qwen_dir, tmp_path, None)
    t = load_hf_text(folder)
    assert isinstance(t.chat_template, NoChatTemplate) and t.chat_template.stop_tokens == ()
    with pytest.raises(ChatTemplateError, match="no chat template"):
        t.chat_template.prompt("hi")
    tok = t.tokenizer
    with pytest.raises(ChatTemplateError, match="does not compile"):
        HFChatTemplate("{% for %}", {}, tok)
    with pytest.raises(ChatTemplateError, match="refused"):
        HFChatTemplate("{{ raise_exception('only user turns') }}", {}, tok)
    with pytest.raises(ChatTemplateError, match="cannot be split"):
        HFChatTemplate("{% for m in messages %}{{ m['role'] }}{% endfor %}", {}, tok)
    no_system = HFChatTemplate("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                               "supported') }}{% endif %}" + QWEN25_LIKE, {}, tok)
    assert no_system.prefix_stable and no_system.prompt("hi").endswith("<|im_start|>assistant\n")
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        no_system.system("be brief")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError):
        load_hf_text(folder)


def test_every_token_has_its_bytes_in_transformers_vocabulary(text, reference):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    added = {i: t.content for i, t in reference.added_tokens_decoder.items()}
    tokens = reference.convert_ids_to_tokens(list(range(len(reference))))
    tok = text.tokenizer
    for i, t in enumerate(tokens):
        want = added[i].encode("utf-8") if i in added else bytes(byte_of[c] for c in t)
        assert tok.token_bytes(i) == want, (i, t)


def test_a_token_outside_the_byte_level_alphabet_is_an_error(tmp_path):
    from tokenizers import Tokenizer, decoders, models

    hf = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "中": 3, "Ġ": 4, " ": 5}, merges=[("a", "b")]))
    hf.decoder = decoders.ByteLevel()
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json", vocab_size=8)
    assert tok.vocab_size == 8 and tok.token_bytes(2) == b"ab" and tok.token_bytes(4) == b" "
    assert tok.token_bytes(7) == b""
    for bad in (3, 5):          # a character beyond latin-1; a latin-1 one that the alphabet writes otherwise
        with pytest.raises(TokenizerError, match="not in the byte-level alphabet"):
            tok.token_bytes(bad)
