"""Whole-model check on a GPU: the tiny models' logits under ``cuda fp16`` / ``cuda fp16i8`` with the
compiled kernels installed, against the CPU fp32 engine (run on a GPU machine).

    python tests/gpu/verify_model.py --models ../shared/models [--cache DIR] [--out results.md]

For each model and strategy it reports ‖logits − ref‖ / ‖ref‖ over a 64-token sequence (full_output)
and for the next single token, with the CUDA kernels installed and with the torch paths, so the
kernels' share of the fp16 error is visible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.models import RWKV, kernels, quant, wkv  # noqa: E402

NAMES = ["tiny-rwkv-4v0-660K.pth", "tiny-rwkv-5v1-730K.pth", "tiny-rwkv-5v2-730K.pth", "tiny-rwkv-6v0-1m.pth",
         "tiny-rwkv-7v0-834K.pth"]
TORCH_PATHS = (wkv.wkv4, wkv.wkv5, wkv.wkv7, quant.mm8)


def run(model, tokens):
    seq, state = model.forward(tokens, None, full_output=True)
    one, _ = model.forward([tokens[-1]], state)
    return seq.float().cpu(), one.float().cpu()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def use_kernels(on: bool):
    if on:
        kernels.install()
    else:
        wkv.wkv4, wkv.wkv5, wkv.wkv7, quant.mm8 = TORCH_PATHS


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", required=True)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    loader = kernels.KernelLoader(cache_dir=args.cache, progress=print)
    print(loader.ensure_built("cuda"), flush=True)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 256, (64,), generator=g).tolist()
    lines = [f"GPU: {torch.cuda.get_device_name()}", "",
             "| model | strategy | kernels | seq rel. err vs cpu fp32 | next-token rel. err |", "|---|---|---|---|---|"]
    worst = 0.0
    for name in NAMES:
        path = Path(args.models) / name
        use_kernels(False)
        ref_seq, ref_one = run(RWKV(model=str(path), strategy="cpu fp32"), tokens)
        for strategy in ("cuda fp16", "cuda fp16i8"):
            for on in (True, False):
                use_kernels(on)
                try:
                    seq, one = run(RWKV(model=str(path), strategy=strategy), tokens)
                    e1, e2 = rel(seq, ref_seq), rel(one, ref_one)
                    cells = f"{e1:.2e} | {e2:.2e}"
                    if on:
                        worst = max(worst, e1, e2)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    cells = f"ERROR {type(e).__name__}: {str(e)[:100]} | -"
                lines.append(f"| {name} | {strategy} | {'compiled' if on else 'torch'} | {cells} |")
                print(lines[-1], flush=True)
    use_kernels(False)
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
