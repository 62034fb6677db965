"""Continuous batching through a real daemon: a generation's output does not depend on which others
share its decode steps; admission is round-robin across clients."""

from __future__ import annotations

import threading
import time

import pytest

from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.daemon.client import Client

from .conftest import make_home, start_daemon, stop_daemon

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}
PROMPTS = ["Once upon a time", "In 1990, the", "The quick brown fox jumps over the lazy dog. " * 3]


def _generate(home, prompt: str, sampling: dict, barrier=None) -> tuple[str, float, float]:
    """(streamed text, time of the first token, time of Done) of one completion by its own client."""
    with Client(home_paths(home), autostart=False) as c:
        if barrier is not None:
            barrier.wait(30)                     # all clients connected: the requests go out together
        gen = c.complete(prompt, **sampling)
        text, first = "", None
        for ev in gen:
            if isinstance(ev, m.Token):
                first = first or time.monotonic()
                text += ev.text
            elif isinstance(ev, m.Done):
                assert ev.text == text
                return text, first, time.monotonic()
    raise AssertionError("no Done event")


def _concurrent(home, prompts, sampling) -> list[tuple[str, float, float]]:
    out: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def worker(i):
        out[i] = _generate(home, prompts[i], sampling, barrier)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(o is not None for o in out)
    return out


def _overlapped(results) -> bool:
    """Every generation streamed while every other one had not finished: they shared decode steps."""
    return max(first for _, first, _ in results) < min(done for _, _, done in results)


@pytest.mark.parametrize("n", [2, 3])
def test_concurrent_greedy_equals_alone(daemon_home, n):
    sampling = dict(max_tokens=600, **GREEDY)  # long enough that the requests surely overlap
    alone = [_generate(daemon_home, pr, sampling)[0] for pr in PROMPTS[:n]]
    together = _concurrent(daemon_home, PROMPTS[:n], sampling)
    assert _overlapped(together), "the generations did not run at the same time"
    assert [t for t, _, _ in together] == alone


def test_seeded_sampling_is_unchanged_by_batching(daemon_home):
    sampling = dict(max_tokens=600, temperature=1.0, top_p=0.9, alpha_frequency=0.2, alpha_presence=0.2, seed=11)
    alone = [_generate(daemon_home, pr, sampling)[0] for pr in PROMPTS]
    together = _concurrent(daemon_home, PROMPTS, sampling)
    assert _overlapped(together)
    assert [t for t, _, _ in together] == alone
    assert len(set(alone)) == 3                      # different prompts, different samples


def test_a_long_prompt_does_not_stall_streaming_generations(daemon_home):
    """A prompt of many prefill chunks enters while another generation streams: the stream goes on
    between its chunks (the streaming one ends before the long prompt's first token)."""
    with Client(home_paths(daemon_home), autostart=False) as a, Client(home_paths(daemon_home), autostart=False) as b:
        stream = a.complete("Tell me", max_tokens=40, **GREEDY)
        next(e for e in stream if isinstance(e, m.Token))
        long_gen = b.complete("word " * 1500, max_tokens=2, **GREEDY)    # 7500 tokens = 30 chunks
        next(e for e in long_gen if isinstance(e, m.Started))
        rest = list(stream)
        assert isinstance(rest[-1], m.Done) and rest[-1].tokens == 40
        seen = list(long_gen)
        chunks = [e for e in seen if isinstance(e, m.Progress) and e.phase == "prefill"]
        assert len(chunks) >= 25 and chunks[-1].done == chunks[-1].total
        assert chunks[0].done < chunks[-1].total, "the long prompt was prefilled before the stream ended"


def test_admission_is_round_robin_across_clients(tmp_path, model_path):
    """One client floods the queue; another client's single request is admitted after at most one more
    of the flood (one generation at a time, admission order observed from the Started events)."""
    home = make_home(tmp_path / "h", max_active=1)
    start_daemon(home, model_path("5.2"))
    try:
        paths = home_paths(home)
        with Client(paths, autostart=False) as flood, Client(paths, autostart=False) as other, \
                Client(paths, autostart=False) as watch:
            topics = [f"flood-{i}" for i in range(6)] + ["other-0"]
            for t in topics:
                watch._subscribe(t)
            # long enough that the running generation still holds the one place while every request queues
            req = dict(prompt="Count with me: one, two, three", stop=[], sampling={"max_tokens": 300})
            for t in topics[:6]:
                flood.request(m.Complete(client_id=flood.client_id, topic=t, **req))
            other.request(m.Complete(client_id=other.client_id, topic="other-0", **req))
            started, done = [], 0
            end = time.monotonic() + 120
            while done < len(topics) and time.monotonic() < end:
                ev = watch._next_event(0.5)
                if ev is None or ev[0] not in topics:     # the daemon topic: heartbeats, the start-up load
                    continue
                if isinstance(ev[1], m.Started):
                    started.append(ev[0])
                elif isinstance(ev[1], m.Done):
                    done += 1
        assert sorted(started) == sorted(topics)
        assert started[0] == "flood-0"
        # flood-0 ran when "other" arrived; then the queue alternates flood-1, other-0, flood-2, ...
        assert started.index("other-0") <= 2, started
        assert [t for t in started if t.startswith("flood")] == topics[:6]       # FIFO within a client
    finally:
        stop_daemon(home)
