"""The rwkv-chat daemon protocol: what a client needs to talk to a daemon.

* :mod:`.messages` — one msgspec struct per request, reply and event; conversation ids and topics (gathered
  from :mod:`.base`, :mod:`.requests`, :mod:`.replies`, :mod:`.events`, :mod:`.limits` and :mod:`.checks`).
* :mod:`.codec` — builds, signs and parses the frames (the only place raw frames are touched).
* :mod:`.connection` — the connection file (endpoints, key, pid; 0600 in a 0700 directory) and endpoints.

Usage::

    from rwkv_chat.daemon import protocol as p
    from rwkv_chat.daemon.protocol import messages as m

    info = p.read_connection_file(paths.connection_file)
    codec = p.Codec(info.key_bytes)
    frames = codec.build(m.Ping(client_id="me"))
"""

from . import messages  # noqa: F401
from .codec import PROTOCOL_VERSION, Codec, ProtocolError, frames_to_tensors, tensor_frames  # noqa: F401
from .connection import ConnectionInfo, read_connection_file  # noqa: F401
from .messages import (CONVERSATION_ID_RE, DAEMON_TOPIC, InvalidId, LimitError, check_conversation_id,  # noqa: F401
                       check_request, new_conversation_id)

__all__ = ["messages", "PROTOCOL_VERSION", "Codec", "ProtocolError", "frames_to_tensors", "tensor_frames",
           "ConnectionInfo", "read_connection_file", "DAEMON_TOPIC", "InvalidId", "LimitError", "check_conversation_id",
           "check_request", "new_conversation_id", "CONVERSATION_ID_RE"]
