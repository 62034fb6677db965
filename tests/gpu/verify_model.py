"""Whole-model check on a GPU: the tiny models' logits under ``cuda fp16`` / ``cuda fp16i8`` with the
compiled kernels (models loaded with ``kernels=True``), against the CPU fp32 engine (run on a GPU machine).

    python tests/gpu/verify_model.py --models ../shared/models [--cache DIR] [--out results.md]
    python tests/gpu/verify_model.py --pip-shapes 0.1B 1.5B [--out results.md]

For each model and strategy it reports ‖logits − ref‖ / ‖ref‖ over a 64-token sequence (full_output)
and for the next single token, with the CUDA kernels (``kernels=True``) and with the torch paths
(``kernels=False``), so the kernels' share of the fp16 error is visible.

``--pip-shapes``: the whole model with the compiled kernels and fused paths (``cuda fp16``) against the
``rwkv`` pip package 0.8.32 with its CUDA kernels (``RWKV_CUDA_ON=1``, ``RWKV_V7_ON=1``, in its own
process) on random weights of the named RWKV-7 shapes: logits of a 48-token prompt, then 16 decode
steps fed the reference's greedy tokens (teacher forcing), and how often both pick the same token.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.app.bench import provenance  # noqa: E402
from rwkv_chat.models import RWKV, kernels  # noqa: E402
from rwkv_chat.models.rwkv import shapes  # noqa: E402
from rwkv_chat.models.rwkv.decode import BatchDecoder  # noqa: E402

NAMES = ["tiny-rwkv-4v0-660K.pth", "tiny-rwkv-5v1-730K.pth", "tiny-rwkv-5v2-730K.pth", "tiny-rwkv-6v0-1m.pth",
         "tiny-rwkv-7v0-834K.pth"]


def run(model, tokens):
    seq, state = model.forward(tokens, None, full_output=True)
    one, _ = model.forward([tokens[-1]], state)
    return seq.float().cpu(), one.float().cpu()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


_PIP = r'''
import json, sys, torch
req = json.loads(sys.argv[1])
from rwkv.model import RWKV
m = RWKV(model=req["model"], strategy="cuda fp16")
logits, st = m.forward(req["prompt"], None)
out = {"prompt": logits.float().cpu(), "steps": [], "tokens": []}
for _ in range(req["steps"]):
    tok = int(torch.argmax(logits))
    out["tokens"].append(tok)
    logits, st = m.forward([tok], st)
    out["steps"].append(logits.float().cpu())
torch.save(out, req["out"])
'''


def pip_check(names: list[str]) -> list[str]:
    """Our engine (compiled kernels, fused paths) vs rwkv 0.8.32 with RWKV_CUDA_ON=1 on random weights."""
    lines = [*provenance(), "",
             "| shape | prompt logits rel. err | worst step logits rel. err (16 steps) | same greedy token | our paths |",
             "|---|---|---|---|---|"]
    kernels.ensure_built("cuda")
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 65536, (48,), generator=g).tolist()
    for name in names:
        w = shapes.random_checkpoint(name, dtype=torch.float16, device="cuda", seed=1)
        tmp = Path(tempfile.mkdtemp(prefix="rwkv-pip-"))
        pth = shapes.save_pth(w, tmp / "m.pth")
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1", RWKV_JIT_ON="1")
        req = {"model": str(pth)[:-4], "prompt": prompt, "steps": 16, "out": str(tmp / "ref.pt")}
        r = subprocess.run([sys.executable, "-c", _PIP, json.dumps(req)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            lines.append(f"| {name} | reference failed: {r.stderr.strip().splitlines()[-1][:200] if r.stderr.strip() else r.returncode} | - | - | - |")
            print(lines[-1], flush=True)
            continue
        ref = torch.load(tmp / "ref.pt")
        model = RWKV(model=w, strategy="cuda fp16")
        del w
        logits, st = model.forward(prompt, None)
        e_prompt = rel(logits.float().cpu(), ref["prompt"])
        dec = BatchDecoder(model, max_batch=1)
        h = dec.add(st)
        worst, same, ours = 0.0, 0, int(torch.argmax(logits))
        for i, tok in enumerate(ref["tokens"]):
            same += int(ours == tok)
            out = dec.step({h: tok})[h].float().cpu()
            worst = max(worst, rel(out, ref["steps"][i]))
            ours = int(torch.argmax(out))
        paths = f"backend {model.backend.name}, decode {'fused' if dec.fused else 'compiled'}"
        lines.append(f"| {name} | {e_prompt:.2e} | {worst:.2e} | {same}/{len(ref['tokens'])} | {paths} |")
        print(lines[-1], flush=True)
        del model, dec
        torch.cuda.empty_cache()
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=None)
    ap.add_argument("--pip-shapes", nargs="*", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.pip_shapes:
        table = "\n".join(pip_check(args.pip_shapes))
        print(table)
        if args.out:
            Path(args.out).write_text(table + "\n")
        return 0
    loader = kernels.KernelLoader(cache_dir=args.cache, progress=print)
    print(loader.ensure_built("cuda"), flush=True)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (64,), generator=g).tolist()
    lines = [*provenance(), "",
             "| model | strategy | kernels | seq rel. err vs cpu fp32 | next-token rel. err |", "|---|---|---|---|---|"]
    worst = 0.0
    for name in NAMES:
        path = Path(args.models) / name
        ref_seq, ref_one = run(RWKV(model=str(path), strategy="cpu fp32", kernels=False), tokens)
        for strategy in ("cuda fp16", "cuda fp16i8"):
            for on in (True, False):
                try:
                    seq, one = run(RWKV(model=str(path), strategy=strategy, kernels=on), tokens)
                    e1, e2 = rel(seq, ref_seq), rel(one, ref_one)
                    cells = f"{e1:.2e} | {e2:.2e}"
                    if on:
                        worst = max(worst, e1, e2)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    cells = f"ERROR {type(e).__name__}: {str(e)[:100]} | -"
                lines.append(f"| {name} | {strategy} | {'compiled' if on else 'torch'} | {cells} |")
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
