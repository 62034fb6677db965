"""Streaming layers from pinned CPU memory (``*N+``): decode speed and achieved copy bandwidth on one GPU.

    python bench/streaming.py --shape 7.2B --resident 8 16 24 --tokens 32 [--md bench/results/h200.md]

A random RWKV-7 of the official shape (``rwkv_chat.models.rwkv.shapes``) runs first fully resident
(``cuda fp16``), then as ``cuda fp16 *N+`` for each N. Per run: batch-1 decode tok/s (``BatchDecoder.step``
with the argmax fed back by the host, as the daemon does), bytes the streamer copied per token
(``LayerStreamer.copied_bytes``), achieved GB/s = bytes per token × tok/s, against the pinned host-to-device
copy rate measured in the same run (1 GiB pinned buffer, median of 10 copies). Correctness: the prompt's
logits against the resident model's (max |diff| relative to the largest |logit|: fp16 tolerance 2e-2) and
the greedy tokens of both (reported; random weights have near-ties that fp16 rounding may flip). The table is printed (and appended to ``--md``) with the command that made it.
Imports and parses on a CPU-only machine (``--help``); running needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch


def h2d_rate(dev: torch.device, nbytes: int = 1 << 30) -> float:
    """Pinned host-to-device copy rate, GB/s, median of 10 copies of ``nbytes``."""
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    times = []
    for i in range(13):
        torch.cuda.synchronize(dev)
        t = time.perf_counter()
        dst.copy_(host, non_blocking=True)
        torch.cuda.synchronize(dev)
        if i >= 3:
            times.append(time.perf_counter() - t)
    del host, dst
    return nbytes / statistics.median(times) / 1e9


def decode(model, prompt: list[int], tokens: int) -> dict:
    """Prompt logits, greedy tokens and batch-1 tok/s through the model's batched decoder."""
    from rwkv_chat.models.rwkv.decode import BatchDecoder

    dev = model.devices[-1]
    logits, state = model.forward(prompt, None)
    dec = BatchDecoder(model, max_batch=1)
    h = dec.add(state)
    tok = int(torch.argmax(logits))
    out = [tok]
    for _ in range(3):                                       # warm up (graph capture on the resident model)
        dec.step({h: tok})
    dec.remove(h)
    h = dec.add(state)
    streamer = getattr(model, "streamer", None)
    copied0 = streamer.copied_bytes if streamer is not None else 0
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(tokens):
        lg = dec.step({h: tok})[h]
        tok = int(torch.argmax(lg))
        out.append(tok)
    torch.cuda.synchronize(dev)
    dt = time.perf_counter() - t
    copied = (streamer.copied_bytes - copied0) if streamer is not None else 0
    return {"logits": logits.float().cpu(), "tokens": out, "tok_s": tokens / dt, "bytes_per_token": copied / tokens,
            "graphs": dec.graphs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7.2B", choices=["0.1B", "0.4B", "1.5B", "2.9B", "7.2B"])
    ap.add_argument("--resident", type=int, nargs="+", default=[8, 16, 24], metavar="N",
                    help="resident layers of the '*N+' runs (default 8 16 24)")
    ap.add_argument("--tokens", type=int, default=32, help="timed decode steps per run (default 32)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--md", metavar="FILE", help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/streaming.py needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.plan import human
    from rwkv_chat.models.rwkv.shapes import random_checkpoint

    dev = torch.device(args.device)
    w = random_checkpoint(args.shape, torch.float16, device=dev)
    w = {k: v.cpu() for k, v in w.items()}                    # built on the GPU (fast), kept on the host
    rate = h2d_rate(dev)
    prompt = [(i * 131) % 65536 for i in range(64)]
    rows = []
    ref = RWKV(w, f"{args.device} fp16")
    base = decode(ref, prompt, args.tokens)
    rows.append((f"{args.device} fp16", base["tok_s"], 0.0, 0.0, 0.0, "-", "-", base["graphs"]))
    del ref
    gc.collect()
    torch.cuda.empty_cache()
    scale = float(base["logits"].abs().max())
    for n in args.resident:
        strategy = f"{args.device} fp16 *{n}+"
        m = RWKV(w, strategy)
        r = decode(m, prompt, args.tokens)
        diff = float((r["logits"] - base["logits"]).abs().max()) / scale
        gbs = r["bytes_per_token"] * r["tok_s"] / 1e9
        rows.append((strategy, r["tok_s"], r["bytes_per_token"], gbs, gbs / rate,
                     f"{diff:.1e}{'' if diff <= 2e-2 else ' FAIL'}",
                     "equal" if r["tokens"] == base["tokens"] else "DIFFER", r["graphs"]))
        del m
        gc.collect()
        torch.cuda.empty_cache()
    name = torch.cuda.get_device_name(dev)
    lines = [f"### Streaming from pinned memory, RWKV-7 {args.shape}, {name}",
             f"`python bench/streaming.py {' '.join(sys.argv[1:] if argv is None else argv)}`; pinned host-to-device "
             f"copy: {rate:.1f} GB/s", "",
             "| strategy | tok/s (batch 1) | copied/token | achieved GB/s | of copy rate | logits rel. diff | greedy "
             "| graphs |", "|---|---|---|---|---|---|---|---|"]
    for s, tps, b, gbs, frac, diff, same, graphs in rows:
        lines.append(f"| {s} | {tps:.2f} | {human(int(b))} | {gbs:.1f} | {frac:.0%} | {diff} | {same} | {graphs} |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text + "\n\n")
    return 0 if all("FAIL" not in r[5] for r in rows) else 1     # greedy tokens: reported (fp16 near-ties)


if __name__ == "__main__":
    sys.exit(main())
