"""Finding, pinging and starting the daemon of a home (used by the client library and the CLI), and the
home's daemon lock (one daemon per home).

A home's daemon is in one of four states (:func:`daemon_state`): "running" (it answers a ping), "not
responding" (a process holds the lock and has published its connection file, but does not answer:
stopped with SIGSTOP, or hung), "starting" (a process holds the lock, no connection file yet: starting
up or shutting down) or "not running" (nobody holds the lock).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from rwkv_chat.daemon.paths import Paths, child_env, ensure_dirs

from . import protocol as p
from .errors import DaemonNotResponding, DaemonUnavailable
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


def lock_pid(path: Path) -> int:
    """The pid written in the lock file ``path`` by the daemon holding it (0 if unknown)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


@dataclass
class DaemonState:
    """What is known of a home's daemon: ``state`` ("running", "not responding", "starting", "not running",
    see the module docstring), its ``pid`` (0 = unknown) and, when running, its connection ``info``."""

    state: str
    pid: int = 0
    info: p.ConnectionInfo | None = None


def daemon_state(paths: Paths, timeout: float = 2.0) -> DaemonState:
    """The state of ``paths``' daemon; a daemon holding the lock gets ``timeout`` seconds to answer a ping."""
    if not lock_held(paths.lock_file):
        return DaemonState("not running")
    info = ping(paths, timeout)
    if info is not None:
        return DaemonState("running", info.pid, info)
    return _silent_state(paths)


def _silent_state(paths: Paths) -> DaemonState:
    """The state of a daemon that did not answer a ping: not running, starting or not responding."""
    if not lock_held(paths.lock_file):
        return DaemonState("not running")
    pid = lock_pid(paths.lock_file)
    try:
        info = p.read_connection_file(paths.connection_file)
    except (OSError, p.ProtocolError):
        return DaemonState("starting", pid)
    if pid and info.pid != pid:
        return DaemonState("starting", pid)        # a dead daemon's file, not yet replaced
    return DaemonState("not responding", info.pid)


def not_responding(state: DaemonState, paths: Paths) -> DaemonNotResponding:
    """The error for a daemon that holds the lock but does not answer."""
    pid = state.pid or "?"
    return DaemonNotResponding(state.pid, (
        f"the daemon (pid {pid}) holds the lock of {paths.runtime_dir} but does not respond: stopped "
        f"(kill -CONT {pid} resumes it) or hung (kill {pid} ends it)"))


def _start(paths: Paths, model: str | None, strategy: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rwkv_chat.daemon"]
    if model:
        cmd += ["--model", str(model)]
    if strategy:
        cmd += ["--strategy", strategy]
    log = open(os.open(paths.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                close_fds=True, env=child_env(paths))
    finally:
        log.close()


def run_foreground(paths: Paths, config, model: str | None = None, strategy: str | None = None) -> int:
    """Run the daemon of ``paths`` in this process until it stops (``config``: its ``Config``; ``model`` and
    ``strategy`` override the config's). Returns the exit status; raises AlreadyRunning."""
    from .server import serve

    return serve(paths, config, model, strategy)


def spawn_daemon(paths: Paths, model: str | None = None, strategy: str | None = None,
                 timeout: float = 60.0, silent_after: float = 1.0) -> p.ConnectionInfo:
    """Start a background daemon for ``paths`` (if none runs, or once a stopping one is gone) and return its
    connection info once it answers a ping. Raises DaemonNotResponding when a daemon it did not start holds
    the lock and stays silent for ``silent_after`` seconds, DaemonUnavailable when the config file is invalid
    (its one line: a daemon would exit on it), when the one it started exits (with what it logged since it was
    started) or nothing answers within ``timeout`` seconds."""
    from .config import ConfigError, load_config

    ensure_dirs(paths)
    if not lock_held(paths.lock_file):
        try:
            load_config(paths.config_file)
        except ConfigError as e:
            raise DaemonUnavailable(f"the daemon cannot start: {e}") from None
    logged = paths.log_file.stat().st_size if paths.log_file.exists() else 0
    proc = None
    silent_since = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is None and not lock_held(paths.lock_file):
            proc = _start(paths, model, strategy)
        info = ping(paths, timeout=0.5)
        if info is not None:
            return info
        if proc is not None and proc.poll() == 3:
            proc = None                        # another daemon won the lock: wait for that one
        if proc is not None and proc.poll() is not None:
            tail = ""
            if paths.log_file.exists():
                with open(paths.log_file, "rb") as f:     # this start's lines only, not earlier runs'
                    f.seek(logged)
                    tail = f.read().decode(errors="replace")[-2000:]
            raise DaemonUnavailable(f"the daemon exited with code {proc.returncode}; log {paths.log_file}:\n{tail}")
        if proc is None:
            st = _silent_state(paths)
            if st.state != "not responding":
                silent_since = None
            elif silent_since is None:
                silent_since = time.monotonic()
            elif time.monotonic() - silent_since >= silent_after:
                raise not_responding(st, paths)
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
    """Make ``sock`` a CURVE client of the daemon of ``info`` with the connection file's client key pair (the
    one the daemon admits), where the daemon uses CURVE. Call before connect."""
    if info.server_public_key:
        sock.curve_serverkey = info.server_public_key.encode()
        if info.client_public_key and info.client_secret_key:
            sock.curve_publickey = info.client_public_key.encode()
            sock.curve_secretkey = info.client_secret_key.encode()
        else:                                  # a daemon that admits any key (older connection files)
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
