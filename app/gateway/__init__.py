"""The OpenAI-compatible HTTP API: a gateway process in front of the daemon (``rwkv-chat serve --http``).

The gateway is a client of the daemon over ZeroMQ like the terminal UI: it turns OpenAI requests into the
daemon's requests (:mod:`.schema`) and serves them with starlette on uvicorn (:mod:`.server`). It listens on
``[http] listen`` of the config (default ``127.0.0.1:11435``) or ``--http HOST:PORT``; an address beyond
loopback is refused unless an API key is set (``[http] api_key``, or ``--api-key``): :func:`check_listen`.

Usage with any OpenAI client::

    rwkv-chat serve --http 127.0.0.1:11435
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:11435/v1", api_key="unused")
    client.chat.completions.create(model=client.models.list().data[0].id, messages=[...])
"""

from __future__ import annotations

import ipaddress
import socket
import sys

from .schema import ApiError  # noqa: F401
from .server import CACHED_HEADER, PREFILL_HEADER, make_app  # noqa: F401

__all__ = ["ApiError", "CACHED_HEADER", "PREFILL_HEADER", "ListenError", "check_listen", "make_app",
           "parse_listen", "serve"]


#: seconds the replies in flight get to finish when the gateway is stopped (then their streams are cut)
STOP_GRACE = 3


class ListenError(ValueError):
    """The listen address is malformed, or beyond loopback without an API key."""


def parse_listen(text: str) -> tuple[str, int]:
    """``(host, port)`` of ``"HOST:PORT"`` (``"[::1]:PORT"`` for IPv6; ``":PORT"`` = 127.0.0.1). Raises
    ListenError."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ListenError(f"the listen address {text!r:.80} is not HOST:PORT (e.g. 127.0.0.1:11435)")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) is a loopback address only (every address it resolves to)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_listen(listen: str, api_key: str) -> tuple[str, int]:
    """``(host, port)`` to bind; raises ListenError when ``listen`` is beyond loopback and ``api_key`` is empty."""
    host, port = parse_listen(listen)
    if not api_key and not is_loopback(host):
        raise ListenError(f"refusing to listen on {listen} without an API key: anyone who can reach it could use "
                          "the model; set [http] api_key in the config (or --api-key), or listen on 127.0.0.1")
    return host, port


def serve(paths, listen: str, api_key: str = "") -> int:
    """Serve the API for the daemon of ``paths`` on ``listen`` until interrupted. Raises ListenError (the
    address), OSError (it cannot be bound)."""
    import uvicorn

    host, port = check_listen(listen, api_key)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:    # a clear error first
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    shown = f"[{host}]" if ":" in host else host
    print(f"rwkv-chat: OpenAI-compatible API on http://{shown}:{port}/v1"
          + (" (API key required)" if api_key else ""), file=sys.stderr, flush=True)
    config = uvicorn.Config(make_app(paths, api_key), host=host, port=port, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=STOP_GRACE)
    uvicorn.Server(config).run()
    return 0
