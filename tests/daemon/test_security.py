"""Another local user learns nothing of a conversation: not from the event socket (loopback tcp or the ipc
fallback of a long runtime path), not from the files (data dir, database and its -wal/-shm, state files,
connection file), whatever the umask; a runtime or data dir of another owner is refused.

The other user is ``nobody``: the tests fork children that drop to its uid (they need root, and are
skipped elsewhere)."""

from __future__ import annotations

import json
import os
import select  # noqa: F401 — imported here for the child run as nobody (it cannot read the stdlib's files)
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time  # noqa: F401 — as select
import traceback
from pathlib import Path

import pytest
import zmq  # noqa: F401 — as select (the attacker script imports it)

from rwkv_chat.daemon import protocol as p
from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.config import load_config, save_config
from rwkv_chat.daemon.paths import UnsafeDirectory, ensure_dirs, home_paths

from .conftest import cli, free_port_pair, make_home, start_daemon, stop_daemon

NOBODY = 65534
SECRET = "my PIN is 4711"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user (nobody)")

# Run as nobody: reads each path of argv[1] (a JSON list; a directory is listed) and prints, as JSON, "read"
# or the error's name for each.
READER = r"""
import json, os, sys

out = {"uid": os.getuid()}
for path in json.loads(sys.argv[1]):
    try:
        os.listdir(path) if os.path.isdir(path) else open(path, "rb").close()
        out[path] = "read"
    except OSError as e:
        out[path] = type(e).__name__
print(json.dumps(out))
"""

# Run as nobody: listens on the event endpoint with a plain SUB socket, a CURVE SUB holding the server's
# public key with its own key pair, and (the control) a CURVE SUB with the leaked client key pair of the
# connection file. Prints "ready" once listening (or after 1 s), then, at a line on stdin, how many bytes
# each received and whether the secret was among them, as JSON.
ATTACKER = r"""
import json, os, select, sys, time
import zmq  # noqa: F401 — as select (the attacker script imports it)

args = json.loads(sys.argv[1])
out = {"uid": os.getuid()}
ctx = zmq.Context()
subs = {}

def listen(name, server_key="", keys=None):
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    if server_key:
        s.curve_serverkey = server_key.encode()
        pub, sec = [k.encode() for k in keys] if keys else zmq.curve_keypair()
        s.curve_publickey, s.curve_secretkey = pub, sec
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(args["events"])
    subs[name] = s

listen("plain")
if args["server_key"]:
    listen("curve_own_key", args["server_key"])
    listen("curve_leaked_key", args["server_key"], args["client_keys"])
got = {name: b"" for name in subs}
poller = zmq.Poller()
for s in subs.values():
    poller.register(s, zmq.POLLIN)
ready_at = time.monotonic() + 1.0
ready = False
while True:
    for s, _ in poller.poll(50):
        name = next(n for n, x in subs.items() if x is s)
        got[name] += b"".join(s.recv_multipart())
    if not ready and (any(got.values()) or time.monotonic() > ready_at):
        print("ready", flush=True)
        ready = True
    if ready and select.select([sys.stdin], [], [], 0)[0]:
        break
out["received"] = {name: len(b) for name, b in got.items()}
out["secret_seen"] = {name: args["secret"].encode() in b for name, b in got.items()}
print(json.dumps(out), flush=True)
"""


class _AsNobody:
    """``script`` run as nobody in a forked child, with ``arg`` (JSON) as ``sys.argv[1]`` and pipes for stdin
    and stdout. The child does not exec: it runs on the interpreter and the modules this process has already
    imported, so it works where nobody may not read the interpreter's own files (a Python under /root)."""

    def __init__(self, script: str, arg):
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                   # the child: never returns into pytest
            code = 1
            try:
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                os.chdir("/")
                sys.argv = ["-c", json.dumps(arg)]
                sys.stdin = open(0, "r", closefd=False)
                sys.stdout = open(1, "w", closefd=False)
                exec(compile(script, "<as nobody>", "exec"), {"__name__": "__main__"})
                sys.stdout.flush()
                code = 0
            except BaseException:                      # noqa: BLE001 — reported on stderr, exit 1
                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(in_r)
        os.close(out_w)
        self.pid = pid
        self.stdin = open(in_w, "w")
        self.stdout = open(out_r, "r")

    def communicate(self, timeout: float = 30.0) -> tuple[str, None]:
        out = self.stdout.read()
        self.wait()
        return out, None

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self) -> int:
        try:
            return os.waitpid(self.pid, 0)[1]
        except ChildProcessError:
            return 0


def _as_nobody(script: str, arg, **kw) -> _AsNobody:
    return _AsNobody(script, arg)


def _read_as_nobody(paths: list[Path]) -> dict:
    """{path: "read" or the OSError's name} for each of ``paths`` read (a directory listed) as nobody."""
    out, _ = _as_nobody(READER, [str(x) for x in paths]).communicate(timeout=30)
    report = json.loads(out)
    assert report.pop("uid") == NOBODY
    return report


def _attack_during_chat(home: Path, cid: str) -> dict:
    """Run the attacker as nobody while a chat turn says SECRET; returns its report."""
    paths = home_paths(home)
    info = p.read_connection_file(paths.connection_file)
    args = {"events": info.events, "server_key": info.server_public_key, "secret": SECRET,
            "client_keys": [getattr(info, "client_public_key", ""), getattr(info, "client_secret_key", "")]}
    proc = _as_nobody(ATTACKER, args, stdin=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with Client(paths, autostart=False) as c:
            done = list(c.chat(cid, SECRET, max_tokens=6, temperature=0))[-1]
            assert done.tokens == 6
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        report = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert report["uid"] == NOBODY
    return report


@pytest.fixture(scope="module")
def tcp_home(model_path):
    """A daemon bound to loopback tcp (no CURVE keys configured), started with umask 0, in a home every user
    may enter (as a home directory is)."""
    old = os.umask(0)
    base = Path(tempfile.mkdtemp(prefix="rwkv-chat-security-"))
    os.chmod(base, 0o755)
    try:
        home = make_home(base / "home")
        paths = home_paths(home)
        cfg = load_config(paths.config_file)
        cfg.daemon.bind = f"tcp://127.0.0.1:{free_port_pair()}"
        save_config(cfg, paths.config_file)
        start_daemon(home, model_path("5.2"))
    finally:
        os.umask(old)
    yield home
    stop_daemon(home)
    shutil.rmtree(base, ignore_errors=True)


def test_loopback_tcp_events_reach_no_other_user(tcp_home):
    report = _attack_during_chat(tcp_home, "pin")
    info = p.read_connection_file(home_paths(tcp_home).connection_file)
    assert info.events.startswith("tcp://127.0.0.1:")
    assert report["received"]["plain"] == 0, report
    # holding the server's public key is not enough: the ZAP handler admits only the connection file's key
    assert report["received"].get("curve_own_key") == 0, report
    assert report["secret_seen"].get("curve_leaked_key"), report      # control: the attack itself works


def test_data_files_private_whatever_the_umask(tcp_home):
    paths = home_paths(tcp_home)
    with Client(paths, autostart=False) as c:       # a second exchange: a state file, the WAL written to
        list(c.chat("pin", "again", max_tokens=3, temperature=0))
    wal, shm = (paths.database.with_name(paths.database.name + s) for s in ("-wal", "-shm"))
    assert paths.database.exists() and wal.exists() and shm.exists()
    states = list(paths.states_dir.rglob("*.safetensors"))
    assert states
    private = [paths.data_dir, *paths.data_dir.rglob("*"), paths.runtime_dir, paths.connection_file]
    for path in private:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {mode:o}"
    assert paths.config_dir.stat().st_mode & 0o005            # the home itself is open to others
    read = _read_as_nobody([paths.database, wal, paths.data_dir, paths.states_dir, paths.connection_file])
    assert all(v == "PermissionError" for v in read.values()), read


def test_private_dirs_of_another_owner_are_refused(tmp_path):
    home = make_home(tmp_path / "h")
    paths = home_paths(home)
    os.chown(paths.runtime_dir, NOBODY, NOBODY)
    try:
        r = cli(home, "daemon", "start", check=False, timeout=60)
    finally:
        stop_daemon(home)
    assert r.returncode == 1 and f"belongs to uid {NOBODY}" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert stat.S_IMODE(paths.runtime_dir.stat().st_mode) == 0o700 and paths.runtime_dir.stat().st_uid == NOBODY
    os.chown(paths.runtime_dir, 0, 0)
    os.chown(paths.data_dir, NOBODY, NOBODY)
    with pytest.raises(UnsafeDirectory, match=str(paths.data_dir)):
        ensure_dirs(paths)


def test_long_runtime_path_stays_on_ipc_in_a_private_dir(tmp_path, model_path):
    home = make_home(tmp_path / ("long-" + "x" * 90))
    paths = home_paths(home)
    assert len(str(paths.runtime_dir / "daemon-ev.sock")) > 100
    start_daemon(home, model_path("5.2"))
    try:
        info = p.read_connection_file(paths.connection_file)
        assert info.request.startswith("ipc://") and info.events.startswith("ipc://"), info
        sock_dir = Path(info.ipc_dir)
        assert Path(info.events[len("ipc://"):]).parent == sock_dir
        st = sock_dir.stat()
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
        report = _attack_during_chat(home, "pin")
        assert not any(report["received"].values()) and not any(report["secret_seen"].values()), report
    finally:
        stop_daemon(home)
    assert not sock_dir.exists()
