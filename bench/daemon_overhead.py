"""Decode tokens/s through the daemon vs the engine's own loop, at batch 1 and N (not a test).

Engine peers (in this process, with the daemon's torch thread count unless ``--threads``): sampling
(``Sampler.sample`` at batch 1, ``sample_rows`` over a batch, as the daemon draws) and detokenizing
(``IncrementalDecoder.push``) run in the loop as in the daemon. ``--sampling greedy`` (the default) draws the
argmax without penalties; ``--sampling default`` draws with the daemon's default settings (temperature 1, top_p
0.85, presence and frequency penalties 0.2, a fixed seed per stream), in the engine loops and in the daemon alike.
* batch 1: ``model.forward([token], state)`` per token, and ``BatchDecoder(max_batch=1).step``;
* batch N: ``BatchDecoder(model, max_batch=N)`` stepping N conversations (default buckets): the reference
  the daemon is held to (daemon / BatchDecoder);
* "daemon's buckets": N conversations in a decoder like the daemon's (``max_batch`` of the default config,
  the buckets of the default ``[daemon] batch_invariant``, measured at load where invariant).
Daemon: N clients stream ``Client.complete`` at once from a daemon started in a temporary home; tokens/s =
all tokens / time from the first token event to the last ``Done`` (client-observed: ZeroMQ, signing,
sampling, detokenizing, continuous batching included). The same short prompt (a few tokens, so the
daemon's window holds almost no prefill), the same sampling settings, the same token count (a sampled stream
that draws a stop token ends early: its tokens are counted). On CUDA the engine loops end with
``torch.cuda.synchronize()`` before the clock is read (the daemon's clock is the client's: its events
follow host reads of the sampled tokens).

Models: checkpoint paths, and/or ``--shape NAME`` (an official RWKV-7 shape of ``models/rwkv/shapes.py`` with
random weights, saved to a temporary ``.pth`` that the daemon loads like any file; vocabulary 65536, so
daemon and engine both pick the World tokenizer). Nothing is downloaded. The table is printed at the end.
Random weights give nearly flat logits (0.1B: the top-p 0.85 set of ~20k-34k tokens), so every sampled draw takes
the whole-vocabulary path; ``--head-scale 5`` spreads them as a trained model's are (0.1B: sets of 1-63 tokens, the
likeliest at 0.10-0.92), where the sorted window decides the draws.

    python bench/daemon_overhead.py [--tokens 256] [--batch 1 4] [--out FILE.md] MODEL...
    python bench/daemon_overhead.py --shape 0.1B --strategy "cuda fp16" --batch 1 4 8
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GREEDY = dict(temperature=0.0, alpha_frequency=0.0, alpha_presence=0.0)
SAMPLING = {"greedy": GREEDY, "default": {}}   # "default": SamplerArgs' defaults (the daemon's [sampling])
PROMPT = "The"


def engine_rates(model_path: str, strategy: str, n: int, batches: list[int], repeats: int, threads: int,
                 sampling: dict) -> dict:
    """{"forward": tok/s, ("batch", N): tok/s, ("inv", N): tok/s, "buckets": the daemon-like decoder's buckets,
    "threads": torch threads used} of the engine's own loops (best of ``repeats``; ``threads`` 0 = the
    daemon's automatic choice for the model)."""
    import torch

    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv.decode import BatchDecoder
    from rwkv_chat.models.text.batch_sampling import sample_rows
    from rwkv_chat.models.text.sampling import Sampler, SamplerArgs
    from rwkv_chat.models.text.tokenizers import IncrementalDecoder, load_tokenizer

    from rwkv_chat.daemon.config import Config
    from rwkv_chat.daemon.host import auto_threads, decode_buckets

    model = RWKV(model=model_path, strategy=strategy, verbose=False)
    threads = threads or auto_threads(model)
    torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if any(d.type == "cuda" for d in model.devices) else (lambda: None)
    daemon = Config().daemon
    max_batch = daemon.max_batch
    inv_buckets = decode_buckets(model, max_batch, daemon.batch_invariant)
    tok = load_tokenizer(vocab_size=model.vocab_size, model_path=model_path)
    logits0, state0 = model.forward(tok.encode(PROMPT), None)
    decoders = {("batch", b): BatchDecoder(model, max_batch=b) for b in batches}
    inv = model.decoder(max_batch, inv_buckets)
    decoders.update({("inv", b): inv for b in batches})
    out: dict = {}
    for _ in range(repeats + 1):               # the first round warms up (CUDA graphs, compiled steps)
        sampler, dec = Sampler(SamplerArgs(max_tokens=n, seed=0, **sampling), tok), IncrementalDecoder(tok)
        logits, state = logits0, state0
        t0 = time.perf_counter()
        for _ in range(n):
            t = sampler.sample(logits)
            logits, state = model.forward([t], state)
            dec.push(t)
        sync()
        out["forward"] = max(out.get("forward", 0), n / (time.perf_counter() - t0))
        for b in batches:
            for key in (("batch", b), ("inv", b)):
                bd = decoders[key]
                hs = [bd.add(state0) for _ in range(b)]
                samplers = [Sampler(SamplerArgs(max_tokens=n, seed=k, **sampling), tok) for k in range(b)]
                decs = [IncrementalDecoder(tok) for _ in range(b)]
                lg = {h: logits0 for h in hs}
                t0 = time.perf_counter()
                for _ in range(n):
                    toks = dict(zip(hs, sample_rows(samplers, [lg[h] for h in hs])))
                    lg = bd.step(toks)
                    for h, d in zip(hs, decs):
                        d.push(toks[h])
                sync()
                out[key] = max(out.get(key, 0), b * n / (time.perf_counter() - t0))
                for h in hs:
                    bd.remove(h)
    out["buckets"], out["threads"], out["backend"] = tuple(inv.buckets), threads, str(model.backend)
    return out


def _concurrent(clients, prompt: str, n: int, seen, sampling: dict) -> None:
    """Every client streams one completion of ``n`` tokens at once (client k with seed k); ``seen(client,
    event)`` per event."""
    from rwkv_chat.daemon.protocol import messages as m

    barrier, errors = threading.Barrier(len(clients)), []

    def run(c, k):
        barrier.wait()
        for ev in c.complete(prompt, max_tokens=n, seed=k, **sampling):
            if isinstance(ev, (m.Failed, m.Error)):
                errors.append(ev)
            seen(c, ev)
    threads = [threading.Thread(target=run, args=(c, k)) for k, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"the daemon failed a generation: {errors[0]}")


def daemon_rates(model_path: str, strategy: str, n: int, batches: list[int], repeats: int, sampling: dict) -> dict:
    """{N: tok/s} through a real daemon with N concurrent clients (best of ``repeats``), and "info": the
    daemon's model status (its ``buckets``, ``threads``)."""
    from rwkv_chat.daemon.paths import home_paths
    from rwkv_chat.daemon.protocol import messages as m
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.models import kernels

    home = Path(tempfile.mkdtemp(prefix="rwkv-bench-"))
    paths = home_paths(home)
    paths.cache_dir.mkdir(parents=True, exist_ok=True)     # the engine's kernel builds, not a fresh build
    engine_builds = Path(kernels.default_loader().cache_dir)
    engine_builds.mkdir(parents=True, exist_ok=True)
    (paths.cache_dir / "kernels").symlink_to(engine_builds)
    env, cmd = load_daemon(home, model_path, strategy)
    out: dict = {}
    try:
        clients = [Client(paths, autostart=False).connect() for _ in range(max(batches))]
        t_end = time.monotonic() + 900
        while any(b.get("state") == "building" for b in (clients[0].status().get("model") or {}).get("kernel_build", ())):
            if time.monotonic() > t_end:
                raise SystemExit("the daemon's kernels were still building after 900 s")
            time.sleep(0.5)                    # the daemon serves with its compiled kernels once they are built
        for b in batches:                      # warm-up: every batch size the timed runs meet
            _concurrent(clients[:b], "warm up", 8, lambda c, ev: None, sampling)
        out["info"] = clients[0].status().get("model") or {}
        for _ in range(repeats):
            for b in batches:
                firsts, ends, counts = [], [], []

                def seen(c, ev):
                    if isinstance(ev, m.Token) and ev.seq == 1:
                        firsts.append(time.perf_counter())
                    elif isinstance(ev, m.Done):
                        ends.append(time.perf_counter())
                        counts.append(ev.tokens - 1)     # tokens after the first event
                _concurrent(clients[:b], PROMPT, n, seen, sampling)
                if len(counts) != b:
                    raise SystemExit(f"batch {b}: {len(counts)} of {b} generations finished")
                rate = sum(counts) / (max(ends) - min(firsts))
                out[b] = max(out.get(b, 0), rate)
        for c in clients:
            c.close()
    finally:
        subprocess.run([*cmd, "daemon", "stop"], env=env, capture_output=True)
    return out


def load_daemon(home: Path, model_path: str, strategy: str) -> tuple[dict, list[str]]:
    """``rwkv-chat load MODEL --strategy S`` in ``home`` (it starts the daemon there and returns once the model
    is loaded): ``(env, cmd)`` of the CLI for the later commands (``daemon stop``). SystemExit when it fails."""
    env = {**os.environ, "RWKV_CHAT_HOME": str(home)}
    cmd = [sys.executable, "-m", "rwkv_chat.app.cli"]
    r = subprocess.run([*cmd, "load", model_path, "--strategy", strategy], env=env, capture_output=True, text=True)
    if r.returncode:
        subprocess.run([*cmd, "daemon", "stop"], env=env, capture_output=True)
        raise SystemExit(f"the daemon could not load {model_path}: {r.stderr.strip()[-2000:]}")
    return env, cmd


def bench_models(paths: list[str], shapes: list[str], strategy: str, folder: Path,
                 head_scale: float = 1.0) -> list[tuple[str, str]]:
    """``(name, checkpoint path)`` of each given checkpoint, then of random weights of each official RWKV-7 shape
    (saved in ``folder``: ``random_model``)."""
    models = [(Path(mp).name, mp) for mp in paths]
    scaled = f", head x{head_scale:g}" if head_scale != 1 else ""
    for shape in shapes:
        models.append((f"RWKV-7 {shape} (random weights{scaled})", random_model(shape, strategy, folder, head_scale)))
    return models


def random_model(shape: str, strategy: str, folder: Path, head_scale: float = 1.0) -> str:
    """Save random weights of the official RWKV-7 ``shape`` (fp16; built on the GPU for a CUDA strategy)
    as ``<folder>/rwkv7-<shape>-random.pth``; returns its path. ``head_scale`` multiplies the output head, so the
    logits spread that much wider: random weights give nearly flat distributions, whose sampled draws all take the
    whole-vocabulary path, where a trained model's mostly take the sorted window."""
    import torch

    from rwkv_chat.models.rwkv.shapes import random_checkpoint, save_pth

    dev = "cuda" if "cuda" in strategy and torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if strategy.split()[1:2] == ["fp32"] else torch.float16
    path = folder / f"rwkv7-{shape}-random.pth"
    weights = random_checkpoint(shape, dtype=dtype, device=dev)
    weights["head.weight"] = (weights["head.weight"].float() * head_scale).to(dtype)
    save_pth(weights, path)
    return str(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", help="checkpoint paths (.pth / .safetensors)")
    ap.add_argument("--shape", nargs="+", default=[], help="official RWKV-7 shapes with random weights "
                    "(0.1B, 0.4B, 1.5B, 2.9B, 7.2B)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--strategy", default="cpu fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the engine loops; 0 = the daemon's "
                    "automatic choice for each model (1 below n_embd 512, else min(4, cores))")
    ap.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy",
                    help="greedy (argmax, no penalties) or the daemon's default sampling settings")
    ap.add_argument("--head-scale", type=float, default=1.0,
                    help="multiply the random weights' output head (--shape): logits that much more spread, so a "
                         "sampled draw meets the peaked distributions of a trained model instead of flat ones")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not args.models and not args.shape:
        ap.error("give checkpoint paths and/or --shape")
    import torch

    from rwkv_chat.app.bench import provenance

    tmp = Path(tempfile.mkdtemp(prefix="rwkv-bench-models-"))
    if not (args.head_scale > 0 and math.isfinite(args.head_scale)):
        ap.error("--head-scale must be a finite number above 0")
    models = bench_models(args.models, args.shape, args.strategy, tmp, args.head_scale)
    device = "cuda" if "cuda" in args.strategy else "cpu"
    lines = [*provenance(device=device), "",
             f"Decode tokens/s, {args.tokens} tokens per stream, sampling `{args.sampling}` (sampling + detokenizing "
             f"in every loop), best of {args.repeats}, strategy `{args.strategy}`", "",
             "| model | batch | engine `forward` loop | engine `BatchDecoder` | engine, daemon's buckets | "
             "daemon (N clients) | daemon / BatchDecoder | daemon / forward | daemon / daemon's buckets |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes, summary = [], []
    sampling = SAMPLING[args.sampling]
    try:
        for name, mp in models:
            e = engine_rates(mp, args.strategy, args.tokens, args.batch, args.repeats, args.threads, sampling)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            d = daemon_rates(mp, args.strategy, args.tokens, args.batch, args.repeats, sampling)
            info = d["info"]
            notes.append(f"{name}: daemon decode buckets {tuple(info.get('buckets', ()))}, {info.get('threads')} "
                         f"torch thread(s), backend {info.get('backend')}; engine loops {e['threads']} thread(s), "
                         f"daemon-like buckets {e['buckets']}, backend {e['backend']}")
            summary += [f"| {name} | {b} | {d[b] / e[('batch', b)]:.2f} |" for b in args.batch]
            for b in args.batch:
                fwd = e["forward"] if b == 1 else None
                lines.append(f"| {name} | {b} | {f'{fwd:.0f}' if fwd else '–'} | {e[('batch', b)]:.0f} | "
                             f"{e[('inv', b)]:.0f} | {d[b]:.0f} | {d[b] / e[('batch', b)]:.2f} | "
                             f"{f'{d[b] / fwd:.2f}' if fwd else '–'} | {d[b] / e[('inv', b)]:.2f} |")
                print(lines[-1], file=sys.stderr, flush=True)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    text = "\n".join(lines + [""] + notes + ["", "Daemon / engine `BatchDecoder` (default buckets):", "",
                                              "| model | batch | daemon / engine |", "|---|---:|---:|"]
                     + summary) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
