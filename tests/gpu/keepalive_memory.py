"""Keep-alive on a GPU: how much device memory an unloaded model gives back, and what loading it again costs
(run on a CUDA machine).

    python tests/gpu/keepalive_memory.py [--shape 0.4B] [--strategy "cuda fp16"] [--out results.md]

Builds a random RWKV-7 checkpoint of the named official shape (``models/rwkv/shapes.py``) in a temp folder,
loads it through the daemon's model host (``Host.load``), unloads it as keep-alive does (``Host.unload``),
and loads it again (``Host.reload``), printing ``torch.cuda.memory_allocated`` / ``memory_reserved`` and the
seconds of each step as a table. Expected: after the unload both are back to (about) what they were before
the first load; the reload takes about as long as the first load (from the page cache).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.4B", help="official RWKV-7 shape (0.1B, 0.4B, 1.5B, 2.9B, 7.2B)")
    ap.add_argument("--strategy", default="cuda fp16")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("keepalive_memory: needs a CUDA device (nothing measured)")
        return 0
    from rwkv_chat.daemon.host import Host
    from rwkv_chat.models.rwkv.shapes import random_checkpoint, save_pth

    rows = []

    def measure(step: str, seconds: float) -> None:
        torch.cuda.synchronize()
        rows.append((step, torch.cuda.memory_allocated() / 2**20, torch.cuda.memory_reserved() / 2**20, seconds))

    with tempfile.TemporaryDirectory() as tmp:
        path = save_pth(random_checkpoint(args.shape, device="cuda"), Path(tmp) / f"rwkv7-{args.shape}.pth")
        torch.cuda.empty_cache()
        measure("before", 0.0)
        host = Host()
        t = time.perf_counter()
        host.load(str(path), args.strategy, max_batch=4, batch_invariant=False)
        measure("loaded", time.perf_counter() - t)
        t = time.perf_counter()
        host.unload("keep-alive")
        measure("unloaded (keep-alive)", time.perf_counter() - t)
        t = time.perf_counter()
        host.reload()
        measure("loaded again", time.perf_counter() - t)
        host.close()
    lines = [f"RWKV-7 {args.shape}, strategy {args.strategy!r}, {torch.cuda.get_device_name()}", "",
             "| step | allocated MiB | reserved MiB | seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {s} | {a:,.0f} | {r:,.0f} | {sec:.2f} |" for s, a, r, sec in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    before, _, unloaded, _ = rows[0], rows[1], rows[2], rows[3]
    ok = unloaded[1] <= before[1] + 64           # MiB: the weights are gone
    print("unload frees the weights:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
