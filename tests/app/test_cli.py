"""The ``rwkv-chat`` command line as a user meets it: help, refusals of mistakes in words (no traceback), the
load progress, a failing ``chat`` that leaves no daemon behind, ``bench`` on a CPU, the runtime-dir warning."""

from __future__ import annotations

import argparse
import json
import os
import pty
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_chat.app import cli
from rwkv_chat.daemon.launcher import lock_held
from rwkv_chat.daemon.paths import home_paths

from .conftest import make_home

CLI = [sys.executable, "-m", "rwkv_chat.app.cli"]


def run(home: Path | None, *args, env: dict | None = None, timeout: float = 120, **kw):
    env = dict(os.environ if env is None else env)
    if home is not None:
        env["RWKV_CHAT_HOME"] = str(home)
    return subprocess.run([*CLI, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout, **kw)


def _parsers(p: argparse.ArgumentParser, path=("rwkv-chat",)):
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in ("bench", "convert", "plan"):   # their own parsers (rwkv_chat.app.*), below
                    yield from _parsers(sub, path + (name,))


def _undocumented(p: argparse.ArgumentParser, path) -> list[str]:
    bad = []
    if not (p.description or "").strip():
        bad.append(f"{' '.join(path)}: no description")
    if "examples:" not in (p.epilog or ""):
        bad.append(f"{' '.join(path)}: no example")
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            bad += [f"{' '.join(path)} {c.dest}: no summary" for c in a._choices_actions if not c.help]
        elif not a.help or a.help == argparse.SUPPRESS:
            bad.append(f"{' '.join(path)} {a.option_strings or a.dest}: no help")
    return bad


def test_every_command_and_flag_says_what_it_does_with_an_example(capsys):
    bad = [msg for path, p in _parsers(cli.parser()) for msg in _undocumented(p, path)]
    from rwkv_chat.app import bench, convert, plan

    bad += _undocumented(convert.parser(), ("rwkv-chat", "convert"))
    bad += _undocumented(plan.parser(), ("rwkv-chat", "plan"))

    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--threads" in out
    assert not bad, "\n".join(bad)
    top = run(None, "--help").stdout
    assert "With no command, rwkv-chat opens the terminal UI" in " ".join(top.split())
    from importlib.metadata import version

    v = run(None, "--version")
    assert v.returncode == 0 and v.stdout.strip() == f"rwkv-chat {version('rwkv-chat')}"
    load = " ".join(run(None, "load", "--help").stdout.split())
    assert "DEVICE DTYPE" in load and "->" in load and "*N+" in load and "fp16i8" in load


def test_the_conversations_summary_names_each_of_its_actions():
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    summary = next(c.help for c in sub._choices_actions if c.dest == "conversations")
    actions = next(a for a in sub.choices["conversations"]._actions
                   if isinstance(a, argparse._SubParsersAction)).choices
    missing = [n for n in actions if {"rm": "remove"}.get(n, n) not in summary]
    assert not missing, (summary, missing)


def test_daemon_start_with_no_such_model_is_refused_as_its_help_says(tmp_path):
    helped = " ".join(run(None, "daemon", "start", "--help").stdout.split())
    assert "(exit 2, nothing started)" in helped and "Hugging Face Qwen2/Qwen3 folder" in helped
    home = tmp_path / "h"
    r = run(home, "daemon", "start", "--model", tmp_path / "none.pth", "--strategy", "cpu fp32")
    assert r.returncode == 2 and "no model file or local model named" in r.stderr, r
    assert not lock_held(home_paths(home).lock_file)                     # nothing started


def test_mistakes_are_refused_in_words(tmp_path, home_env):
    home = make_home(tmp_path, None).home
    for args in (("chat", ""), ("chat", "  \n"), ("complete", "")):
        r = run(home, *args)
        assert r.returncode == 2 and "empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r
    assert not lock_held(home_paths(home).lock_file)             # nothing was sent: no daemon started
    r = run(home, "chat", "hi", "--temperature", "-1")
    assert r.returncode == 2 and "--temperature: must be 0 or more, got -1" in r.stderr
    r = run(home, "complete", "x", "--top-p", "2")
    assert "--top-p: must be between 0 and 1, got 2" in r.stderr and "Traceback" not in r.stderr
    for bad in ("0", "-1"):
        r = run(home, "complete", "x", "--repetition-penalty", bad)
        assert r.returncode == 2 and f"--repetition-penalty: must be more than 0, got {bad}" in r.stderr
    for flag in ("--top-k", "--max-tokens"):                        # beyond the protocol's 64-bit integers
        r = run(home, "chat", "hi", flag, str(2**64))
        assert r.returncode == 2 and f"{flag}: must be between" in r.stderr and "Traceback" not in r.stderr
    r = run(home, "complete", "x", "--max-tokens", "0")             # below: no 64-bit limit in the words
    assert r.returncode == 2 and "--max-tokens: must be 1 or more, got 0" in r.stderr

    from rwkv_chat.app.widgets.sampling_panel import parse_field
    from rwkv_chat.models.text.sampling import SamplerArgs, SamplingError

    with pytest.raises(SamplingError, match=r"temperature must be 0 or more, got -1"):
        SamplerArgs(temperature=-1.0)
    with pytest.raises(ValueError, match=r"^Top p must be between 0 and 1$"):
        parse_field("top_p", "1.5")


def test_a_failing_chat_leaves_no_daemon_and_no_conversation(tmp_path, home_env):
    paths = make_home(tmp_path, None)             # no model in the config
    home = paths.home
    r = run(home, "chat", "hello")
    assert r.returncode == 1 and "no model is loaded" in r.stderr and "NoModel" not in r.stderr
    assert "conversation:" not in r.stderr and "Traceback" not in r.stderr
    assert not lock_held(paths.lock_file)                        # the daemon it started is gone again
    with sqlite3.connect(paths.database) as db:
        assert db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 0


def test_a_chat_after_the_configured_model_failed_to_load_says_why(tmp_path, home_env):
    """The config names a model file that is gone: the chat's refusal names the failed load, not the config
    key that is set already."""
    paths = make_home(tmp_path, tmp_path / "gone.pth")
    try:
        r = run(paths.home, "chat", "hello")
        err = r.stderr.strip()
        assert r.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, r
        assert "gone.pth" in err and "failed" in err and "set [model] path" not in err, err
    finally:
        run(paths.home, "daemon", "stop")


def test_daemon_start_follows_the_configured_models_load(tmp_path, home_env, model_path):
    """No --model: the daemon loads the config's model at start, and ``daemon start`` follows that load as it does
    a model named, so a strategy that cannot load it exits 1 with the reason instead of 0."""
    paths = make_home(tmp_path, model_path("5.2"))
    try:
        r = run(paths.home, "daemon", "start", "--strategy", "cuda fp16i3")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r
        assert "the model did not load" in r.stderr and "'i3'" in r.stderr, r.stderr
        run(paths.home, "daemon", "stop")
        r = run(paths.home, "daemon", "start", "--strategy", "cpu fp32i8")
        assert r.returncode == 0 and "loaded" in r.stderr.splitlines()[-1] and "'cpu fp32i8'" in r.stderr, r
    finally:
        run(paths.home, "daemon", "stop")


def test_ctrl_c_of_a_queued_chat_says_nothing_was_sent(tmp_path, home_env, model_path):
    """One generation at a time: a chat queued behind a completion and interrupted there says that nothing went
    to the conversation (none is made), not that a reply was kept."""
    import signal

    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.config import load_config, save_config

    paths = make_home(tmp_path, model_path("5.2"))
    cfg = load_config(paths.config_file)
    cfg.daemon.max_active = 1
    save_config(cfg, paths.config_file)
    env = dict(os.environ, RWKV_CHAT_HOME=str(paths.home))
    try:
        assert run(paths.home, "daemon", "start").returncode == 0
        long = subprocess.Popen([*CLI, "complete", "Forever", "--max-tokens", "100000"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert long.stdout.read(1)                                   # it generates
        chat = subprocess.Popen([*CLI, "chat", "--conversation", "qc1", "Hi"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        line = chat.stderr.readline().decode()
        assert "queued" in line, line
        chat.send_signal(signal.SIGINT)
        _, err = chat.communicate(timeout=30)
        assert chat.returncode == 130 and "stopped while queued: nothing was sent" in err.decode(), err
        with Client(paths, autostart=False) as c:
            assert not c.find("qc1")
        long.send_signal(signal.SIGINT)
        long.communicate(timeout=30)
    finally:
        run(paths.home, "daemon", "stop")


def test_a_broken_config_is_one_line_without_earlier_log_lines(tmp_path, home_env):
    """A wrong value in config.toml: ``daemon start`` and a ``chat`` that would start one say so in one line
    naming the file, not with the daemon log's tail (earlier runs' lines included)."""
    paths = make_home(tmp_path, None)
    paths.config_file.write_text('[sampling]\ntemperature = "hot"\n')
    paths.log_file.write_text("2026-01-01 00:00:00,000 WARNING rwkv_chat.daemon: an earlier run's problem\n")
    for args in (("daemon", "start"), ("chat", "hello")):
        r = run(paths.home, *args)
        err = r.stderr.strip()
        assert r.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, r
        assert str(paths.config_file) in err and "temperature" in err and "earlier run" not in err, err
    assert not lock_held(paths.lock_file)


def test_load_shows_one_progress_bar(daemon):
    model = str(daemon.model)
    r = run(daemon.paths.home, "load", model, "--strategy", "cpu fp32")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 2 and lines[-1].startswith("loaded"), r.stderr
    # on a terminal: one bar redrawn in place
    main, other = pty.openpty()
    env = dict(os.environ, RWKV_CHAT_HOME=str(daemon.paths.home))
    p = subprocess.run([*CLI, "load", model, "--strategy", "cpu fp32"], env=env, stdout=subprocess.PIPE,
                       stderr=other, timeout=120)
    os.close(other)
    text = _read_all(main).decode().replace("\x1b[K", "")
    assert p.returncode == 0 and "[####" in text and "layers" in text
    assert [ln.rsplit("\r", 1)[-1] for ln in text.strip().splitlines()][-1].startswith("loaded")
    assert text.count("\n") == 1                                 # every bar on the same line


def test_a_converted_file_loads_in_its_own_format_when_no_strategy_is_given(daemon, tmp_path, home_env):
    """`rwkv-chat load CONVERTED` with no --strategy: the config's strategy (cpu fp32) in the file's format; a
    strategy the user names is still loaded as given (here refused, in one line naming the fix). `convert` does not
    replace an existing file without --force; `plan CONVERTED` plans the strategy the file was made for; a default
    saved by `load --default` applies to the next load without a restart."""
    out = tmp_path / "m-i4.safetensors"
    r = run(daemon.paths.home, "convert", str(daemon.model), "--strategy", "cpu fp32i4", "-o", str(out))
    i8 = tmp_path / "m-i8.safetensors"
    assert run(daemon.paths.home, "convert", str(daemon.model), "--strategy", "cpu fp32i8", "-o", str(i8)).returncode == 0
    assert r.returncode == 0, r.stderr
    before = out.stat().st_mtime_ns
    r = run(daemon.paths.home, "convert", str(daemon.model), "--strategy", "cpu fp32i8", "-o", str(out))
    assert r.returncode == 2 and r.stderr.strip() == f"rwkv-chat convert: {out} exists; give --force to replace it"
    assert out.stat().st_mtime_ns == before
    r = run(daemon.paths.home, "plan", str(out))
    assert r.returncode == 0 and "Strategy: cpu fp32i4 " in r.stdout and " i4 " in r.stdout, (r.stdout, r.stderr)
    try:
        r = run(daemon.paths.home, "load", str(out))
        assert r.returncode == 0 and r.stderr.strip().splitlines()[-1].startswith(f"loaded {out} with strategy "
                                                                                  "'cpu fp32i4'"), r.stderr
        r = run(daemon.paths.home, "load", str(out), "--strategy", "cpu fp32")
        err = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 1 and "i4" in err and "Traceback" not in r.stderr, r.stderr
    finally:
        run(daemon.paths.home, "load", str(daemon.model), "--strategy", "cpu fp32")
    # a daemon started with it (no --strategy): the same default, from the daemon's own config
    home = make_home(tmp_path / "home", None)
    try:
        r = run(home.home, "daemon", "start", "--model", str(i8))
        assert r.returncode == 0 and "with strategy 'cpu fp32i8'" in r.stderr, r.stderr
        # made the default: the file, and the config's strategy as it was (fitted to each checkpoint at load)
        r = run(home.home, "load", str(i8), "--default")
        assert r.returncode == 0 and "with strategy 'cpu fp32i8'" in r.stderr, r.stderr
        saved = home.config_file.read_text()
        assert str(i8) in saved and 'strategy = "cpu fp32"' in saved, saved
        r = run(home.home, "load", str(daemon.model), "--strategy", "cpu bf16", "--default")
        assert r.returncode == 0, r.stderr
        r = run(home.home, "load", str(i8))          # the new default, fitted to the file: no restart needed
        assert r.returncode == 0 and "with strategy 'cpu bf16i8'" in r.stderr, r.stderr
    finally:
        run(home.home, "daemon", "stop")


def _read_all(fd: int) -> bytes:
    """Everything a pseudo-terminal's main side gives until its other side is closed (then closes it)."""
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    return out


def _on_terminal(home: Path, *args) -> tuple[int, bytes, str]:
    """Run the CLI with stdout on a pseudo-terminal (stderr piped): exit code, the terminal's bytes, stderr."""
    main, other = pty.openpty()
    env = dict(os.environ, RWKV_CHAT_HOME=str(home))
    p = subprocess.Popen([*CLI, *map(str, args)], env=env, stdout=other, stderr=subprocess.PIPE)
    os.close(other)
    out = _read_all(main)
    err = p.stderr.read().decode()
    return p.wait(timeout=120), out, err


def test_a_completion_on_a_terminal_ends_its_line(daemon):
    home = daemon.paths.home
    piped = run(home, "complete", "The capital of France is", "--max-tokens", 8, "--temperature", 0)
    assert piped.returncode == 0 and piped.stdout and not piped.stdout.endswith("\n"), piped   # piped: the text only
    rc, out, err = _on_terminal(home, "complete", "The capital of France is", "--max-tokens", 8, "--temperature", 0)
    text = out.decode().replace("\r\n", "\n")
    assert rc == 0 and text == piped.stdout + "\n", (text, err)      # the summary and the prompt: a line of their own


def test_an_empty_conversation_list_says_so(fresh_daemon):
    home = fresh_daemon.paths.home
    assert fresh_daemon.client.conversations() == []
    r = run(home, "conversations", "list")
    assert r.returncode == 0 and r.stdout == "" and "no conversations yet" in r.stderr, r      # stdout stays a listing
    r = run(home, "conversations", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == [] and r.stderr == "", r


def test_conversations_list_counts_exchanges_as_the_sidebar(daemon):
    run(daemon.paths.home, "chat", "--conversation", "count1", "Hi", "--max-tokens", 4)
    listing = run(daemon.paths.home, "conversations", "list").stdout
    assert "count1" in listing and "\t1 exchange\t" in listing
    from rwkv_chat.app.texts import exchanges

    info = next(c for c in daemon.client.conversations() if c.id == "count1")
    assert info.turns == 2 and exchanges(info) == 1


def test_bench_on_cpu(model_path, capsys):
    """A CPU run: its threads said (one by default, for both sides), nothing that only a GPU run measures."""
    assert cli.main(["bench", "--model", str(model_path("5.2")), "--strategy", "cpu fp32", "--tokens", "4",
                     "--prompt-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "CPU (1 thread)" in out and "| backend |" in out
    for gpu_only in ("cublas", "copy bandwidth", "% of copy"):
        assert gpu_only not in out

def test_bench_sparse_ffn_off_the_fused_cuda_backend_is_one_line(model_path, capsys):
    """``--ffn sparse`` measures the row kernel of the fused CUDA backend: elsewhere one line and exit 2."""
    assert cli.main(["bench", "--model", str(model_path("7")), "--strategy", "cpu fp32", "--ffn", "sparse",
                     "--tokens", "2", "--prompt-len", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("rwkv-chat bench: --ffn sparse: needs an RWKV-7 model on the fused CUDA backend"), err


def test_bench_fold_norms_off_the_fused_cuda_backend_is_one_line(model_path, capsys):
    """``--fold-norms`` measures a decode path of the fused CUDA backend: elsewhere one line and exit 2."""
    assert cli.main(["bench", "--model", str(model_path("7")), "--strategy", "cpu fp32", "--fold-norms",
                     "--tokens", "2", "--prompt-len", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("rwkv-chat bench: --fold-norms: needs an RWKV-7 model on the fused CUDA backend"), err


def test_bench_fold_norms_flags_exclude_each_other_and_no_fold_is_one_line_off_cuda(model_path, capsys):
    """``--fold-norms`` with ``--no-fold-norms`` is a usage error (exit 2); ``--no-fold-norms`` alone measures the
    fused CUDA backend's unfolded step: elsewhere one line and exit 2."""
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--model", str(model_path("7")), "--strategy", "cpu fp32", "--fold-norms",
                  "--no-fold-norms", "--tokens", "2", "--prompt-len", "0"])
    assert e.value.code == 2
    assert "--fold-norms and --no-fold-norms exclude each other" in capsys.readouterr().err
    assert cli.main(["bench", "--model", str(model_path("7")), "--strategy", "cpu fp32", "--no-fold-norms",
                     "--tokens", "2", "--prompt-len", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("rwkv-chat bench: --no-fold-norms: needs an RWKV-7 model on the fused CUDA backend"), err


def test_plan_suggest_into_a_closed_pipe_exits_quietly(model_path):
    """``rwkv-chat plan M --suggest | head -0``: the reader gone before the suggestions are written (unbuffered
    output writes them at once) is no error."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([*CLI, "plan", str(model_path("7")), "--suggest"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(60) == 0 and err == b"", err


def test_bench_of_a_qwen2_folder_given_to_model(tmp_path, shared_dir, capsys):
    """A folder given to ``--model`` is a Hugging Face checkpoint: measured as ``--family qwen2`` would."""
    from ..daemon.conftest import write_qwen_folder

    folder = write_qwen_folder(tmp_path / "qwen", shared_dir)
    assert cli.main(["bench", "--model", str(folder), "--no-peer", "--tokens", "2", "--prompt-len", "4"]) == 0
    out = capsys.readouterr().out
    assert "--family qwen2" in out and "decode b=1" in out and "prefill 4" in out


@pytest.mark.parametrize("args, words", [
    (["--model", "MISSING.pth"], "not found"),
    (["--shape", "0.1B", "--strategy", "cpu fp32i3"], "'i3'"),
    (["--family", "qwen2", "--model", "MISSING"], "not a folder"),
    (["--family", "qwen2", "--shape", "tiny", "--strategy", "cuda:0 bf16 -> cpu"], "strategy"),
])
def test_bench_mistakes_are_one_line(tmp_path, args, words, capsys):
    args = [str(tmp_path / a) if a.startswith("MISSING") else a for a in args]
    assert cli.main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("rwkv-chat bench: ") and words in err, err


@pytest.mark.parametrize("args, words", [
    (["--tokens", "0"], "--tokens must be 1 or more, got 0"),
    (["--batch", "1", "0"], "--batch sizes must be 1 or more, got 1 0"),
    (["--prompt-len", "-5"], "--prompt-len must be 0 (skip the prefill) or more, got -5"),
    (["--md", "NODIR/x.md"], "does not exist"),
    (["--json", "NODIR/x.json"], "does not exist"),
    (["--family", "qwen2", "--shape", "tiny", "--tokens", "-1"], "--tokens must be 1 or more"),
])
def test_bench_run_lengths_and_output_files_are_checked_first(tmp_path, model_path, args, words, capsys):
    """Before anything is loaded or measured: an exit of 2 with the usage and the reason, no traceback."""
    args = [str(tmp_path / a) if a.startswith("NODIR") else a for a in args]
    src = [] if "--family" in args else ["--model", str(model_path)]
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *src, *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err, err


def test_bench_without_the_reference_package(monkeypatch, capsys):
    """One line, before anything is measured (the package is hidden: ``import rwkv`` fails)."""
    monkeypatch.setitem(sys.modules, "rwkv", None)
    assert cli.main(["bench", "--shape", "0.1B", "--compare-rwkv-pip"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install rwkv" in err


def test_a_mistyped_flag_shows_the_usage_of_its_command(tmp_path):
    r = run(tmp_path / "home", "load", "x.pth", "--stratgy", "cpu fp32")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[0].startswith("usage: rwkv-chat load ")
    assert "rwkv-chat load: error: unrecognized arguments: --stratgy cpu fp32" in r.stderr
    r = run(tmp_path / "home", "conversations", "list", "--bogus")
    assert "usage: rwkv-chat conversations list" in r.stderr and "--bogus" in r.stderr


def test_a_home_that_cannot_be_made_is_one_line(tmp_path):
    """RWKV_CHAT_HOME naming a file (or a place that cannot hold folders): one line naming it, exit 1."""
    f = tmp_path / "a-file"
    f.write_text("x")
    for args in (("doctor",), ("conversations", "list")):
        r = run(f, *args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r
        assert r.stderr.strip().splitlines() == [f"rwkv-chat: cannot make {f}/config (RWKV_CHAT_HOME={f}): "
                                                 "Not a directory"], r.stderr


def test_doctor_on_a_fresh_home_has_no_empty_section(tmp_path):
    r = run(tmp_path / "fresh", "doctor")
    assert r.returncode == 0 and "running: False" in r.stdout, r
    sections = r.stdout.split("\n[")
    assert all(len(s.strip().splitlines()) > 1 for s in sections), r.stdout     # a heading and what it holds
    assert "[kernel_builds]\n  none" in r.stdout


def test_no_runtime_dir_warning(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "RWKV_CHAT_HOME")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path / "c"), XDG_DATA_HOME=str(tmp_path / "d"),
               XDG_CACHE_HOME=str(tmp_path / "k"))
    r = run(None, "daemon", "status", env=env)
    assert "XDG_RUNTIME_DIR" not in r.stderr and "Warning" not in r.stderr
