"""CPU decode/prefill: the engine (fused CPU call) against the reference ``rwkv`` 0.8.32, 1 and 2 threads.

    python bench/cpu_fused.py [--tiny DIR] [--shape 0.1B] [--strategy "cpu fp32"] [--repeats 3] [--md FILE]

For every tiny model in DIR (and the RWKV-7 0.1B shape with random weights) and for torch threads 1 and
2: decode tok/s through ``RWKV.forward`` one token at a time (greedy, the drop-in API the reference
offers) and through ``BatchDecoder`` at batch 1 (the daemon's path), prefill tok/s (``forward`` of a
prompt), each the median of ``--repeats`` runs. The reference runs in its own process on the same
weights and strategy (``cpu fp32`` or ``cpu fp32i8``; its RWKV-7 takes no i8, so ``cpu fp32`` there), with
RWKV_JIT_ON=0 and =1 (its v7 class is TorchScript either way), timed the same way.
The machine may be shared: the medians damp, but do not remove, other processes' noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

_REF = r'''
import json, os, sys, time, statistics
req = json.loads(sys.argv[1])
out = os.fdopen(os.dup(1), "w"); os.dup2(2, 1); sys.stdout = sys.stderr
import torch
torch.set_num_threads(req["threads"])
from rwkv.model import RWKV
m = RWKV(model=req["model"], strategy=req["strategy"])
res = {"decode": [], "prefill": []}
for _ in range(req["repeats"]):
    logits, st = m.forward([1, 2, 3, 4], None)
    t = time.perf_counter()
    for _ in range(req["tokens"]):
        logits, st = m.forward([int(torch.argmax(logits))], st)
    res["decode"].append(req["tokens"] / (time.perf_counter() - t))
    ids = [(i * 131) % req["vocab"] for i in range(req["prompt"])]
    t = time.perf_counter(); m.forward(ids, None); res["prefill"].append(req["prompt"] / (time.perf_counter() - t))
print(json.dumps(res), file=out, flush=True)
'''


def reference_strategy(strategy: str, v7: bool) -> str:
    """The reference's strategy for ours: the same, except that its RWKV-7 class takes only float dtypes
    (fp16 / fp32 / bf16), so an i8 RWKV-7 is measured against its ``cpu fp32``."""
    return "cpu fp32" if v7 and "i8" in strategy else strategy


def reference(pth: Path, v7: bool, threads: int, jit: bool, tokens: int, prompt: int, vocab: int,
              repeats: int, strategy: str = "cpu fp32") -> dict:
    env = dict(os.environ, RWKV_JIT_ON="1" if jit else "0", RWKV_CUDA_ON="0")
    if v7:
        env["RWKV_V7_ON"] = "1"
    model = str(pth)[:-4] if v7 else str(pth)
    req = {"model": model, "threads": threads, "tokens": tokens, "prompt": prompt, "vocab": vocab,
           "repeats": repeats, "strategy": reference_strategy(strategy, v7)}
    p = subprocess.run([sys.executable, "-c", _REF, json.dumps(req)], env=env, text=True, capture_output=True,
                       timeout=1800)
    try:
        r = json.loads(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (p.stderr or p.stdout)[-300:]}
    return {"decode": statistics.median(r["decode"]), "prefill": statistics.median(r["prefill"])}


def ours(model, threads: int, tokens: int, prompt: int, repeats: int) -> dict:
    from rwkv_chat.models.rwkv.decode import BatchDecoder

    torch.set_num_threads(threads)
    fwd, dec, pre = [], [], []
    ids = [(i * 131) % model.vocab_size for i in range(prompt)]
    for _ in range(repeats):
        logits, st = model.forward([1, 2, 3, 4], None)
        s0, l0 = st, logits
        t = time.perf_counter()
        for _ in range(tokens):
            logits, st = model.forward([int(torch.argmax(logits))], st)
        fwd.append(tokens / (time.perf_counter() - t))
        d = BatchDecoder(model, max_batch=1)
        h = d.add(s0)
        logits = l0
        t = time.perf_counter()
        for _ in range(tokens):
            logits = d.step({h: int(torch.argmax(logits))})[h]
        dec.append(tokens / (time.perf_counter() - t))
        model.forward(ids[:8], None)
        t = time.perf_counter()
        model.forward(ids, None)
        pre.append(prompt / (time.perf_counter() - t))
    return {"forward": statistics.median(fwd), "decoder": statistics.median(dec), "prefill": statistics.median(pre)}


def main(argv=None) -> int:
    from rwkv_chat.app.bench import provenance
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv import shapes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "models"))
    ap.add_argument("--shape", default="0.1B", help="RWKV-7 shape with random weights ('' to skip)")
    ap.add_argument("--only", nargs="*", help="substrings of the tiny model names to run")
    ap.add_argument("--strategy", default="cpu fp32", choices=["cpu fp32", "cpu fp32i8"],
                    help="the strategy of both engines (default: cpu fp32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--md", help="append the table to this markdown file")
    args = ap.parse_args(argv)
    jobs = []
    for p in sorted(Path(args.tiny).glob("tiny-rwkv-*.pth")):
        if not args.only or any(s in p.name for s in args.only):
            jobs.append((p.name, p, None))
    if args.shape:
        jobs.append((f"RWKV-7 {args.shape} (random)", None, args.shape))
    rows = []
    for name, path, shape in jobs:
        tmp = None
        if shape:
            w = shapes.random_checkpoint(shape, dtype=torch.float32)
            tmp = Path(tempfile.mkdtemp(prefix="rwkv-cpu-bench-")) / f"rwkv7-{shape}.pth"
            shapes.save_pth(w, tmp)
            model, pth, tokens, prompt = RWKV(w, args.strategy), tmp, 24, 128
            del w
        else:
            model, pth, tokens, prompt = RWKV(path, args.strategy), path, 300, 256
        for th in args.threads:
            o = ours(model, th, tokens, prompt, args.repeats)
            refs = {jit: reference(pth, model.version == "7", th, jit, tokens, prompt, model.vocab_size,
                                   args.repeats, args.strategy) for jit in (False, True)}
            row = {"model": name, "threads": th, **o, "fused": model.fused_cpu is not None,
                   "ref_jit0": refs[False], "ref_jit1": refs[True]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        if tmp:
            tmp.unlink(missing_ok=True)
    lines = [*provenance(device="cpu"), "",
             f"`{args.strategy}`; each number the median of {args.repeats} runs; decode: greedy, one token per `forward` "
             "call (300 tokens, 24 for a random shape), and `BatchDecoder` at batch 1; prefill: one `forward` of 256 "
             "tokens (128 for a random shape); the reference `rwkv` 0.8.32 in its own process with RWKV_JIT_ON=0 "
             "and =1, the better of the two the ratio's denominator"
             + (" (its RWKV-7 takes no i8: `cpu fp32` there)" if "i8" in args.strategy else ""), "",
             "| model | threads | ours forward tok/s | ours BatchDecoder tok/s | ref JIT=0 | ref JIT=1 | "
             "decode ratio (forward / best ref) | ours prefill tok/s | ref prefill (best) | prefill ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        refs = [x for x in (r["ref_jit0"], r["ref_jit1"]) if "decode" in x]
        best_d = max((x["decode"] for x in refs), default=float("nan"))
        best_p = max((x["prefill"] for x in refs), default=float("nan"))
        f = lambda x: f"{x['decode']:.0f}" if "decode" in x else "error"  # noqa: E731
        lines.append(f"| {r['model']} | {r['threads']} | {r['forward']:.1f} | {r['decoder']:.1f} | {f(r['ref_jit0'])} | "
                     f"{f(r['ref_jit1'])} | {r['forward'] / best_d:.2f}x | {r['prefill']:.0f} | {best_p:.0f} | "
                     f"{r['prefill'] / best_p:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.md:
        with open(args.md, "a") as fh:
            fh.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
