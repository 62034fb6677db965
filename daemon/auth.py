"""Who may talk to the daemon: the CURVE keys of a daemon run and its ZAP handler (ZeroMQ RFC 27).

Where libzmq has CURVE, every socket of the daemon (ipc and tcp, loopback included) is a CURVE server.
At start the daemon makes one client key pair (:func:`new_keys`) and writes it, with the server's public
key, into the 0600 connection file; clients use that pair. The ZAP handler (:class:`ZapHandler`, a REP
socket on :data:`ZAP_ENDPOINT` in the daemon's ZeroMQ context, served by the main loop) admits a CURVE
handshake only when the client's long-term public key is one of the admitted keys; any other key or
mechanism is refused (status 400), so a process that cannot read the connection file completes no
handshake on any socket and receives no event, even knowing the server's public key. The handler is bound
before any daemon socket binds and lives as long as the main loop.

The HMAC signature of every frame (:mod:`rwkv_chat.daemon.protocol.codec`) stays on top: CURVE hides and
authenticates the transport, the signature the messages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import zmq
from zmq.utils import z85

log = logging.getLogger("rwkv_chat.daemon")

#: where libzmq sends ZAP requests (fixed by RFC 27)
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
#: the ZAP domain of the daemon's sockets
ZAP_DOMAIN = b"rwkv-chat"
#: seconds between two log lines about refused handshakes (a flood writes one line per interval)
REFUSAL_LOG_INTERVAL = 10.0


@dataclass(frozen=True)
class Keys:
    """Z85-encoded CURVE keys (40 bytes each) of a daemon run: the server's pair and the admitted client's."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def new_keys(server_public: str = "", server_secret: str = "") -> Keys | None:
    """Fresh CURVE keys: the given server pair (Z85 strings, e.g. from the config) or a new one, and a new
    client pair. None where libzmq has no CURVE."""
    if not zmq.has("curve"):
        return None
    if server_public and server_secret:
        spub, ssec = server_public.encode(), server_secret.encode()
    else:
        spub, ssec = zmq.curve_keypair()
    cpub, csec = zmq.curve_keypair()
    return Keys(spub, ssec, cpub, csec)


def make_server(sock: zmq.Socket, keys: Keys) -> None:
    """Make ``sock`` a CURVE server with ``keys`` whose handshakes the ZAP handler decides (call before bind)."""
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    sock.zap_domain = ZAP_DOMAIN


class ZapHandler:
    """The daemon's ZAP handler: admits CURVE clients whose public key is in ``admitted`` (Z85 keys).

    Create it (it binds :data:`ZAP_ENDPOINT` in ``ctx``) before binding any CURVE socket of ``ctx``; poll
    :attr:`socket` and call :meth:`handle` when it is readable. ``refused`` counts refused handshakes.
    Raises zmq.ZMQError if another handler is bound in ``ctx``.
    """

    def __init__(self, ctx: zmq.Context, admitted: list[bytes]):
        self.admitted = {z85.decode(k) for k in admitted}
        self.refused = 0
        self._logged_refused = 0
        self._t_log = 0.0
        self.socket = ctx.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)

    def handle(self) -> None:
        """Answer every waiting ZAP request (non-blocking)."""
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.socket.send_multipart(self._answer(frames))
        self._log_refusals()

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        # request: version, request id, domain, address, routing id, mechanism, credentials...
        request_id = frames[1] if len(frames) > 1 else b""
        ok = (len(frames) == 7 and frames[0] == b"1.0" and frames[2] == ZAP_DOMAIN and frames[5] == b"CURVE"
              and frames[6] in self.admitted)
        if ok:
            return [b"1.0", request_id, b"200", b"OK", b"client", b""]
        self.refused += 1
        return [b"1.0", request_id, b"400", b"unknown client key", b"", b""]

    def _log_refusals(self) -> None:
        now = time.monotonic()
        if self.refused > self._logged_refused and now - self._t_log >= REFUSAL_LOG_INTERVAL:
            log.warning("refused %d CURVE handshake(s) of unknown client keys (%d in all)",
                        self.refused - self._logged_refused, self.refused)
            self._logged_refused, self._t_log = self.refused, now

    def close(self) -> None:
        self.socket.close(linger=0)
