"""The connection file and the daemon's endpoints.

Connection file: ``<runtime dir>/daemon.json``, mode 0600 in a 0700 directory, holding the endpoints, the
hex signing key, the daemon's pid and the CURVE keys of this daemon run: the server's public key and the one
client key pair the daemon admits. Whoever can read the file can talk to the daemon; nobody else can.

Endpoints are ``ipc://`` sockets (mode 0600) in the runtime directory, or, where that path is too long for a
unix socket (:data:`IPC_PATH_MAX`), in a fresh private directory (mode 0700, random name) in the temp
directory (:func:`ipc_endpoints`); loopback tcp only where libzmq has no ipc, or where the config asks
for a tcp bind (beyond loopback only with configured CURVE keys: :func:`check_bind`).

Every endpoint, ipc and tcp alike, is CURVE-encrypted where libzmq has CURVE, and the daemon's ZAP
handler admits only the client key of the connection file: a process of another user that reaches a
socket (loopback tcp, or knowing the server's public key) completes no handshake and receives nothing.
Without CURVE in libzmq only ipc endpoints are used (a tcp endpoint is refused: :func:`check_bind`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq

from .codec import PROTOCOL_VERSION, ProtocolError

IPC_PATH_MAX = 100               # sockaddr_un holds 107 bytes; keep a margin


@dataclass
class ConnectionInfo:
    """What a client needs to reach a daemon (the content of ``daemon.json``)."""

    request: str
    events: str
    key: str          # hex
    pid: int
    protocol: int = PROTOCOL_VERSION
    server_public_key: str = ""   # Z85 CURVE public key of the daemon ("" = no CURVE: ipc only)
    started: float = 0.0
    client_public_key: str = ""   # Z85 CURVE key pair of clients: the one key the daemon admits
    client_secret_key: str = ""
    ipc_dir: str = ""             # the private directory made for the ipc sockets ("" = the runtime dir)

    @property
    def key_bytes(self) -> bytes:
        return bytes.fromhex(self.key)


def new_key() -> bytes:
    """A fresh 256-bit signing key."""
    return secrets.token_bytes(32)


def write_connection_file(path: Path, info: ConnectionInfo) -> None:
    """Write ``info`` atomically with mode 0600 (the directory must be 0700; it is enforced)."""
    d = path.parent
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    tmp = d / f".{path.name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, json.dumps(info.__dict__, indent=2).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_connection_file(path: Path) -> ConnectionInfo:
    """Read and check a connection file. Raises FileNotFoundError, or ProtocolError if it is
    readable by others, malformed, or of another protocol version."""
    st = path.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ProtocolError(f"{path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); refusing it")
    if st.st_uid != os.getuid():
        raise ProtocolError(f"{path} belongs to another user")
    try:
        data = json.loads(path.read_text())
        info = ConnectionInfo(**data)
        info.key_bytes
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"{path} is malformed: {e}") from e
    if info.protocol != PROTOCOL_VERSION:
        raise ProtocolError(f"daemon speaks protocol {info.protocol}, this client {PROTOCOL_VERSION}")
    return info


IPC_NAMES = ("daemon-req.sock", "daemon-ev.sock")
IPC_DIR_PREFIX = "rwkv-chat-"


def _fits(d: Path) -> bool:
    return len(str(d / IPC_NAMES[1]).encode()) <= IPC_PATH_MAX


def ipc_endpoints(runtime_dir: Path) -> tuple[str, str, Path | None] | None:
    """``(request, events, made_dir)``: ipc endpoints in ``runtime_dir``, or, where those socket paths would
    exceed :data:`IPC_PATH_MAX` bytes, in a fresh private directory (``tempfile.mkdtemp``: mode 0700, a
    random name no other user can take first) in the temp directory or ``/tmp``; ``made_dir`` is that
    directory (None for the runtime dir), to be removed when the daemon stops. None where libzmq has no ipc.
    Raises ProtocolError when no short enough directory can be made."""
    if not zmq.has("ipc"):
        return None
    d, made = runtime_dir, None
    if not _fits(runtime_dir):
        for parent in dict.fromkeys((tempfile.gettempdir(), "/tmp")):
            if _fits(Path(parent) / (IPC_DIR_PREFIX + "x" * 8)):
                try:
                    d = made = Path(tempfile.mkdtemp(prefix=IPC_DIR_PREFIX, dir=parent))
                except OSError:
                    continue
                break
        else:
            raise ProtocolError(f"no directory for ipc sockets: {runtime_dir} and the temp directory make "
                                f"socket paths over {IPC_PATH_MAX} bytes (set a shorter runtime dir)")
    return f"ipc://{d / IPC_NAMES[0]}", f"ipc://{d / IPC_NAMES[1]}", made


def remove_ipc(info: ConnectionInfo) -> None:
    """Remove the ipc socket files of ``info`` and the private directory made for them, if any (a stopped
    or killed daemon's); a directory is removed only when it is this user's and holds nothing else."""
    for path in ipc_paths(info):
        path.unlink(missing_ok=True)
    if info.ipc_dir:
        d = Path(info.ipc_dir)
        try:
            if d.name.startswith(IPC_DIR_PREFIX) and d.lstat().st_uid == os.getuid():
                d.rmdir()
        except OSError:
            pass


def check_bind(endpoint: str, have_curve: bool) -> None:
    """Refuse (ProtocolError) unknown transports, a tcp bind when libzmq has no CURVE (tcp is always
    encrypted), and a tcp bind beyond loopback without configured CURVE keys (``have_curve``)."""
    if endpoint.startswith("ipc://"):
        return
    if not endpoint.startswith("tcp://"):
        raise ProtocolError(f"unsupported endpoint {endpoint!r} (ipc:// or tcp:// only)")
    if not zmq.has("curve"):
        raise ProtocolError(f"refusing to bind {endpoint}: libzmq has no CURVE, and tcp is never served "
                            "unencrypted (leave [daemon] bind empty for ipc)")
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    loopback = host == "localhost"
    if not loopback:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
    if not loopback and not have_curve:
        raise ProtocolError(
            f"refusing to bind {endpoint}: a tcp bind beyond loopback needs CURVE keys "
            "([daemon] curve_secret_key / curve_public_key in the config)")


def ipc_paths(info: ConnectionInfo) -> list[Path]:
    """The socket files of ipc endpoints in ``info`` (for stale-socket cleanup)."""
    return [Path(e[len("ipc://"):]) for e in (info.request, info.events) if e.startswith("ipc://")]
