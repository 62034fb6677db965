"""Stop tokens, the context limit and its policies, and model sampling defaults — on the real tiny RWKV models
(bytes vocabulary), in process (a real Host, Store and Scheduler) and in real daemon processes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from rwkv_chat.daemon.config import Config, ConfigError, load_config, save_config
from rwkv_chat.daemon.generation import Job
from rwkv_chat.daemon.host import Host
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.daemon.scheduler import Scheduler
from rwkv_chat.daemon.sessions import Sessions
from rwkv_chat.daemon.store import Store
from rwkv_chat.models.text.chat_template import HFChatTemplate
from rwkv_chat.models.text.templates import RWKV_CHAT

from .conftest import cli, greedy, make_home, start_daemon, stop_daemon

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}
# a Jinja2 chat template in the format the tiny models answer in words (they answer a ChatML prompt with newlines)
TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}<end>\\n\\n{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


class InProcess:
    """A real Host with a tiny RWKV model, a Store, Sessions and the Scheduler's thread; ``run(job)`` returns
    the job's events."""

    def __init__(self, tmp_path: Path, model: Path, config: Config):
        self.host = Host()
        self.store = Store(tmp_path / "db.sqlite3", tmp_path / "states")
        self.events: list = []
        self.done: dict[str, threading.Event] = {}
        self.sched = Scheduler(self.host, self.store, Sessions(self.store, 8, 64), config, self._emit)
        self.sched.start()
        self.run(Job(id="load", kind="load", client_id="", topic=m.DAEMON_TOPIC,
                     request=m.Load(client_id="", topic=m.DAEMON_TOPIC, path=str(model), strategy="cpu fp32")))
        self.n = 0

    def _emit(self, topic, ev):
        self.events.append(ev)
        if isinstance(ev, (m.Done, m.Failed)) and ev.job_id in self.done:
            self.done[ev.job_id].set()

    def run(self, job: Job) -> list:
        self.done[job.id] = threading.Event()
        self.sched.submit(job)
        assert self.done[job.id].wait(60)
        return [e for e in self.events if getattr(e, "job_id", None) == job.id]

    def chat(self, cid: str, message: str, **sampling) -> list:
        self.n += 1
        return self.run(Job(id=f"c{self.n}", kind="chat", client_id="t", topic=cid, conversation_id=cid,
                            mode="chat", request=m.Chat(client_id="t", conversation_id=cid, message=message,
                                                        sampling={**GREEDY, **sampling})))

    def close(self):
        self.sched.stop()


def _state_equal(a, b) -> bool:
    return a.token_count == b.token_count and all(
        torch.allclose(x.float(), y.float(), atol=1e-5, rtol=1e-4) for la, lb in zip(a.layers, b.layers)
        for x, y in zip(la, lb))


def test_a_stop_token_ends_the_reply_unshown_and_the_state_consumes_it(tmp_path, model_path):
    model_file = model_path("7")
    sys_ = InProcess(tmp_path, model_file, Config())
    try:
        tok = sys_.host.tokenizer
        first = HFChatTemplate(TEMPLATE, {}, tok)
        prompt = first.transcript("", []) + first.prompt("Hello there")
        free = greedy(model_file, prompt, 40)            # the reply without a stop token
        stop_char = next(c for c in free[3:] if free.index(c) >= 3)
        stop = tok.encode(stop_char)[0]
        template = HFChatTemplate(TEMPLATE, {}, tok, extra_stops=(stop,))
        assert template.stop_tokens == (stop,) and template.after_stop(stop) == template.stop
        sys_.host.template = template
        events = sys_.chat("conv1", "Hello there", max_tokens=40)
        done = events[-1]
        reply = free[:free.index(stop_char)]
        assert isinstance(done, m.Done) and done.reason == "stop", events
        assert done.text == reply.strip() and stop_char not in "".join(e.text for e in events if isinstance(e, m.Token))
        # the saved state consumed the prompt, the reply, the stop token and the rest of the closing text
        model = sys_.host.model
        saved = model.load_state(sys_.store.state_path("conv1", 1, model.fingerprint))
        _, want = model.forward(tok.encode(prompt + reply) + [stop] + tok.encode(template.after_stop(stop)), None)
        assert _state_equal(saved, want)
        # a reply cut by max_tokens is closed with the template's closing text
        events = sys_.chat("conv2", "Hello there", max_tokens=2)
        assert events[-1].reason == "length"
        saved = model.load_state(sys_.store.state_path("conv2", 1, model.fingerprint))
        _, want = model.forward(tok.encode(prompt + free[:2] + template.stop), None)
        assert _state_equal(saved, want)
    finally:
        sys_.close()


def test_raw_completion_stops_at_the_tokenizers_eos(tmp_path, model_path):
    model_file = model_path("7")
    sys_ = InProcess(tmp_path, model_file, Config())
    try:
        free = greedy(model_file, "Once upon a time", 30)
        eos_char = next(c for c in free[2:] if free.index(c) >= 2)
        sys_.host.tokenizer.eos_ids = (ord(eos_char),)
        events = sys_.run(Job(id="x", kind="complete", client_id="t", topic="x", request=m.Complete(
            client_id="t", topic="x", prompt="Once upon a time", sampling={**GREEDY, "max_tokens": 30})))
        assert events[-1].reason == "stop" and events[-1].text == free[:free.index(eos_char)]
    finally:
        sys_.close()


def _transcript_reply(model_file, template, system, pairs, message, n):
    return greedy(model_file, template.transcript(system, pairs) + template.prompt(message), n)


def test_context_limit_error_and_truncate(tmp_path, model_path):
    model_file = model_path("7")
    config = Config()
    config.model.context_limit = 160        # bytes vocabulary: 1 token per byte
    sys_ = InProcess(tmp_path, model_file, config)
    try:
        n = 20
        pairs: list[tuple[str, str]] = []
        for i, msg in enumerate(["Tell me a story.", "And then?", "What happened next?", "Why?", "Go on."]):
            events = sys_.chat("c", msg, max_tokens=n)
            done = events[-1]
            if isinstance(done, m.Failed):
                break
            assert done.context_limit == 160 and done.context_used <= 160 and done.dropped_turns == 0
            assert done.text == _transcript_reply(model_file, RWKV_CHAT, "", pairs, msg, done.tokens).strip()
            pairs.append((msg, done.text))
        else:
            pytest.fail("the conversation never reached the limit")
        assert done.kind == "ContextLimitExceeded" and "context limit of 160" in done.message
        assert len(sys_.store.turns("c")) == 2 * len(pairs)      # nothing stored for the failed turn
        config.model.context_policy = "truncate"
        events = sys_.chat("c", msg, max_tokens=n)
        done = events[-1]
        assert isinstance(done, m.Done) and done.dropped_turns >= 1 and done.context_used <= 160, events
        notes = [e.text for e in events if isinstance(e, m.Progress) and e.text]
        assert notes and f"its {2 * done.dropped_turns} oldest turns are left out" in notes[0]
        kept = pairs[done.dropped_turns:]
        assert done.text == _transcript_reply(model_file, RWKV_CHAT, "", kept, msg, done.tokens).strip()
        # the message alone beyond the limit fails under either policy
        events = sys_.chat("c", "x" * 200, max_tokens=n)
        assert isinstance(events[-1], m.Failed) and "shorten it" in events[-1].message
    finally:
        sys_.close()


def test_config_keys_and_model_sampling_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[model]\ncontext_limit = 4096\ncontext_policy = "truncate"\n[sampling]\ntop_p = 0.5\n')
    cfg = load_config(path)
    assert (cfg.model.context_limit, cfg.model.context_policy) == (4096, "truncate")
    base = cfg.sampling_base({"temperature": 0.7, "top_p": 0.8, "top_k": 20})
    assert (base.temperature, base.top_p, base.top_k) == (0.7, 0.5, 20)      # the file's key wins
    assert cfg.sampling_base(None) == cfg.sampling
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg and again.sampling_set == {"top_p"}                   # a save keeps the others unset
    for bad in ('context_policy = "drop"', "context_limit = -1", 'context_limit = "x"'):
        path.write_text(f"[model]\n{bad}\n")
        with pytest.raises(ConfigError, match="context_"):
            load_config(path)


def test_the_cli_shows_a_context_error_in_one_line(tmp_path, model_path):
    home = make_home(tmp_path / "home")
    paths = home_paths(home)
    cfg = load_config(paths.config_file)
    cfg.model.context_limit = 40
    save_config(cfg, paths.config_file)
    start_daemon(home, model_path("7"))
    try:
        r = cli(home, "chat", "--conversation", "c0", "hi", "--max-tokens", 4, "--temperature", 0)
        used = len("User: hi\n\nAssistant:") + 4 + len(RWKV_CHAT.stop)      # bytes vocabulary; cut at 4 tokens
        assert f"; context {used}/40 tokens]" in r.stderr, r.stderr
        r = cli(home, "chat", "--conversation", "c1", "x" * 60, "--max-tokens", 4, check=False)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        line = r.stderr.strip().splitlines()[-1]
        assert line.startswith("rwkv-chat: ") and "context limit of 40 tokens" in line, r.stderr
        status = cli(home, "daemon", "status", "--json").stdout
        assert '"context_limit"' in status
    finally:
        stop_daemon(home)


def test_a_done_without_a_context_limit_reads_in_a_client_that_predates_the_fields():
    import msgspec

    new = ("cached_tokens", "context_used", "context_limit", "dropped_turns", "reread_tokens", "draft_tokens")
    fields = [(f, t, False) if f == "truncated" else (f, t) for f, t in m.Done.__annotations__.items()
              if f not in new]
    old = msgspec.defstruct("Done", fields, tag_field="t", tag="Done", forbid_unknown_fields=True)
    done = m.Done(job_id="j", reason="stop", text="x", prompt_tokens=1, tokens=2, prefill_s=0.0, decode_s=0.0,
                  tokens_per_s=0.0)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(done), type=old).text == "x"
    limited = msgspec.msgpack.encode(msgspec.structs.replace(done, context_used=5, context_limit=9))
    assert msgspec.msgpack.decode(limited, type=m.AnyMessage).context_used == 5


@pytest.mark.parametrize("limit", [60, 120, 400])
@pytest.mark.parametrize("max_tokens", [8, 100])
def test_truncation_leaves_out_the_fewest_exchanges_that_leave_room(limit, max_tokens):
    from rwkv_chat.daemon.context import ContextLimitExceeded, fit_chat
    from rwkv_chat.models.text.tokenizers import ByteTokenizer

    tok, tpl = ByteTokenizer(), RWKV_CHAT
    pairs = [(f"question {i} " + "q" * (7 * i % 23), "answer " + "a" * (11 * i % 31)) for i in range(9)]
    message = "and now?"
    prompt = tok.encode(tpl.transcript("sys", pairs) + tpl.prompt(message))
    closing, want = len(tpl.stop), min(max_tokens, limit // 2)

    def room(k):     # the documented rule, by brute force: zero state, the transcript from exchange k on
        return limit - len(tok.encode(tpl.transcript("sys", pairs[k:]) + tpl.prompt(message))) - closing

    fits = [k for k in range(1, len(pairs) + 1) if room(k) >= want]
    try:
        w = fit_chat(limit=limit, policy="truncate", used=0, prompt=prompt, history=0, tok=tok, template=tpl,
                     system_prompt="sys", pairs=pairs, message=message, max_tokens=max_tokens)
    except ContextLimitExceeded:
        assert room(len(pairs)) < 1
        return
    if limit - len(prompt) - closing >= want:
        assert w.dropped == 0 and not w.zero
    elif fits:
        assert w.dropped == fits[0] and w.room == room(fits[0]) and w.zero
        assert tok.decode(w.prompt) == tpl.transcript("sys", pairs[fits[0]:]) + tpl.prompt(message)
        assert w.history == len(tok.encode(tpl.transcript("sys", pairs[fits[0]:])))
    else:
        assert w.dropped == len(pairs) and w.room == room(len(pairs)) >= 1
    refuse = dict(limit=limit, policy="error", used=0, prompt=prompt, history=0, tok=tok, template=tpl,
                  system_prompt="sys", pairs=pairs, message=message, max_tokens=max_tokens)
    if limit - len(prompt) - closing < 1:
        with pytest.raises(ContextLimitExceeded, match="context_policy"):
            fit_chat(**refuse)
    else:
        assert fit_chat(**refuse).dropped == 0


def test_a_stateless_chat_cut_at_the_context_limit_ends_with_its_reply(tmp_path, model_path):
    """A ``ChatMessages`` reply runs until the template's closing text would no longer fit, then ends "length"
    with the text so far (it is not lost to a failure while the closing text is fed for the prefix cache)."""
    model_file = model_path("7")
    config = Config()
    config.model.context_limit = 40          # bytes vocabulary: 1 token per byte
    sys_ = InProcess(tmp_path, model_file, config)
    try:
        job = Job(id="s", kind="messages", client_id="t", topic="s", request=m.ChatMessages(
            client_id="t", topic="s", messages=[m.ChatMessage(role="user", content="Hello")],
            sampling={**GREEDY, "max_tokens": 500}))
        done = sys_.run(job)[-1]
        prompt = RWKV_CHAT.transcript("", []) + RWKV_CHAT.prompt("Hello")
        closing = len(RWKV_CHAT.stop)
        assert isinstance(done, m.Done) and done.reason == "length", done
        assert done.tokens == 40 - len(prompt) - closing and done.context_used == 40
        assert done.text == greedy(model_file, prompt, done.tokens).strip()
    finally:
        sys_.close()


def test_a_refused_first_message_leaves_no_conversation(tmp_path, model_path):
    """A chat that would make a conversation but is refused (the message beyond the context limit) leaves
    none behind; a refused message in a conversation that exists leaves that conversation as it was."""
    config = Config()
    config.model.context_limit = 40
    sys_ = InProcess(tmp_path, model_path("7"), config)
    try:
        events = sys_.chat("new", "x" * 100, max_tokens=5)
        assert isinstance(events[-1], m.Failed) and "shorten it" in events[-1].message, events
        assert not sys_.store.exists("new")
        assert isinstance(sys_.chat("kept", "Hi", max_tokens=2)[-1], m.Done)
        assert isinstance(sys_.chat("kept", "x" * 100, max_tokens=5)[-1], m.Failed)
        assert sys_.store.exists("kept") and len(sys_.store.turns("kept")) == 2
    finally:
        sys_.close()
