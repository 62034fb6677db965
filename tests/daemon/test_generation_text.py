"""A generation's text, in process (no daemon): stop sequences found in the new text only, Token events and the
Done event bounded however long the text grows, chat replies capped at MAX_TEXT bytes."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from rwkv_chat.daemon.config import Config
from rwkv_chat.daemon.generation import Generation, Job
from rwkv_chat.daemon.stops import StopScanner
from rwkv_chat.daemon.protocol import codec as p
from rwkv_chat.daemon.protocol import messages as m


def _held_back(text: str, stops) -> int:
    """Reference: the longest end of ``text`` that begins some stop (and is shorter than it)."""
    return max((n for s in stops for n in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:n])),
               default=0)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(stops=st.lists(st.text("ab", min_size=1, max_size=5), min_size=1, max_size=3),
       pieces=st.lists(st.text("abc", max_size=4), max_size=12))
def test_stop_scanner_agrees_with_a_search_of_the_whole_text(stops, pieces):
    scanner, text = StopScanner(tuple(stops)), ""
    for piece in pieces:
        text += piece
        cut = scanner.feed(piece)
        ends = [(text.find(s) + len(s), -len(s), text.find(s)) for s in stops if s in text]
        if cut is not None:
            assert ends and text[:len(text) - cut] == text[:min(ends)[2]]      # the first stop to complete
            return
        assert not ends
        assert scanner.held() == _held_back(text, stops)


class _Detok:
    def __init__(self, pieces):
        self.pieces = iter(pieces)

    def push(self, token):
        return next(self.pieces, "")

    def flush(self):
        return ""


def _generation(kind: str, pieces, events) -> Generation:
    job = Job(id="j1", kind=kind, client_id="k", topic="t", request=m.Complete(client_id="k", topic="t", prompt="x"))
    gen = Generation(job, None, None, None, lambda topic, ev: events.append(ev), Config())
    gen.detok, gen.scanner, gen.max_tokens, gen.phase = _Detok(pieces), StopScanner(()), 10**9, "decode"
    return gen


def test_a_text_beyond_a_frame_goes_in_bounded_events():
    piece = "é" * 50_000 + "z" * 50_000                    # 150 kB of UTF-8 per token: 6 MB in all
    events: list = []
    gen = _generation("complete", [piece] * 40, events)
    for i in range(40):
        gen.out_tokens.append(i)
        assert not gen.push(None)
        gen.send_pending()
    gen.finish("length")
    gen.done()
    codec = p.Codec(b"k" * 32)
    for ev in events:
        codec.build(ev, topic=b"t")                            # every event fits in a frame
    tokens = [e for e in events if isinstance(e, m.Token)]
    assert "".join(e.text for e in tokens) == piece * 40
    assert all(m.utf8_len(e.text) <= m.MAX_EVENT_TEXT for e in tokens)
    done = events[-1]
    assert isinstance(done, m.Done) and done.truncated and (piece * 40).startswith(done.text)
    assert m.utf8_len(done.text) <= m.MAX_EVENT_TEXT


def test_a_chat_reply_ends_at_max_text_bytes():
    events: list = []
    gen = _generation("chat", ["ü" * 100_000] * 20, events)
    for i in range(20):
        gen.out_tokens.append(i)
        if gen.push(None):
            break
    assert gen.reason == "length" and gen.text_bytes <= m.MAX_TEXT and m.utf8_len(gen.text) == gen.text_bytes
    assert m.MAX_TEXT - gen.text_bytes < 2

