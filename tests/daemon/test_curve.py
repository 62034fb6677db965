"""A tcp bind with CURVE keys: clients connect through the encrypted path and work; a client without
the server's key, or with it but without the client key of the connection file, gets nothing; a bind
beyond loopback without keys is refused."""

from __future__ import annotations


import pytest
import zmq

from rwkv_chat.daemon.config import load_config, save_config
from rwkv_chat.daemon.paths import home_paths
from rwkv_chat.daemon.protocol import messages as m
from rwkv_chat.daemon import protocol as p
from rwkv_chat.daemon.protocol import connection
from rwkv_chat.daemon.client import Client

from .conftest import cli, free_port_pair, make_home, start_daemon, stop_daemon

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0}


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
def test_curve_tcp_daemon_serves_encrypted_clients(tmp_path, model_path):
    from .conftest import greedy

    home = make_home(tmp_path / "h")
    paths = home_paths(home)
    public, secret = zmq.curve_keypair()
    cfg = load_config(paths.config_file)
    port = free_port_pair()
    cfg.daemon.bind = f"tcp://127.0.0.1:{port}"
    cfg.daemon.curve_public_key, cfg.daemon.curve_secret_key = public.decode(), secret.decode()
    save_config(cfg, paths.config_file)
    start_daemon(home, model_path("5.2"))
    try:
        info = p.read_connection_file(paths.connection_file)
        assert info.request == f"tcp://127.0.0.1:{port}" and info.server_public_key == public.decode()
        with Client(paths, autostart=False) as c:
            events = list(c.complete("The capital of", max_tokens=16, **GREEDY))
            assert events[-1].text == greedy(model_path("5.2"), "The capital of", 16)
            assert c.status()["model"]["loaded"]
        assert cli(home, "complete", "Hi", "--max-tokens", 4).returncode == 0
        # a plain (non-CURVE) peer with the right HMAC key is not even heard: the handshake fails
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(info.request)
        s.send_multipart(p.Codec(info.key_bytes).build(m.Ping(client_id="")))
        assert not s.poll(1500)
        s.close()
        # a CURVE peer holding the server's public key, with a key pair of its own: refused by the ZAP handler
        for kind in (zmq.DEALER, zmq.SUB):
            s = zmq.Context.instance().socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            s.curve_serverkey = public
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
            if kind == zmq.SUB:
                s.setsockopt(zmq.SUBSCRIBE, b"")
                s.connect(info.events)
            else:
                s.connect(info.request)
                s.send_multipart(p.Codec(info.key_bytes).build(m.Ping(client_id="")))
            assert not s.poll(1000)
            s.close()
        # a CURVE peer that trusts another server key fails the handshake too
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.curve_serverkey = zmq.curve_keypair()[0]
        s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.connect(info.request)
        s.send_multipart(p.Codec(info.key_bytes).build(m.Ping(client_id="")))
        assert not s.poll(1500)
        s.close()
    finally:
        stop_daemon(home)


def test_bind_beyond_loopback_needs_curve_keys():
    with pytest.raises(p.ProtocolError, match="CURVE"):
        connection.check_bind("tcp://0.0.0.0:5555", have_curve=False)
    connection.check_bind("tcp://0.0.0.0:5555", have_curve=True)
    connection.check_bind("tcp://127.0.0.1:5555", have_curve=False)
