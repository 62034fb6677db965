"""The daemon's text side on a tiny random Qwen2 folder with the real Qwen tokenizer and chat template, in
process (a real Host, Store and Scheduler): the KV cache holds exactly what ``transformers.apply_chat_template``
renders for the conversation, the context limit is the model's own unless the config sets one, and "truncate"
re-reads the newest turns only."""

from __future__ import annotations

import json
import shutil

import pytest

from rwkv_chat.daemon.config import Config

from .conftest import write_qwen_folder
from .test_context import InProcess

import transformers  # noqa: E402  (a test dependency)


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory, shared_dir):
    folder = write_qwen_folder(tmp_path_factory.mktemp("qwen") / "tiny-qwen2", shared_dir)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "top_k": 20}))
    return folder


def _reply(events) -> str:
    from rwkv_chat.daemon.protocol import messages as m

    return "".join(e.text for e in events if isinstance(e, m.Token))


def test_the_cache_holds_the_rendered_conversation_and_the_limit_applies(tmp_path, qwen_folder):
    from rwkv_chat.daemon.protocol import messages as m

    reference = transformers.AutoTokenizer.from_pretrained(str(qwen_folder))
    config = Config()
    sys_ = InProcess(tmp_path, qwen_folder, config)
    try:
        model, tok, tpl = sys_.host.model, sys_.host.tokenizer, sys_.host.template
        defaults = {"top_k": 20, "alpha_presence": 0.0, "alpha_frequency": 0.0}
        assert tpl.stop_tokens == (151645, 151643) and tpl.sampling_defaults == defaults
        assert sys_.host.info()["sampling_defaults"] == defaults
        msgs, pairs = [], []
        for user in ("Hello there 🎉", "和 3+3 呢？"):
            events = sys_.chat("c", user, max_tokens=6)
            done = events[-1]
            assert isinstance(done, m.Done) and done.context_limit == model.context_limit == 512, events
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": _reply(events)}]
            pairs.append((user, done.text))
        state = model.load_state(sys_.store.state_path("c", sys_.store.turns("c")[-1].index, model.fingerprint))
        assert done.context_used == state.token_count
        want = reference.apply_chat_template(msgs + [{"role": "user", "content": "next"}], tokenize=False,
                                             add_generation_prompt=True)
        assert tok.decode(state.tokens[0].tolist()) + tpl.prompt("next") == want
        # a configured limit below the model's: the oldest exchanges are left out and the rest re-read
        config.model.context_limit, config.model.context_policy = 70, "truncate"
        for user in ("Tell me more.", "And then?", "Why?", "Go on."):
            events = sys_.chat("c", user, max_tokens=6)
            done = events[-1]
            assert isinstance(done, m.Done) and done.context_limit == 70 and done.context_used <= 70, events
            if done.dropped_turns:
                break
            pairs.append((user, done.text))
        assert done.dropped_turns >= 1
        state = model.load_state(sys_.store.state_path("c", sys_.store.turns("c")[-1].index, model.fingerprint))
        kept = tpl.transcript("", pairs[done.dropped_turns:]) + tpl.prompt(user)
        assert tok.decode(state.tokens[0].tolist()).startswith(kept) and done.context_used == state.token_count
    finally:
        sys_.close()


def test_a_generation_config_eos_ends_the_reply_and_the_closing_follows(tmp_path, qwen_folder):
    from rwkv_chat.daemon.generation import Job
    from rwkv_chat.daemon.protocol import messages as m

    sys_ = InProcess(tmp_path, qwen_folder, Config())
    try:
        model, tok = sys_.host.model, sys_.host.tokenizer
        sampled = dict(temperature=1.0, top_p=1.0, top_k=0, seed=3, max_tokens=8)   # the same draws both times
        free = sys_.chat("free", "Hello there", **sampled)
        ids = model.load_state(sys_.store.state_path("free", 1, model.fingerprint)).tokens[0].tolist()
        prompt = tok.encode(sys_.host.template.system("") + sys_.host.template.prompt("Hello there"))
        reply = ids[len(prompt):len(prompt) + free[-1].tokens]
        k = next(i for i in range(1, len(reply)) if reply[i] not in reply[:i])      # a token first seen at i
        folder = tmp_path / "eos"
        shutil.copytree(qwen_folder, folder)
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [reply[k]]}))
        sys_.run(Job(id="load2", kind="load", client_id="", topic=m.DAEMON_TOPIC,
                     request=m.Load(client_id="", topic=m.DAEMON_TOPIC, path=str(folder), strategy="cpu fp32")))
        model, tpl = sys_.host.model, sys_.host.template
        assert tpl.stop_tokens == (151645, reply[k]) and tpl.after_stop(reply[k]) == "<|im_end|>\n"
        events = sys_.chat("stopped", "Hello there", **sampled)
        done = events[-1]
        assert done.reason == "stop" and done.tokens == k + 1 and _reply(events) == tok.decode(reply[:k])
        state = model.load_state(sys_.store.state_path("stopped", 1, model.fingerprint))
        assert state.tokens[0].tolist() == prompt + reply[:k + 1] + tok.encode("<|im_end|>\n")
    finally:
        sys_.close()


def test_a_greedy_completion_with_the_folders_defaults_is_transformers_greedy(tmp_path, qwen_folder):
    """``transformers`` applies no presence or frequency penalty: a Hugging Face folder's defaults leave them at
    0 (a ``[sampling]`` key would still win), so temperature 0 alone gives ``transformers``' greedy text."""
    import torch

    from rwkv_chat.daemon.generation import Job
    from rwkv_chat.daemon.protocol import messages as m

    sys_ = InProcess(tmp_path, qwen_folder, Config())
    try:
        events = sys_.run(Job(id="g", kind="complete", client_id="t", topic="g", request=m.Complete(
            client_id="t", topic="g", prompt="The capital of France is", sampling={"temperature": 0.0,
                                                                                 "max_tokens": 12})))
        done = events[-1]
        reference = transformers.AutoTokenizer.from_pretrained(str(qwen_folder))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(qwen_folder), dtype=torch.float32).eval()
        ids = reference("The capital of France is", return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=done.tokens, do_sample=False, eos_token_id=None)
        assert isinstance(done, m.Done) and done.tokens == 12, events
        assert done.text == reference.decode(out[0, ids.shape[1]:])
        defaults = sys_.host.info()["sampling_defaults"]        # what the TUI's sampling panel shows
        assert defaults["alpha_presence"] == defaults["alpha_frequency"] == 0.0
    finally:
        sys_.close()


def test_the_folders_repetition_penalty_gives_transformers_greedy_with_that_penalty(tmp_path, qwen_folder):
    """A ``generation_config.json`` repetition_penalty applies as ``transformers.generate`` applies it: to every
    token of the prompt and of the text so far; greedy decoding then gives the same text."""
    import torch

    from rwkv_chat.daemon.generation import Job
    from rwkv_chat.daemon.protocol import messages as m

    folder = tmp_path / "penalized"
    shutil.copytree(qwen_folder, folder)
    config_path = folder / "generation_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "repetition_penalty": 1.3}))
    sys_ = InProcess(tmp_path / "home", folder, Config())
    try:
        assert sys_.host.info()["sampling_defaults"]["repetition_penalty"] == 1.3
        prompt = "The capital of France is Paris. The capital of"
        events = sys_.run(Job(id="g", kind="complete", client_id="t", topic="g", request=m.Complete(
            client_id="t", topic="g", prompt=prompt, sampling={"temperature": 0.0, "max_tokens": 16})))
        done = events[-1]
        reference = transformers.AutoTokenizer.from_pretrained(str(folder))
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        ids = reference(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = hf.generate(ids, max_new_tokens=done.tokens, do_sample=False, eos_token_id=None,
                              repetition_penalty=1.3, top_k=None)
            plain = hf.generate(ids, max_new_tokens=done.tokens, do_sample=False, eos_token_id=None,
                                repetition_penalty=1.0, top_k=None)
        assert isinstance(done, m.Done) and done.tokens == 16, events
        assert done.text == reference.decode(out[0, ids.shape[1]:])
        assert not torch.equal(out, plain)          # the penalty changed the text: the check has teeth
    finally:
        sys_.close()
