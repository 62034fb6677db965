"""What loading a Hugging Face folder's text side costs: ``load_hf_text`` and its parts (not a test).

Rows (best of ``--repeat`` runs, seconds of wall time; "longest hold" is the longest a second Python thread
waited to run, ticking every 5 ms, while the row ran: the time a daemon's request loop could not answer):

* ``tokenizers.Tokenizer.from_file``: the Rust parse of ``tokenizer.json`` alone (holds the GIL throughout);
* ``load_hf_text``: what a model load pays for the text (tokenizer, chat template, generation defaults);
  the token -> bytes table is decoded per id on first use (``ByteLevelTable``);
* ``eager table (per-id loop)``: the table built up front with one ``id_to_token`` call and translation per
  id, as the loader did before, measured on the already parsed tokenizer (the cost ``load_hf_text`` no longer
  pays);
* ``first decode of every id``: ``token_bytes`` of every id once (the lazy table's total cost, spread over
  generation: one id costs microseconds).

    python bench/text_load.py ../shared/tokenizers/qwen [--vocab-size 151936] [--repeat 3]
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path


class Holds:
    """The longest gap between the ticks of a thread that sleeps 5 ms per tick (seconds), while in the block."""

    def __enter__(self):
        self.longest, self._stop = 0.0, False
        self._thread = threading.Thread(target=self._tick, daemon=True)
        self._thread.start()
        time.sleep(0.02)
        return self

    def _tick(self):
        last = time.perf_counter()
        while not self._stop:
            time.sleep(0.005)
            now = time.perf_counter()
            self.longest, last = max(self.longest, now - last - 0.005), now

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()


def measure(fn, repeat: int) -> tuple[float, float]:
    """(best seconds, longest hold in that run) of ``fn()`` over ``repeat`` runs."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        with Holds() as h:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        best = min(best, (dt, h.longest))
    return best


def eager_table(hf, n: int) -> list[bytes]:
    """The table as the loader built it before: one ``id_to_token`` and translation per id."""
    from rwkv_chat.models.text.tokenizers import _byte_decoder

    alphabet = {ord(c): chr(b) for c, b in _byte_decoder().items()}
    to_bytes = {**{c: chr(0x10FFFF) for c in range(256)}, **alphabet}
    added = hf.get_added_tokens_decoder()
    table = [b""] * n
    for idx in range(n):
        if idx in added:
            table[idx] = added[idx].content.encode("utf-8")
            continue
        token = hf.id_to_token(idx)
        if token is not None:
            table[idx] = token.translate(to_bytes).encode("latin-1")
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--vocab-size", type=int, default=None, help="the model's vocabulary (default: the json's)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer as RustTokenizer

    from rwkv_chat.models.text.hf import load_hf_text

    path = str(args.folder / "tokenizer.json")
    load_hf_text(args.folder, args.vocab_size)                   # imports and file cache warm
    text = load_hf_text(args.folder, args.vocab_size)
    tok = text.tokenizer
    rows = [("tokenizers.Tokenizer.from_file", *measure(lambda: RustTokenizer.from_file(path), args.repeat)),
            ("load_hf_text", *measure(lambda: load_hf_text(args.folder, args.vocab_size), args.repeat)),
            ("eager table (per-id loop)", *measure(lambda: eager_table(tok._hf, tok.vocab_size), args.repeat))]

    fresh = [load_hf_text(args.folder, args.vocab_size).tokenizer for _ in range(args.repeat)]

    def first_decode():
        t = fresh.pop()
        for i in range(t.vocab_size):
            t.token_bytes(i)

    rows.append(("first decode of every id", *measure(first_decode, args.repeat)))
    print(f"{args.folder} ({tok.vocab_size:,} ids)\n")
    print("| step | seconds | longest hold (s) |\n|---|---:|---:|")
    for name, s, hold in rows:
        print(f"| {name} | {s:.3f} | {hold:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
