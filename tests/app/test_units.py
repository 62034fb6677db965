"""Pure helpers of the UI: text cleaning, sampling fields, strategy suggestions, help labels, export paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from rwkv_chat.daemon.config import SAMPLING_KEYS, Config
from rwkv_chat.app.screens.conversation_actions import export_path
from rwkv_chat.app.screens.first_run import check_checkpoint, checkpoint_path, suggest_strategies
from rwkv_chat.app.screens.help import key_label
from rwkv_chat.app.widgets.chat_log import preview
from rwkv_chat.app.widgets.prompt_input import clean_text
from rwkv_chat.app.widgets.sampling_panel import FIELDS, parse_field
from rwkv_chat.app.texts import render_tree
from rwkv_chat.daemon.protocol.messages import TurnInfo


def test_clean_text_drops_controls_and_escapes():
    assert clean_text("a\x1b[1;31mb\x1b[0m\x00\x08c\r\nd\re\tf\x7f\x9b") == "abc\nd\ne\tf"
    assert clean_text("") == ""
    assert clean_text("emoji 🙂 and 中文") == "emoji 🙂 and 中文"
    assert clean_text("bad \ud800 surrogate") == "bad ? surrogate"


def test_sampling_defaults_are_the_reference_sampler_defaults():
    from rwkv_chat.models.text.sampling import SamplerArgs

    ref = SamplerArgs()
    for name in SAMPLING_KEYS:
        assert getattr(Config().sampling, name) == getattr(ref, name), name
    assert Config().sampling.max_tokens == 256        # the config's documented reply length
    assert {k for k, *_ in FIELDS} == set(SAMPLING_KEYS)


def test_parse_field_ranges():
    assert parse_field("temperature", " 0.7 ") == 0.7
    assert parse_field("top_k", "40") == 40
    assert parse_field("seed", "") is None
    for key, text in [("top_p", "1.5"), ("top_k", "1.5"), ("temperature", "-1"), ("alpha_decay", "nan"),
                      ("max_tokens", "0"), ("temperature", "abc")]:
        with pytest.raises(ValueError):
            parse_field(key, text)
    assert parse_field("repetition_penalty", "1.05") == 1.05
    for text in ("0", "-1"):                        # more than 0, as the sampler takes it
        with pytest.raises(ValueError, match="^Repetition penalty must be more than 0$"):
            parse_field("repetition_penalty", text)


def test_strategy_suggestions_fit_the_devices():
    cpu = suggest_strategies(["cpu"])
    assert cpu[0] == "cpu fp32" and "cpu bf16" in cpu and not any(s.startswith("cuda") for s in cpu)
    gpu = suggest_strategies(["cpu", "cuda:0 NVIDIA H100", "cuda:1 NVIDIA H100"])
    assert gpu[:2] == ["cuda fp16", "cuda fp16i8"] and "cuda:1 fp16" in gpu and "cpu fp32" in gpu


def test_every_suggested_strategy_parses():
    from rwkv_chat.models.strategy import parse_strategy

    for s in suggest_strategies(["cpu", "cuda:0 X", "cuda:1 Y", "mps"]):
        parse_strategy(s)


def test_check_checkpoint(tmp_path):
    assert "path" in check_checkpoint(" ")
    assert "does not exist" in check_checkpoint(str(tmp_path / "x.pth"))
    assert "folder" in check_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert check_checkpoint(str(tmp_path)) is None          # a Hugging Face model folder
    (tmp_path / "m.bin").write_bytes(b"")
    assert ".pth" in check_checkpoint(str(tmp_path / "m.bin"))
    (tmp_path / "m.pth").write_bytes(b"")
    assert check_checkpoint(str(tmp_path / "m.pth")) is None
    assert check_checkpoint(str(tmp_path / "m")) is None     # m.pth, as `rwkv-chat load` and the engine take it
    assert checkpoint_path(str(tmp_path / "m")) == str((tmp_path / "m.pth").resolve())


def test_small_helpers():
    assert key_label("ctrl+n,f2") == "Ctrl+N / F2"
    assert key_label("escape") == "Esc"
    assert preview("x" * 10, 4) == "xxxx\n… (6 more characters)"
    p = export_path(Path("/d"), "Hello, World!", "c1", "md")
    assert p == Path("/d/exports/hello-world-c1.md")
    assert export_path(Path("/d"), "???", "c1", "json").name == "conversation-c1.json"


def test_the_tree_names_each_role_in_full():
    def turn(i, role, text, parent, branch=0, branches=1):
        return TurnInfo(index=i, role=role, text=text, tokens=1, created=0.0, finished=0.0, parent=parent,
                        branch=branch, branches=branches)

    turns = [turn(0, "user", "Hi", -1), turn(1, "assistant", "Hello", 0, 0, 2), turn(2, "assistant", "Hey", 0, 1, 2)]
    lines = render_tree(turns, leaf=2).splitlines()
    roles = [ln[1:].split()[1] for ln in lines]           # after the mark column: index, role
    assert roles == [t.role for t in (turns[0], turns[1], turns[2])], lines     # not cut to "assi"
    assert lines[2].startswith("*") and not lines[1].startswith("*")           # the chosen path: the second reply


def test_status_counts_hits_and_misses_in_words():
    from rwkv_chat.app.daemon_cli import prompt_states_line

    one = prompt_states_line({"hits": {"device": 0, "ram": 1, "disk": 0}, "misses": 1})
    two = prompt_states_line({"hits": {}, "misses": 2})
    assert one.endswith("; 1 miss") and two.endswith("; 2 misses"), (one, two)


def test_what_serves_the_model_in_words():
    from rwkv_chat.app.texts import serving, serving_short

    building = {"backend": "torch (pure torch (kernels=False))",
                "kernel_build": [{"device": "cpu", "state": "building", "compiled": 3, "total": 7, "seconds": 41.6,
                                  "error": ""}]}
    assert serving_short(building) == "torch · kernels 3/7"
    assert "CPU kernels building: 3/7 sources compiled, 42 s" in serving(building)
    done = {"backend": "fused-cpu (one compiled C++ call per step)"}
    assert serving_short(done) == "fused-cpu" and serving(done) == done["backend"]
    failed = {**done, "backend": "eager (torch ops)", "kernels_error": "cpu: build failed (no compiler)"}
    assert serving(failed).endswith("cpu: build failed (no compiler)")


def test_the_strategy_help_says_f8_runs_on_the_cpu_too():
    """f8's device check admits the CPU (an exact emulation), so the help does not call it a GPU-only format."""
    import torch

    from rwkv_chat.app.texts import STRATEGY_HELP
    from rwkv_chat.models import formats

    assert formats.get("f8").check_device(torch.device("cpu")) is None
    clause = " ".join(STRATEGY_HELP.split()).split("f8 (", 1)[1].split(")", 1)[0]
    assert "CPU" in clause, clause


def test_model_text_for_a_terminal_shows_control_characters_instead_of_obeying_them():
    from rwkv_chat.app.texts import terminal_safe

    text = "ok\x1b[2J\x1b]0;title\x07 \r done\x7f\x9b31m 世界 🎉\n\tnext\x00"
    out = terminal_safe(text)
    assert out == "ok\u241b[2J\u241b]0;title\u2407 \u240d done\u2421\ufffd31m 世界 🎉\n\tnext\u2400"
    assert not any(ord(c) < 0x20 and c not in "\n\t" or 0x7f <= ord(c) < 0xa0 for c in out)
    assert terminal_safe("plain text, 中文\n") == "plain text, 中文\n"


def test_the_status_bar_forgets_the_last_speed_when_another_model_serves():
    import asyncio

    from textual.app import App

    from rwkv_chat.app.widgets.status_bar import StatusBar

    class Bar(App):
        def compose(self):
            yield StatusBar()

    async def run():
        app = Bar()
        async with app.run_test():
            bar = app.query_one(StatusBar)
            qwen = {"model": {"loaded": True, "path": "/m/qwen", "strategy": "cpu fp32"}}
            bar.set_status(qwen)
            bar.set_speed(36.5)
            bar.set_status(qwen)                                 # the same model: its speed stays
            assert bar.speed == "36.5 tok/s"
            bar.set_status({"model": {"loaded": True, "path": "/m/rwkv.pth", "strategy": "cpu fp32"}})
            assert bar.speed == ""

    asyncio.run(run())
