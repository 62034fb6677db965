"""Per-token time of a generation through the daemon vs calling the engine directly (not a test).

For each model: the direct path runs ``model.forward`` + ``Sampler.sample`` + ``IncrementalDecoder.push``
in this process; the daemon path streams ``Client.complete`` from a daemon started in a temporary home,
timed at the client from the first token event to the ``Done`` event. Greedy decoding, no penalties,
the same prompt and token count. Prints a Markdown table (and writes it with ``--out FILE``).

    python bench/daemon_overhead.py [--tokens 256] [--strategy "cpu fp32"] [--out bench/results/x.md] MODEL...
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GREEDY = dict(temperature=0.0, alpha_frequency=0.0, alpha_presence=0.0)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def direct(model_path: str, strategy: str, n: int, repeats: int) -> list[float]:
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.sampling import Sampler, SamplerArgs
    from rwkv_chat.models.tokenizers import IncrementalDecoder, load_tokenizer

    model = RWKV(model=model_path, strategy=strategy, verbose=False)
    tok = load_tokenizer(vocab_size=model.vocab_size, model_path=model_path)
    out = []
    for _ in range(repeats):
        sampler = Sampler(SamplerArgs(max_tokens=n, **GREEDY), tok)
        dec = IncrementalDecoder(tok)
        logits, state = model.forward(tok.encode(PROMPT), None)
        t0 = time.perf_counter()
        for _ in range(n):
            t = sampler.sample(logits)
            logits, state = model.forward([t], state)
            dec.push(t)
        out.append((time.perf_counter() - t0) / n)
    return out


def via_daemon(model_path: str, strategy: str, n: int, repeats: int) -> tuple[list[float], list[float]]:
    from rwkv_chat.app.paths import home_paths
    from rwkv_chat.daemon import messages as m
    from rwkv_chat.daemon.client import Client

    home = Path(tempfile.mkdtemp(prefix="rwkv-bench-"))
    env = {"RWKV_CHAT_HOME": str(home)}
    cmd = [sys.executable, "-m", "rwkv_chat.app.cli"]
    import os

    subprocess.run([*cmd, "daemon", "start", "--model", model_path, "--strategy", strategy], check=True,
                   env={**os.environ, **env}, capture_output=True)
    client_side, daemon_side = [], []
    try:
        with Client(home_paths(home), autostart=False) as c:
            list(c.complete("warm up", max_tokens=4, **GREEDY))
            for _ in range(repeats):
                first = None
                for ev in c.complete(PROMPT, max_tokens=n, **GREEDY):
                    if isinstance(ev, m.Token) and first is None:
                        first = time.perf_counter()
                    elif isinstance(ev, m.Done):
                        client_side.append((time.perf_counter() - first) / (ev.tokens - 1))
                        daemon_side.append(ev.decode_s / ev.tokens)
    finally:
        subprocess.run([*cmd, "daemon", "stop"], env={**os.environ, **env}, capture_output=True)
    return client_side, daemon_side


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strategy", default="cpu fp32")
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    lines = [f"Daemon overhead, {args.tokens} greedy tokens, median of {args.repeats}, strategy `{args.strategy}`, "
             f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}", "",
             "| model | direct ms/token | daemon (scheduler) ms/token | daemon (client-observed) ms/token | "
             "client-observed / direct |", "|---|---:|---:|---:|---:|"]
    for mp in args.models:
        d = statistics.median(direct(mp, args.strategy, args.tokens, args.repeats))
        cs, ds = via_daemon(mp, args.strategy, args.tokens, args.repeats)
        c, s = statistics.median(cs), statistics.median(ds)
        lines.append(f"| {Path(mp).name} | {d * 1e3:.3f} | {s * 1e3:.3f} | {c * 1e3:.3f} | {c / d:.3f} |")
        print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
