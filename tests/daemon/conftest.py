"""Fixtures for daemon tests: homes in tmp dirs, real daemon processes, CLI runs."""

from __future__ import annotations

import itertools
import os
import subprocess
import socket
import sys
import time
from functools import lru_cache
from pathlib import Path

import msgspec
import pytest
import zmq

from rwkv_chat.daemon import protocol as p
from rwkv_chat.daemon.config import Config, save_config
from rwkv_chat.daemon.launcher import _secure
from rwkv_chat.daemon.paths import ensure_dirs, home_paths
from rwkv_chat.daemon.protocol import codec

from ..conftest import link_kernel_cache

CLI = [sys.executable, "-m", "rwkv_chat.app.cli"]


def make_home(root: Path, **daemon) -> Path:
    """A fresh home with a config whose [daemon] section takes ``daemon`` overrides (fast heartbeats)."""
    home = Path(root)
    paths = ensure_dirs(home_paths(home))
    link_kernel_cache(home)
    cfg = Config()
    cfg.daemon.heartbeat = 0.25
    cfg.daemon.client_timeout = 2.0
    for k, v in daemon.items():
        setattr(cfg.daemon, k, v)
    save_config(cfg, paths.config_file)
    return home


def env_for(home: Path) -> dict:
    env = dict(os.environ)
    env["RWKV_CHAT_HOME"] = str(home)
    return env


def cli(home: Path, *args, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``rwkv-chat ARGS`` with ``RWKV_CHAT_HOME=home``; returns the completed process (text)."""
    r = subprocess.run([*CLI, *map(str, args)], env=env_for(home), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"rwkv-chat {args} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def start_daemon(home: Path, model: Path | None) -> None:
    """``rwkv-chat daemon start [--model MODEL]``: with a model, it returns once the model is loaded."""
    args = ["daemon", "start"] + (["--model", model] if model else [])
    r = cli(home, *args)
    if model:
        assert r.stderr.strip().splitlines()[-1].startswith(f"loaded {model}"), r.stderr


def stop_daemon(home: Path) -> None:
    cli(home, "daemon", "stop", check=False, timeout=30)


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


#: greedy sampling of ten tokens: replies the engine's ``greedy`` reproduces
GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0, "max_tokens": 10}


def done(gen):
    """The last event of a streamed reply (its ``Done``)."""
    return list(gen)[-1]


def module_daemon(name: str, version: str):
    """A module-scoped fixture: a running daemon (``daemon start --model`` of the tiny model of ``version``) in a
    fresh home under a temporary folder named ``name``; yields the home, stops the daemon at the end."""
    @pytest.fixture(scope="module")
    def home(tmp_path_factory, model_path):
        h = make_home(tmp_path_factory.mktemp(name))
        start_daemon(h, model_path(version))
        yield h
        stop_daemon(h)

    return home


#: the tiny random Qwen2 of the daemon tests (with the real 151k-token Qwen tokenizer)
TINY_QWEN = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True)


def write_qwen_folder(folder: Path, shared_dir: Path, dtype=None, **config) -> Path:
    """A Hugging Face folder of a random Qwen2 (seed 0; ``TINY_QWEN`` updated with ``config``; weights cast to
    ``dtype`` where given) with the real Qwen tokenizer files from ``shared_dir``; returns ``folder``."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**TINY_QWEN, **config}))
    (model if dtype is None else model.to(dtype)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_dir / "tokenizers" / "qwen" / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def daemon_home(tmp_path_factory, model_path):
    """A running daemon (tiny v5.2 model) shared by one test module; stopped at the end."""
    home = make_home(tmp_path_factory.mktemp("home"))
    start_daemon(home, model_path("5.2"))
    from rwkv_chat.daemon.client import Client

    with Client(home_paths(home), autostart=False) as c:   # `daemon start --model` returned once it was loaded
        assert c.status()["model"]["loaded"]
    yield home
    stop_daemon(home)


@pytest.fixture()
def client(daemon_home):
    from rwkv_chat.daemon.client import Client

    c = Client(home_paths(daemon_home), autostart=False, heartbeat=0.25)
    c.connect()
    yield c
    c.close()


@lru_cache(maxsize=2)
def _reference(model_file: str):
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.text.tokenizers import load_tokenizer

    model = RWKV(model=model_file, strategy="cpu fp32", verbose=False)
    return model, load_tokenizer(vocab_size=model.vocab_size)


def greedy(model_file: Path, prompt: str, n: int) -> str:
    """The engine's own greedy continuation (argmax, no penalties) of ``prompt``, bytes vocabulary."""
    model, tok = _reference(str(model_file))
    logits, state = model.forward(tok.encode(prompt), None)
    out = []
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits, state = model.forward([t], state)
    return tok.decode(out)


_ids = itertools.count()


class Raw:
    """A bare DEALER connection to the daemon that signs what it is given: a struct, or any msgpack body."""

    def __init__(self, home):
        info = p.read_connection_file(home_paths(home).connection_file)
        self.key = info.key_bytes
        self.codec = p.Codec(self.key)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        _secure(self.sock, info)              # the transport of a client holding the connection file (CURVE)
        self.sock.connect(info.request)

    def frames(self, body, ts: float | None = None) -> list[bytes]:
        header = msgspec.msgpack.encode(codec.Header(codec.PROTOCOL_VERSION, f"{next(_ids):032x}",
                                                     time.time() if ts is None else ts))
        body = body if isinstance(body, bytes) else msgspec.msgpack.encode(body)
        return [codec._mac(self.key, [header, body]), header, body]

    def send(self, body, ts: float | None = None) -> None:
        self.sock.send_multipart(self.frames(body, ts))

    def reply(self, timeout: float = 10.0):
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.codec.parse(self.sock.recv_multipart())[0]

    def request(self, msg, timeout: float = 10.0):
        self.send(msg)
        return self.reply(timeout)

    def close(self) -> None:
        self.sock.close(linger=0)


def free_port_pair() -> int:
    """A free loopback TCP port P whose neighbour P + 1 is free too (the daemon binds requests on P, events
    on P + 1)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise AssertionError("no two consecutive free ports")
