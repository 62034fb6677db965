"""The connection file and the daemon's endpoints.

Connection file: ``<runtime dir>/daemon.json``, mode 0600 in a 0700 directory, holding the endpoints, the
hex key and the daemon's pid. Endpoints are ``ipc://`` sockets in the runtime directory, or loopback tcp
where ipc is missing (or the socket path would be too long). A tcp bind beyond loopback needs CURVE keys.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import stat
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
    server_public_key: str = ""   # Z85 CURVE public key when the daemon binds tcp beyond loopback
    started: float = 0.0

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


def default_endpoints(runtime_dir: Path) -> tuple[str, str] | None:
    """``(request, events)`` ipc endpoints in ``runtime_dir``, or None where ipc is unusable
    (missing in libzmq or the socket path too long); the caller then binds loopback tcp."""
    req, ev = runtime_dir / "daemon-req.sock", runtime_dir / "daemon-ev.sock"
    if not zmq.has("ipc") or len(str(ev).encode()) > IPC_PATH_MAX:
        return None
    return f"ipc://{req}", f"ipc://{ev}"


def check_bind(endpoint: str, have_curve: bool) -> None:
    """Refuse (ProtocolError) a tcp bind beyond loopback without CURVE keys, and unknown transports."""
    if endpoint.startswith("ipc://"):
        return
    if not endpoint.startswith("tcp://"):
        raise ProtocolError(f"unsupported endpoint {endpoint!r} (ipc:// or tcp:// only)")
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
