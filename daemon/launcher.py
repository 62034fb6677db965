"""Finding, pinging and starting the daemon of a home (used by the client library and the CLI), and the
home's daemon lock (one daemon per home)."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import zmq

from rwkv_chat.daemon.paths import Paths, child_env, ensure_dirs

from . import protocol as p
from .errors import DaemonUnavailable
from .protocol import messages as m


class AlreadyRunning(RuntimeError):
    """Another daemon holds this home's lock; ``pid`` is its process id (0 if unknown)."""

    def __init__(self, pid: int, lock: Path):
        super().__init__(f"a daemon is already running for this home (pid {pid or '?'}, lock {lock})")
        self.pid = pid


def acquire_lock(path: Path):
    """Take the home's daemon lock (fcntl, non-blocking); returns the open file. Raises AlreadyRunning."""
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        text = f.read().strip()
        f.close()
        raise AlreadyRunning(int(text) if text.isdigit() else 0, path) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def lock_held(path: Path) -> bool:
    """Whether some process holds the daemon lock of ``path`` (a live daemon)."""
    if not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return False


def run_foreground(paths: Paths, config, model: str | None = None, strategy: str | None = None) -> int:
    """Run the daemon of ``paths`` in this process until it stops (``config``: its ``Config``; ``model`` and
    ``strategy`` override the config's). Returns the exit status; raises AlreadyRunning."""
    from .server import serve

    return serve(paths, config, model, strategy)


def spawn_daemon(paths: Paths, model: str | None = None, strategy: str | None = None,
                 timeout: float = 60.0) -> p.ConnectionInfo:
    """Start a background daemon for ``paths`` (if none runs) and return its connection info once it
    answers a ping. Raises DaemonUnavailable if it exits or stays silent for ``timeout`` seconds."""
    ensure_dirs(paths)
    proc = None
    if not lock_held(paths.lock_file):
        cmd = [sys.executable, "-m", "rwkv_chat.daemon"]
        if model:
            cmd += ["--model", str(model)]
        if strategy:
            cmd += ["--strategy", strategy]
        log = open(paths.log_file, "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True, env=child_env(paths))
        log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = ping(paths, timeout=0.5)
        if info is not None:
            return info
        if proc is not None and proc.poll() not in (None, 3):
            tail = paths.log_file.read_text(errors="replace")[-2000:] if paths.log_file.exists() else ""
            raise DaemonUnavailable(f"the daemon exited with code {proc.returncode}; log {paths.log_file}:\n{tail}")
        time.sleep(0.05)
    raise DaemonUnavailable(f"no daemon answered within {timeout:.0f} s (log: {paths.log_file})")


def ping(paths: Paths, timeout: float = 1.0) -> p.ConnectionInfo | None:
    """The connection info of a daemon that answers a ping within ``timeout`` s, else None."""
    try:
        info = p.read_connection_file(paths.connection_file)
    except (FileNotFoundError, p.ProtocolError):
        return None
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        _secure(s, info)
        s.connect(info.request)
        codec = p.Codec(info.key_bytes)
        s.send_multipart(codec.build(m.Ping(client_id="")))
        if s.poll(int(timeout * 1000)):
            reply, _ = codec.parse(s.recv_multipart())
            return info if isinstance(reply, m.Pong) else None
        return None
    except (p.ProtocolError, zmq.ZMQError):
        return None
    finally:
        s.close()


def _secure(sock, info: p.ConnectionInfo) -> None:
    if info.server_public_key:
        pub, sec = zmq.curve_keypair()
        sock.curve_serverkey = info.server_public_key.encode()
        sock.curve_publickey, sock.curve_secretkey = pub, sec
