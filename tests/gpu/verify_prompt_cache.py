"""The shared prompt states' device tier on a GPU (run on a CUDA machine; ``--device cpu`` runs the same checks
on the CPU with ``PromptCache(cpu_device=True)``, the copy checks left out).

    python tests/gpu/verify_prompt_cache.py [--device cuda] [--rwkv-shape 0.1B] [--out results.md]

For a random RWKV-7 checkpoint (``models/rwkv/shapes.py``, strategy ``"<device> fp16"``) and a random tiny
Qwen2 folder (``models/qwen2/shapes.py``, ``"<device> bf16"``), four prefix states are put into a
``PromptCache`` whose budgets hold two states on the device, one in RAM and all on disk. Checked:

* the tiers hold 2 / 1 / 4 states, and the device tier's bytes are exactly two states' ``nbytes``;
* a device hit returns the stored tensors' values on the model's devices and dtypes, with no host-to-device
  copy (``torch.profiler``: no "Memcpy HtoD" event), while a RAM hit copies (such events seen);
* promotion: the RAM hit moves the state to the device tier (a second get is a device hit);
* ``release_device`` empties the device tier and gives its memory back (``torch.cuda.memory_allocated``
  drops by at least the tier's bytes), the states then served from RAM or disk, equal to the originals.

Prints a table (seconds of a device hit, a RAM hit and a disk hit, the copies seen) and exits 1 on a failed check.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _same(a, b) -> bool:
    return all(x.device == y.device and x.dtype == y.dtype and bool((x == y).all())
               for la, lb in zip(a.layers, b.layers) for x, y in zip(la, lb))


_WARM: list = []


def _htod(fn, cuda: bool) -> tuple[object, float, int | None]:
    """``fn()``'s result, its seconds, and the host-to-device copies the profiler saw (None on the CPU)."""
    import torch

    if not cuda:
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t, None
    from torch.profiler import ProfilerActivity, profile

    if not _WARM:                      # the profiler's first start takes seconds: not part of any timing
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            torch.zeros(1, device="cuda").add_(1)
        _WARM.append(True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    return out, seconds, sum("HtoD" in e.name for e in prof.events())


def check(name: str, model, tmp: Path, cuda: bool) -> tuple[list, list[str]]:
    import torch

    from rwkv_chat.daemon.prompt_cache import PromptCache

    states = []
    for k in range(4):
        tokens = list(range(100 + k, 164 + k))
        states.append((tokens, model.forward(tokens, None)[1].clone()))
    size = states[0][1].nbytes()
    cache = PromptCache(tmp / name, ram_bytes=int(1.5 * size), disk_bytes=1 << 34, device_bytes=int(2.5 * size),
                        cpu_device=not cuda)
    for tokens, st in states:
        cache.put(model, tokens, st)
    fails, rows = [], []
    s = cache.stats()
    if (s["device_entries"], s["ram_entries"], s["disk_entries"]) != (2, 1, 4) or s["device_bytes"] != 2 * size:
        fails.append(f"{name}: tiers after 4 puts: {s}")
    got, sec, copies = _htod(lambda: cache.get(model, states[3][0]), cuda)
    rows.append((name, "device hit", sec, copies))
    if got is None or not _same(got, states[3][1]) or cache.stats()["hits"]["device"] != 1:
        fails.append(f"{name}: the device hit is not the stored state")
    if copies:
        fails.append(f"{name}: a device hit copied from the host ({copies} HtoD events)")
    got, sec, ram_copies = _htod(lambda: cache.get(model, states[1][0]), cuda)
    rows.append((name, "RAM hit", sec, ram_copies))
    if got is None or not _same(got, states[1][1]) or cache.stats()["hits"]["ram"] != 1:
        fails.append(f"{name}: the RAM hit is not the stored state")
    if cuda and not ram_copies:
        fails.append(f"{name}: the profiler saw no copy of a RAM hit either: the copy check proves nothing")
    if cache.get(model, states[1][0]) is None or cache.stats()["hits"]["device"] != 2:
        fails.append(f"{name}: the RAM hit was not promoted to the device tier")
    before = torch.cuda.memory_allocated() if cuda else 0
    held = cache.stats()["device_bytes"]
    cache.release_device()
    freed = before - torch.cuda.memory_allocated() if cuda else held
    s = cache.stats()
    if s["device_entries"] or s["device_bytes"] or freed < held:
        fails.append(f"{name}: release_device left {s['device_entries']} states, freed {freed} of {held} bytes")
    cold = PromptCache(tmp / name, ram_bytes=0, disk_bytes=1 << 34, device_bytes=int(2.5 * size),
                       cpu_device=not cuda)
    got, sec, _ = _htod(lambda: cold.get(model, states[0][0]), cuda)
    rows.append((name, "disk hit", sec, None))
    if got is None or not _same(got, states[0][1]) or cold.stats()["hits"]["disk"] != 1:
        fails.append(f"{name}: the disk hit is not the state put ")
    for tokens, st in states:
        got = cache.get(model, tokens)
        if got is None or not _same(got, st):
            fails.append(f"{name}: a state came back different after the tiers moved it")
    return rows, fails


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help='"cuda" (default) or "cpu"')
    ap.add_argument("--rwkv-shape", default="0.1B", help="official RWKV-7 shape (0.1B, 0.4B, 1.5B, 2.9B, 7.2B)")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    args = ap.parse_args(argv)

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("verify_prompt_cache: needs a CUDA device (nothing checked); --device cpu checks the logic")
        return 0
    from rwkv_chat.models import load_model
    from rwkv_chat.models.qwen2 import shapes as qwen_shapes
    from rwkv_chat.models.qwen2.model import Qwen2
    from rwkv_chat.models.rwkv.shapes import random_checkpoint, save_pth

    rows, fails = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dtype = torch.float16 if cuda else torch.float32
        path = save_pth(random_checkpoint(args.rwkv_shape, dtype=dtype, device=args.device),
                        tmp / f"rwkv7-{args.rwkv_shape}.pth")
        model = load_model(str(path), f"{args.device} {'fp16' if cuda else 'fp32'}")
        r, f = check(f"RWKV-7 {args.rwkv_shape}", model, tmp, cuda)
        rows, fails = rows + r, fails + f
        del model
        folder = qwen_shapes.write_random(tmp / "qwen2-tiny", "tiny", torch.bfloat16, device=args.device)
        model = Qwen2(folder, f"{args.device} {'bf16' if cuda else 'fp32'}")    # no tokenizer needed
        r, f = check("Qwen2 tiny", model, tmp, cuda)
        rows, fails = rows + r, fails + f
    where = torch.cuda.get_device_name() if cuda else "CPU (cpu_device=True)"
    lines = [f"Prompt cache tiers on {where}", "", "| model | get | ms (under the profiler on CUDA) | HtoD copies |", "|---|---|---:|---:|"]
    lines += [f"| {m} | {g} | {s * 1e3:.2f} | {'-' if c is None else c} |" for m, g, s, c in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for f in fails:
        print("FAIL:", f)
    print("prompt cache device tier:", "ok" if not fails else f"{len(fails)} check(s) failed")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
