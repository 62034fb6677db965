"""A daemon serving a tiny random Qwen2 checkpoint folder (the real Qwen tokenizer and chat template): chat, two
conversations decoded in one batch, and a restart that resumes from the saved KV cache as if uninterrupted."""

from __future__ import annotations

import threading

import pytest

from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.paths import home_paths

from .conftest import make_home, start_daemon, stop_daemon, write_qwen_folder


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory, shared_dir):
    return write_qwen_folder(tmp_path_factory.mktemp("qwen") / "tiny-qwen2", shared_dir)


def _chat(c: Client, cid: str, msg: str, **kw):
    return list(c.chat(cid, msg, **kw))[-1]


def test_chat_two_at_once_and_resume_after_restart(tmp_path, qwen_folder):
    home = make_home(tmp_path / "h")
    paths = home_paths(home)
    start_daemon(home, qwen_folder)
    # greedy: the replies are compared token for token across batch sizes and a restart, whose products round
    # differently (~1e-7 on the CPU's logits); a random model's distribution is nearly flat over 151,936 tokens,
    # so a sampled token can move with that rounding, the argmax does not (the sampler is tested on its own)
    turn1 = dict(temperature=0.0, max_tokens=12)
    turn2 = dict(temperature=0.0, max_tokens=12)
    try:
        with Client(paths, autostart=False) as c:
            assert c.status()["model"]["family"] == "qwen2"
            u1 = _chat(c, "uninterrupted", "Hello there", **turn1)
            u2 = _chat(c, "uninterrupted", "What next?", **turn2)
        assert u1.tokens > 0 and u2.tokens > 0
        done = {}

        def run(cid):
            with Client(paths, autostart=False) as c:
                done[cid] = _chat(c, cid, "Hello there", **turn1)

        threads = [threading.Thread(target=run, args=(cid,)) for cid in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert done["a"].text == done["b"].text == u1.text
        stop_daemon(home)
        start_daemon(home, qwen_folder)
        with Client(paths, autostart=False) as c:
            r2 = _chat(c, "a", "What next?", **turn2)
            turns = c.conversation("a").turns
        assert r2.text == u2.text and r2.tokens == u2.tokens
        assert [t.family for t in turns] == ["", "qwen2", "", "qwen2"]     # each reply says which model wrote it
        assert r2.prompt_tokens < 20                 # resumed from the saved cache: the history was not re-read
    finally:
        stop_daemon(home)
