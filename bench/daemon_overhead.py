"""Decode tokens/s through the daemon vs the engine's own loop, at batch 1 and N (not a test).

Engine peers (in this process, the daemon's thread count): sampling (``Sampler.sample``, greedy, no
penalties) and detokenizing (``IncrementalDecoder.push``) run in the loop as in the daemon.
* batch 1: ``model.forward([token], state)`` per token, and ``BatchDecoder(max_batch=1).step``;
* batch N: ``BatchDecoder(model, max_batch=N)`` stepping N conversations (default buckets);
* "invariant": N conversations in the daemon's own decoder (``max_batch`` of the default config, the buckets
  of ``[daemon] batch_invariant``: on CPU no step runs fewer than 4 rows), the ceiling the daemon can reach.
Daemon: N clients stream ``Client.complete`` at once from a daemon started in a temporary home; tokens/s =
all tokens / time from the first token event to the last ``Done`` (client-observed: ZeroMQ, signing,
sampling, detokenizing, continuous batching included). The same prompt, greedy, the same token count.

    python bench/daemon_overhead.py [--tokens 256] [--batch 1 4] [--out bench/results/daemon_overhead_cpu.md] MODEL...
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GREEDY = dict(temperature=0.0, alpha_frequency=0.0, alpha_presence=0.0)
PROMPT = "The quick brown fox jumps over the lazy dog. " * 4


def engine_rates(model_path: str, strategy: str, n: int, batches: list[int], repeats: int) -> dict:
    """{"forward": tok/s, ("batch", N): tok/s} of the engine's own loops (best of ``repeats``)."""
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.decode import BatchDecoder
    from rwkv_chat.models.sampling import Sampler, SamplerArgs
    from rwkv_chat.models.tokenizers import IncrementalDecoder, load_tokenizer

    from rwkv_chat.app.config import Config
    from rwkv_chat.daemon.runner import decode_buckets

    model = RWKV(model=model_path, strategy=strategy, verbose=False)
    max_batch = Config().daemon.max_batch
    inv_buckets = decode_buckets(model, max_batch, True)
    tok = load_tokenizer(vocab_size=model.vocab_size, model_path=model_path)
    logits0, state0 = model.forward(tok.encode(PROMPT), None)
    out: dict = {}
    for _ in range(repeats):
        sampler, dec = Sampler(SamplerArgs(max_tokens=n, **GREEDY), tok), IncrementalDecoder(tok)
        logits, state = logits0, state0
        t0 = time.perf_counter()
        for _ in range(n):
            t = sampler.sample(logits)
            logits, state = model.forward([t], state)
            dec.push(t)
        out["forward"] = max(out.get("forward", 0), n / (time.perf_counter() - t0))
        for b in batches:
            for key, bd in ((("batch", b), BatchDecoder(model, max_batch=b)),
                            (("inv", b), BatchDecoder(model, max_batch=max_batch, buckets=inv_buckets))):
                hs = [bd.add(state0) for _ in range(b)]
                samplers = [Sampler(SamplerArgs(max_tokens=n, **GREEDY), tok) for _ in range(b)]
                decs = [IncrementalDecoder(tok) for _ in range(b)]
                lg = {h: logits0 for h in hs}
                t0 = time.perf_counter()
                for _ in range(n):
                    toks = {h: s.sample(lg[h]) for h, s in zip(hs, samplers)}
                    lg = bd.step(toks)
                    for h, d in zip(hs, decs):
                        d.push(toks[h])
                out[key] = max(out.get(key, 0), b * n / (time.perf_counter() - t0))
    return out


def daemon_rates(model_path: str, strategy: str, n: int, batches: list[int], repeats: int) -> dict:
    """{N: tok/s} through a real daemon with N concurrent clients (best of ``repeats``)."""
    from rwkv_chat.app.paths import home_paths
    from rwkv_chat.daemon import messages as m
    from rwkv_chat.daemon.client import Client

    home = Path(tempfile.mkdtemp(prefix="rwkv-bench-"))
    env = {**os.environ, "RWKV_CHAT_HOME": str(home)}
    cmd = [sys.executable, "-m", "rwkv_chat.app.cli"]
    subprocess.run([*cmd, "load", model_path, "--strategy", strategy], check=True, env=env, capture_output=True)
    out: dict = {}
    try:
        paths = home_paths(home)
        clients = [Client(paths, autostart=False).connect() for _ in range(max(batches))]
        list(clients[0].complete("warm up", max_tokens=8, **GREEDY))
        for _ in range(repeats):
            for b in batches:
                firsts, ends, counts = [], [], []
                barrier = threading.Barrier(b)

                def run(c):
                    barrier.wait()
                    for ev in c.complete(PROMPT, max_tokens=n, **GREEDY):
                        if isinstance(ev, m.Token) and ev.seq == 1:
                            firsts.append(time.perf_counter())
                        elif isinstance(ev, m.Done):
                            ends.append(time.perf_counter())
                            counts.append(ev.tokens - 1)     # tokens after the first event
                threads = [threading.Thread(target=run, args=(clients[i],)) for i in range(b)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                rate = sum(counts) / (max(ends) - min(firsts))
                out[b] = max(out.get(b, 0), rate)
        for c in clients:
            c.close()
    finally:
        subprocess.run([*cmd, "daemon", "stop"], env=env, capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--strategy", default="cpu fp32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the engine loops (the daemon's "
                    "auto choice for these models is 1)")
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    lines = [f"Decode tokens/s, {args.tokens} greedy tokens per stream (sampling + detokenizing in every loop), best "
             f"of {args.repeats}, strategy `{args.strategy}`, {platform.machine()} {os.cpu_count()} cores, "
             f"{args.threads} torch thread(s), torch {torch.__version__}", "",
             "| model | batch | engine `forward` loop | engine `BatchDecoder` | engine, daemon's buckets | "
             "daemon (N clients) | daemon / BatchDecoder | daemon / forward | daemon / daemon's buckets |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mp in args.models:
        e = engine_rates(mp, args.strategy, args.tokens, args.batch, args.repeats)
        d = daemon_rates(mp, args.strategy, args.tokens, args.batch, args.repeats)
        for b in args.batch:
            fwd = e["forward"] if b == 1 else None
            lines.append(f"| {Path(mp).name} | {b} | {f'{fwd:.0f}' if fwd else '–'} | {e[('batch', b)]:.0f} | "
                         f"{e[('inv', b)]:.0f} | {d[b]:.0f} | {d[b] / e[('batch', b)]:.2f} | "
                         f"{f'{d[b] / fwd:.2f}' if fwd else '–'} | {d[b] / e[('inv', b)]:.2f} |")
            print(lines[-1], file=sys.stderr)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
