"""Keep-alive: a real daemon unloads its idle model after ``[daemon] keep_alive`` seconds and loads it again
for the next request, with load progress; the conversation goes on from its state on disk."""

from __future__ import annotations

import time

import pytest

from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.config import ConfigError, load_config
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.models.text.templates import RWKV_CHAT

from ..daemon.conftest import cli, greedy, make_home, start_daemon, stop_daemon, wait_for

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}
KEEP = 1.5


def run(gen) -> list:
    return list(gen)


def test_an_idle_model_unloads_and_loads_again_for_the_next_turn(tmp_path, model_path):
    home = make_home(tmp_path, keep_alive=KEEP)
    start_daemon(home, model_path("5.2"))
    try:
        with Client(home_paths(home), autostart=False) as c:
            cid = c.create_conversation(title="keep", **GREEDY).id
            first = run(c.chat(cid, "Hello", max_tokens=8))[-1]
            assert c.status()["model"]["loaded"]
            t0 = time.monotonic()
            st = wait_for(lambda: (s := c.status())["model"].get("unloaded") and s, timeout=KEEP + 10)
            assert time.monotonic() - t0 >= KEEP - 0.5          # not before its time (the reply just ended)
            assert st["model"]["unloaded"] == "keep-alive" and not st["model"]["loaded"]
            assert st["model"]["path"] == str(model_path("5.2")) and st["home"]["sessions"]["resident"] == 0
            ps = cli(home, "ps").stdout
            assert "state: unloaded (keep-alive)" in ps and "conversations in memory: 0" in ps

            events = run(c.chat(cid, "Again", max_tokens=8))
            done = events[-1]
            assert isinstance(done, m.Done) and done.reason in ("stop", "length")
            loads = [e for e in events if isinstance(e, m.Progress) and e.phase == "load"]
            assert loads and loads[-1].done == loads[-1].total and loads[-1].text == str(model_path("5.2"))
            # the state saved after "Hello" came back from disk: only the new message is read
            assert done.prompt_tokens == len(RWKV_CHAT.prompt("Again").encode())
            text = RWKV_CHAT.transcript("", [("Hello", first.text)]) + RWKV_CHAT.prompt("Again")
            assert done.text == greedy(model_path("5.2"), text, 8).split(RWKV_CHAT.stop)[0].strip()
            st = c.status()
            assert st["model"]["loaded"] and "unloaded" not in st["model"] and st["model"]["keep_alive"] == KEEP
            assert st["model"]["idle_s"] < KEEP
    finally:
        stop_daemon(home)


def test_keep_alive_is_read_as_seconds_or_a_duration(tmp_path):
    cfg = tmp_path / "config.toml"
    for text, seconds in (("30m", 1800.0), ("90s", 90.0), ("2h", 7200.0), (0, 0.0), (45, 45.0), ("1.5", 1.5)):
        value = f'"{text}"' if isinstance(text, str) else text
        cfg.write_text(f"[daemon]\nkeep_alive = {value}\n")
        assert load_config(cfg).daemon.keep_alive == seconds
    for bad in ('"soon"', "-5", '"5x"', "true"):
        cfg.write_text(f"[daemon]\nkeep_alive = {bad}\n")
        with pytest.raises(ConfigError, match="keep_alive"):
            load_config(cfg)
    assert load_config(tmp_path / "none.toml").daemon.keep_alive == 1800.0
