"""``rwkv-chat pull``, ``models`` and ``load NAME`` against a Hub-layout server on 127.0.0.1 (huggingface_hub
reaches it through HF_ENDPOINT), with a real daemon for the load and the chat."""

from __future__ import annotations

import filecmp
import hashlib
import os
from pathlib import Path

from rwkv_chat.daemon.headers import describe

from ..daemon.conftest import greedy
from .conftest import BIG_REPO, QWEN_REPO, TINY_REPO

SEVEN, SIX = "tiny-rwkv-7v0-834K.pth", "tiny-rwkv-6v0-1m.pth"
GREEDY = ["--temperature", 0, "--alpha-frequency", 0, "--alpha-presence", 0]


def disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def test_without_a_file_the_weight_files_are_listed_and_nothing_is_pulled(home, models_dir):
    r = home.run("pull", TINY_REPO, check=False)
    assert r.returncode == 1
    listed = dict(line.split("\t") for line in r.stdout.splitlines())
    assert sorted(listed) == [SIX, SEVEN]                                 # README.md is no weight file
    assert listed[SEVEN] == f"{(models_dir / SEVEN).stat().st_size / 2**20:.1f} MiB"
    assert len(r.stderr.strip().splitlines()) == 1 and f"rwkv-chat pull {TINY_REPO} FILE" in r.stderr
    assert home.models() == []


def test_pull_then_load_by_name_and_chat_against_a_real_daemon(home, hub, model_path):
    r = home.run("pull", TINY_REPO, SEVEN)
    assert "as tiny-rwkv-7v0-834k" in r.stderr and "rwkv-chat load tiny-rwkv-7v0-834k" in r.stderr
    [entry] = home.models()
    facts = describe(model_path("7"))
    assert (entry["name"], entry["family"], entry["version"], entry["format"]) == \
        ("tiny-rwkv-7v0-834k", "rwkv", "7", "pth")
    assert entry["params"] == facts.params and entry["repo"] == TINY_REPO and entry["file"] == SEVEN
    assert entry["commit"] == hub.repos[TINY_REPO].sha and entry["default_strategy"] == "cpu fp32"
    assert Path(entry["path"]).is_relative_to(home.cache) and filecmp.cmp(entry["path"], model_path("7"), shallow=False)
    table = home.run("models").stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "FAMILY", "VERSION/SIZE"]
    assert table[1].split()[:4] == ["tiny-rwkv-7v0-834k", "rwkv", "v7", facts.size]
    show = home.run("models", "show", "tiny-rwkv-7v0-834k").stdout
    assert f"shape: {facts.n_layer} layers x {facts.n_embd}, vocabulary 256" in show

    gets = len(hub.gets(SEVEN))
    home.run("pull", TINY_REPO, SEVEN)                                     # already in the cache: no download
    assert len(hub.gets(SEVEN)) == gets and len(home.models()) == 1

    r = home.run("daemon", "start", "--model", "tiny-rwkv-7v0-834k")       # a name, resolved by the daemon
    try:
        assert r.stderr.strip().splitlines()[-1].startswith(f"loaded {entry['path']}")
        r = home.run("load", "tiny-rwkv-7v0-834k")
        assert r.stderr.strip().splitlines()[-1].startswith(f"loaded tiny-rwkv-7v0-834k with strategy 'cpu fp32'")
        want = greedy(model_path("7"), "The capital of", 16)
        assert home.run("complete", "The capital of", "--max-tokens", 16, *GREEDY).stdout == want
        chat = home.run("chat", "Hello", "--max-tokens", 8, *GREEDY)
        assert chat.stdout.strip() and "conversation:" in chat.stderr
        ps = home.run("ps").stdout
        assert f"model: tiny-rwkv-7v0-834k ({entry['path']})" in ps and "state: loaded" in ps
        assert "conversations in memory: 1" in ps
        assert any(line.startswith("backend: ") and len(line) > len("backend: ") for line in ps.splitlines()), ps
        home.run("unload")
        ps = home.run("ps").stdout
        assert "state: unloaded (request)" in ps and "conversations in memory: 0" in ps
        r = home.run("complete", "The capital of", "--max-tokens", 16, *GREEDY)   # loads it again
        assert r.stdout == want and "loading the model again (it was unloaded)" in r.stderr   # by request: not "idle"
        assert "queued, position 1 of 1 (waiting for the model)" in r.stderr, r.stderr        # not "0 generations"
    finally:
        home.run("daemon", "stop", check=False)


def test_an_interrupted_download_resumes(home, hub):
    [(name, path)] = hub.repos[BIG_REPO].files.items()
    hub.drop_once[name] = 12 << 20                     # the connection drops after 12 MiB of ~35
    r = home.run("pull", BIG_REPO)                     # one weight file: no need to name it
    assert hub.gets(name) == ["", f"bytes={10 << 20}-"]   # one 10 MiB chunk kept, the rest asked for
    assert "as rwkv7-wide-vocab" in r.stderr
    [entry] = home.models()
    data = Path(entry["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert entry["version"] == "7" and entry["format"] == "safetensors" and entry["bytes"] == len(data)


def test_a_corrupted_download_is_detected_and_removed(home, hub):
    hub.corrupt.add(SIX)
    try:
        r = home.run("pull", TINY_REPO, SIX, check=False)
    finally:
        hub.corrupt.discard(SIX)
    assert r.returncode == 1 and "corrupt" in r.stderr and "Traceback" not in r.stderr
    sha = hub.repos[TINY_REPO].meta(SIX)["lfs"]["oid"]
    assert not list(home.cache.rglob(sha)) and home.models() == []
    home.run("pull", TINY_REPO, SIX)                   # served right: it goes through
    assert [e["name"] for e in home.models()] == ["tiny-rwkv-6v0-1m"]


def test_rm_frees_the_disk_once_no_local_model_uses_the_files(home, hub):
    home.run("pull", TINY_REPO, SEVEN)
    home.run("pull", TINY_REPO, SEVEN, "--name", "seven")                  # a second name for the same file
    home.run("pull", TINY_REPO, SIX)
    size7, size6 = (hub.repos[TINY_REPO].meta(f)["size"] for f in (SEVEN, SIX))
    before = disk_usage(home.cache)
    assert before >= size7 + size6
    assert "freed 0 B" in home.run("models", "rm", "tiny-rwkv-7v0-834k").stderr   # "seven" still uses it
    assert disk_usage(home.cache) == before
    home.run("models", "rm", "seven")
    assert disk_usage(home.cache) == before - size7
    home.run("models", "rm", "tiny-rwkv-6v0-1m")
    assert not (home.cache / "models--BlinkDL--tiny-rwkv").exists() and home.models() == []
    r = home.run("models", "rm", "seven", check=False)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_a_repo_with_config_json_is_pulled_as_a_folder(home, hub):
    r = home.run("pull", QWEN_REPO)
    assert "as qwen2-tiny-instruct" in r.stderr
    [entry] = home.models()
    folder = Path(entry["path"])
    assert folder.is_dir() and entry["file"] == "" and entry["format"] == "hf" and entry["family"] == "qwen2"
    assert {p.name for p in folder.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json"}
    for f in folder.iterdir():
        assert filecmp.cmp(f, hub.repos[QWEN_REPO].files[f.name], shallow=False)
    assert "shape: 2 layers x 16, vocabulary 151,936" in home.run("models", "show", "qwen2-tiny-instruct").stdout


def test_offline_mode_serves_the_cache_and_names_what_is_missing(home, hub):
    home.run("pull", TINY_REPO, SEVEN)
    n = len(hub.log)
    home.run("pull", TINY_REPO, SEVEN, "--name", "offline-seven", HF_HUB_OFFLINE="1")
    assert len(hub.log) == n                                              # not a single request
    r = home.run("pull", TINY_REPO, SIX, check=False, HF_HUB_OFFLINE="1")
    assert r.returncode == 1 and "not in the local cache" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_user_mistakes_are_one_line_and_exit_2(home, hub):
    for args in (["pull", "no/such-repo", "x.pth"], ["pull", TINY_REPO, "nope.pth"], ["pull", "justaname"],
                 ["pull", TINY_REPO, SEVEN, "--revision", "v9"], ["pull", TINY_REPO, SEVEN, "--name", "Bad Name"],
                 ["load", "no-such-model"], ["models", "show", "nope"]):
        r = home.run(*args, check=False)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, (args, r.stderr)
    home.run("pull", TINY_REPO, SEVEN, "--revision", hub.repos[TINY_REPO].sha)      # a commit is a revision
    r = home.run("pull", TINY_REPO, SIX, "--name", "tiny-rwkv-7v0-834k", check=False)
    assert r.returncode == 2 and "--name" in r.stderr


def test_interactive_pick_on_a_terminal(home, hub):
    """On a terminal the files are numbered and one is picked by number (a pty gives the CLI a real TTY)."""
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rwkv_chat.app.cli", "pull", TINY_REPO], env=home.env(),
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    out = b""
    while SEVEN.encode() not in out:            # the numbered list (on stdout, the terminal)
        out += os.read(master, 4096)
    assert SIX.encode() in out
    os.write(master, b"2\n")                     # files are sorted: 1 = 6v0, 2 = 7v0
    assert proc.wait(60) == 0, proc.stderr.read()
    os.close(master)
    assert [e["file"] for e in home.models()] == [SEVEN]
