"""The OpenAI-compatible HTTP API: the official ``openai`` client against a real gateway process
(``rwkv-chat serve --http``) and a real daemon on the tiny RWKV-7 model.

Expected values come from the CLI (``rwkv-chat chat`` / ``complete`` at temperature 0) and from a second daemon
whose prefix cache is off (``[daemon] prefix_cache_bytes = 0``): the same requests there read every prompt token.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from rwkv_chat.daemon.client import Client
from rwkv_chat.daemon.config import load_config, save_config
from rwkv_chat.daemon.paths import home_paths

from ..daemon.conftest import CLI, cli, env_for, make_home, start_daemon, stop_daemon, wait_for

openai = pytest.importorskip("openai")

MODEL = "tiny-rwkv-7v0-834K"
GREEDY = {"temperature": 0, "max_tokens": 40}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """``rwkv-chat serve --http 127.0.0.1:PORT [ARGS]`` in its own process."""

    def __init__(self, home, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*CLI, "serve", "--http", f"127.0.0.1:{self.port}", *args], env=env_for(home),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the gateway did not start listening")

    def client(self, key: str = "unused", **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def post(self, path: str, body, headers: dict | None = None) -> tuple[int, dict, dict]:
        """``(status, JSON body, headers)`` of a raw POST (``body`` bytes or JSON-able)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def homes(tmp_path_factory, model_path):
    """Two running daemons on the tiny RWKV-7 model: ``warm`` (prefix cache on) and ``cold`` (off)."""
    model = model_path("7")
    warm = make_home(tmp_path_factory.mktemp("warm"))
    cold = make_home(tmp_path_factory.mktemp("cold"), prefix_cache_bytes=0)
    started = []
    try:
        for home in (warm, cold):
            start_daemon(home, model)
            started.append(home)
        yield {"warm": warm, "cold": cold}
    finally:
        for home in started:
            stop_daemon(home)


@pytest.fixture(scope="module")
def gateway(homes):
    gw = Gateway(homes["warm"])
    yield gw
    gw.stop()


def cold_done(homes, messages, **sampling):
    """The Done of ``messages`` on the daemon without a prefix cache."""
    with Client(home_paths(homes["cold"]), autostart=False) as c:
        assert c.status()["prefix_cache"]["budget"] == 0
        return [ev for ev in c.chat_messages(messages, **sampling)][-1]


def cli_reply(home, *args) -> tuple[str, str, int]:
    """(stdout, reason, tokens) of ``rwkv-chat ARGS`` (its summary line on stderr)."""
    r = cli(home, *args)
    reason, tokens = re.search(r"\[(\w+): (\d+) tokens", r.stderr).groups()
    return r.stdout, reason, int(tokens)


def test_models_lists_the_loaded_model(gateway):
    client = gateway.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_equals_rwkv_chat_chat(gateway, homes):
    text = "Tell me about the sea."
    out, reason, tokens = cli_reply(homes["warm"], "chat", text, "--temperature", "0", "--max-tokens", "40")
    client = gateway.client()
    msgs = [{"role": "user", "content": text}]
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, **GREEDY)
    r = raw.parse()
    assert r.choices[0].message.content == out.strip()
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == reason
    assert r.usage.completion_tokens == tokens
    cold = cold_done(homes, [("user", text)], **GREEDY)
    assert r.usage.prompt_tokens == cold.prompt_tokens and r.usage.prompt_tokens_details.cached_tokens == 0
    assert raw.headers["x-rwkv-chat-cached-tokens"] == "0"
    assert raw.headers["x-rwkv-chat-prefill-tokens"] == str(cold.prompt_tokens)

    # streamed: the same text; the whole prompt now comes from the cache (the state after it was kept)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, stream=True,
                                                           stream_options={"include_usage": True}, **GREEDY)
    assert raw.headers["x-rwkv-chat-cached-tokens"] == str(cold.prompt_tokens)
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == out.strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reason
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.completion_tokens == tokens
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens == cold.prompt_tokens


def test_chat_stop_strings_end_the_reply(gateway):
    client = gateway.client()
    msgs = [{"role": "user", "content": "Say something long."}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=60)
    text = full.choices[0].message.content
    stop = text.split()[2]                     # a word the reply has: the reply ends before it
    cut = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=60, stop=[stop, "zz"])
    assert cut.choices[0].message.content == text.split(stop)[0].strip()
    assert cut.choices[0].finish_reason == "stop"


def test_completions_equal_rwkv_chat_complete(gateway, homes):
    prompt = "The king said"
    out, reason, tokens = cli_reply(homes["warm"], "complete", prompt, "--temperature", "0", "--max-tokens", "30",
                                    "--stop", "\n\n")
    client = gateway.client()
    r = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=30, stop="\n\n")
    assert r.choices[0].text == out
    assert r.choices[0].finish_reason == reason and r.usage.completion_tokens == tokens
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=30,
                                            stop=["\n\n"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out
    assert chunks[-1].choices[0].finish_reason == reason
    echo = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=30, stop="\n\n", echo=True)
    assert echo.choices[0].text == prompt + out


def test_second_turn_reads_only_the_new_message(gateway, homes):
    client = gateway.client()
    first = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    r1 = client.chat.completions.create(model=MODEL, messages=first, **GREEDY)
    reply = r1.choices[0].message.content
    new = "And another one?"
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": new}]
    before = Client(home_paths(homes["warm"]), autostart=False)
    try:
        hits0 = before.status()["prefix_cache"]["hits"]
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=second, **GREEDY)
        after = before.status()["prefix_cache"]
    finally:
        before.close()
    r2 = raw.parse()
    pairs = [(m["role"], m["content"]) for m in second]
    cold = cold_done(homes, pairs, **GREEDY)                     # no cache: reads every token
    alone = cold_done(homes, [("user", new)], max_tokens=1, temperature=0)   # the new message's tokens
    assert r2.usage.prompt_tokens == cold.prompt_tokens and cold.cached_tokens == 0
    prefill = r2.usage.prompt_tokens - r2.usage.prompt_tokens_details.cached_tokens
    assert prefill == alone.prompt_tokens
    assert raw.headers["x-rwkv-chat-prefill-tokens"] == str(prefill)
    assert raw.headers["x-rwkv-chat-cached-tokens"] == str(r2.usage.prompt_tokens_details.cached_tokens)
    assert r2.choices[0].message.content == cold.text          # the cache changes nothing in the reply
    assert after["hits"] == hits0 + 1 and after["entries"] > 0
    line = [x for x in cli(homes["warm"], "daemon", "status").stdout.splitlines() if x.startswith("prefix cache:")]
    assert line and f"{after['hits']} hits" in line[0]


def test_concurrent_requests(gateway, homes):
    client = gateway.client()
    # streams in flight at once are generations running at once in the daemon (batched)
    with Client(home_paths(homes["warm"]), autostart=False) as daemon:
        streams = [client.completions.create(model=MODEL, prompt=f"Story {i}:", stream=True, temperature=1,
                                             max_tokens=100_000) for i in range(3)]
        try:
            for s in streams:
                next(iter(s))
            assert sum(a["kind"] == "complete" for a in daemon.status()["active"]) == 3
        finally:
            for s in streams:
                s.close()
        wait_for(lambda: not daemon.status()["active"], timeout=10)
    texts = ["One fish.", "Two fish.", "Red fish.", "Blue fish."]
    results: dict[str, str] = {}

    def ask(t: str) -> None:
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": t}],
                                                stream=True, **GREEDY)
        results[t] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    for t in texts:      # the same as alone (the daemon batches them; its batches are batch-invariant on CPU)
        alone = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": t}], **GREEDY)
        assert results[t] == alone.choices[0].message.content


def test_a_client_leaving_a_stream_cancels_its_generation(gateway, homes):
    client = gateway.client()
    with Client(home_paths(homes["warm"]), autostart=False) as daemon:
        with client.completions.create(model=MODEL, prompt="Go on and on", stream=True, temperature=1,
                                       max_tokens=100_000) as stream:     # a minute of text: no stop string
            next(iter(stream))
            assert any(a["kind"] == "complete" for a in daemon.status()["active"])
        wait_for(lambda: not daemon.status()["active"], timeout=10)


def test_a_client_leaving_a_whole_reply_cancels_its_generation(gateway, homes):
    """Not streamed: the client that gives up (a read timeout) cancels the generation, as a stream's does."""
    import http.client

    with Client(home_paths(homes["warm"]), autostart=False) as daemon:
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=1.5)
        conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "Go on", "temperature": 1,
                                                           "max_tokens": 100_000}),
                     {"content-type": "application/json"})
        with pytest.raises(TimeoutError):
            conn.getresponse()
        assert any(a["kind"] == "complete" for a in daemon.status()["active"])
        conn.close()
        wait_for(lambda: not daemon.status()["active"], timeout=10)


@pytest.mark.parametrize("body, param, words", [
    ({"max_tokens": 10**21}, "max_tokens", "between 1 and 9223372036854775807"),
    ({"max_tokens": 10**400}, "max_tokens", "an integer of 401 digits"),
    ({"temperature": 10**400}, "temperature", "must be a finite number"),
    ({"top_k": 10**23}, "top_k", "between 0 and 9223372036854775807"),
    ({"seed": 2**63}, "seed", "got 9223372036854775808"),
    ({"prompt": "a\ud800b"}, "prompt", "lone surrogate"),
    ({"stop": ["x", "\udfff"]}, "stop[1]", "lone surrogate"),
])
def test_out_of_range_integers_and_lone_surrogates_are_bad_requests(gateway, body, param, words):
    code, err, _ = gateway.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, **body})
    assert code == 400 and err["error"]["param"] == param and words in err["error"]["message"], err


def test_daemon_limits_name_their_field_and_a_busy_daemon_says_when_to_retry(gateway):
    from rwkv_chat.app.gateway.schema import daemon_error
    from rwkv_chat.app.gateway.server import error_response

    code, err, _ = gateway.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9})
    assert code == 400 and err["error"]["param"] == "max_tokens" and err["error"]["code"] == "limit_error", err
    busy = error_response(daemon_error("Busy", "the queue is full"))
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert json.loads(busy.body)["error"]["code"] == "busy"
    assert daemon_error("OOM", "out of memory").code == "oom"
    assert daemon_error("LimitError", "stopped strings: too many").param is None      # a field named as a word
    code, err, _ = gateway.post("/v1/completions", b"[" * 100_000 + b"]" * 100_000)    # nested past json's depth
    assert code == 400 and "not JSON" in err["error"]["message"]


@pytest.mark.parametrize("body, status, param", [
    ({"model": MODEL}, 400, "messages"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": [1]}, 400, "stop"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 0}, 400,
     "repetition_penalty"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "repetition_penalty": -1}, 400,
     "repetition_penalty"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
])
def test_bad_chat_requests_get_openai_errors(gateway, body, status, param):
    code, err, _ = gateway.post("/v1/chat/completions", body)
    assert code == status
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["message"]
    assert err["error"]["param"] == param
    assert err["error"]["type"] == "invalid_request_error"


def test_bad_requests_through_the_openai_client(gateway):
    client = gateway.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="", max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])
    code, err, _ = gateway.post("/v1/chat/completions", b"{not json")
    assert code == 400 and err["error"]["type"] == "invalid_request_error"
    code, err, _ = gateway.post("/v1/nothing", {})
    assert code == 404 and err["error"]["code"] == "not_found"
    from rwkv_chat.app.gateway.server import MAX_BODY

    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)   # announced too large: refused
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("content-type", "application/json")
    conn.putheader("content-length", str(MAX_BODY + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()
    # fields the API does not use are ignored
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       user="someone", logit_bias={}, extra_body={"unknown_field": 1})
    assert r.usage.completion_tokens <= 2


def test_api_key_required_when_configured(homes):
    gw = Gateway(homes["warm"], "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            gw.client().models.list()
        with pytest.raises(openai.AuthenticationError):
            gw.client("wrong").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        code, err, _ = gw.post("/v1/completions", {"model": MODEL, "prompt": "x"})
        assert code == 401 and err["error"]["code"] == "invalid_api_key"
        assert [m.id for m in gw.client("s3cret").models.list().data] == [MODEL]
        # the scheme's case does not matter (RFC 7235)
        code, _, _ = gw.post("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1},
                             {"authorization": "bearer s3cret"})
        assert code == 200
    finally:
        gw.stop()


def test_non_loopback_without_key_is_refused(homes, tmp_path):
    r = subprocess.run([*CLI, "serve", "--http", f"0.0.0.0:{free_port()}"], env=env_for(homes["warm"]),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "API key" in lines[0] and "Traceback" not in r.stderr
    # the same from the config's [http] section
    home = make_home(tmp_path)
    paths = home_paths(home)
    cfg = load_config(paths.config_file)
    cfg.http.listen = f"0.0.0.0:{free_port()}"
    save_config(cfg, paths.config_file)
    r = subprocess.run([*CLI, "serve"], env=env_for(home), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "API key" in r.stderr
    with socket.socket() as taken:                # a port in use: one line, exit 1
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([*CLI, "serve", "--http", f"127.0.0.1:{taken.getsockname()[1]}"], env=env_for(home),
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "cannot listen" in r.stderr


def test_pooled_clients_are_reused_and_keep_no_subscriptions(homes):
    import uvicorn

    from rwkv_chat.app.gateway import make_app

    app = make_app(home_paths(homes["warm"]), autostart=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        wait_for(lambda: server.started, timeout=20)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
            list(client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True))
        idle = app.state.gateway.pool._idle     # a stream's client comes back just after its last chunk
        wait_for(lambda: idle and not any(c._topics for c in idle), timeout=5)   # every topic was left
        assert len(idle) <= 2                   # one request at a time: its client reused (or the one before)
    finally:
        server.should_exit = True
        th.join(10)


def test_listen_addresses_and_model_names():
    from rwkv_chat.app.gateway import ListenError, check_listen
    from rwkv_chat.app.gateway.server import Strip, model_name

    assert check_listen("127.0.0.1:11435", "") == ("127.0.0.1", 11435)
    assert check_listen("[::1]:8080", "") == ("::1", 8080)
    assert check_listen("localhost:9", "") == ("localhost", 9)
    assert check_listen("0.0.0.0:9", "key") == ("0.0.0.0", 9)
    for bad, key in (("0.0.0.0:9", ""), ("[::]:9", ""), ("192.168.1.2:9", ""), ("nohost", "k"), ("h:0", "k"),
                     ("h:99999", "k")):
        with pytest.raises(ListenError):
            check_listen(bad, key)
    assert model_name({"loaded": True, "path": "/m/tiny.pth"}) == "tiny"
    assert model_name({"loaded": True, "path": "/m/tiny.pth", "name": "rwkv7-g1"}) == "rwkv7-g1"
    assert model_name({"loaded": False, "unloaded": "keep-alive", "path": "/m/tiny.pth"}) == "tiny"
    assert model_name({"loaded": False, "loading": "/m/qwen2.5-0.5b"}) == "qwen2.5-0.5b"
    assert model_name({"loaded": False}) == ""
    pieces = ["  ", " Hello", " world", " \n", "", "!", "  \n\n"]
    s = Strip()
    assert "".join(s.feed(p) for p in pieces) == "".join(pieces).strip()


def test_systemd_unit_of_the_api():
    import configparser
    from pathlib import Path

    cp = configparser.ConfigParser(interpolation=None, strict=True)
    cp.optionxform = str
    cp.read_string((Path(__file__).resolve().parents[2] / "packaging" / "rwkv-chat-http.service").read_text())
    exe, *args = cp["Service"]["ExecStart"].split()
    assert Path(exe).name == "rwkv-chat" and args == ["serve"]
    assert cp["Service"]["RestartPreventExitStatus"] == "2"       # a refused address: not restarted
    assert "rwkv-chat.service" in cp["Unit"]["After"]


def test_the_first_request_after_a_daemon_restart_is_served(tmp_path, model_path):
    """A pooled client of a daemon that was stopped and started again is not reused: the next request goes to
    the daemon running now instead of failing."""
    home = make_home(tmp_path / "home")
    start_daemon(home, model_path("7"))
    gw = Gateway(home)
    try:
        client = gw.client()
        assert [m.id for m in client.models.list().data] == [MODEL]        # a client of this daemon is pooled
        stop_daemon(home)
        start_daemon(home, model_path("7"))
        assert [m.id for m in client.models.list().data] == [MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3)
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        gw.stop()
        stop_daemon(home)


def test_a_prompt_beyond_the_context_limit_is_a_bad_request(tmp_path, model_path):
    """OpenAI's answer to a prompt the model's context cannot hold: 400, code ``context_length_exceeded``."""
    home = make_home(tmp_path / "home")
    config_file = home_paths(home).config_file
    cfg = load_config(config_file)
    cfg.model.context_limit = 64
    save_config(cfg, config_file)
    start_daemon(home, model_path("7"))
    gw = Gateway(home)
    try:
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 100}]}),
                           ("/v1/completions", {"prompt": "x" * 100})):
            code, err, _ = gw.post(path, {"model": MODEL, "max_tokens": 3, **body})
            assert code == 400 and err["error"]["type"] == "invalid_request_error", err
            assert err["error"]["code"] == "context_length_exceeded"
            assert "context limit of 64" in err["error"]["message"]
        with pytest.raises(openai.BadRequestError):
            gw.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 100}])
    finally:
        gw.stop()
        stop_daemon(home)


def test_sampling_fields_map_to_the_daemons_settings():
    """OpenAI's names (and vLLM's ``repetition_penalty``) become the daemon's sampling settings by name."""
    from rwkv_chat.app.gateway.schema import parse_chat
    from rwkv_chat.models.text.sampling import SETTINGS

    req = parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 0.5,
                      "presence_penalty": 0.1, "frequency_penalty": 0.2, "repetition_penalty": 1.1, "seed": 3,
                      "max_completion_tokens": 9})
    assert req.sampling == {"temperature": 0.5, "alpha_presence": 0.1, "alpha_frequency": 0.2,
                            "repetition_penalty": 1.1, "seed": 3, "max_tokens": 9}
    assert set(req.sampling) <= set(SETTINGS)
