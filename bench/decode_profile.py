"""Where the time of one batch-1 decode step goes (run on a GPU machine).

    python bench/decode_profile.py --shape 1.5B [--shape 0.1B ...] [--out profile.md]

Random weights of an official RWKV-7 shape, ``cuda fp16``, ``BatchDecoder`` at batch 1 (one CUDA
graph). Measures the graph replay alone (CUDA events around 200 back-to-back replays: no argmax, no
host sync, no token copy) and, with ``torch.profiler``, the kernels of 5 eagerly launched steps
(``fused7.decode_step`` from Python): per kernel name the launches per step and the mean device time,
and the 8 launches of the second layer in order. Where the GPU outruns the Python launches (small
models) each kernel starts after the previous one ended and the durations are its own run time; where
the launches run ahead (7.2B), a kernel started early under programmatic dependent launch is timed
from its early start, so those durations overstate.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def profile(shape: str, lines: list[str]) -> None:
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv import shapes
    from rwkv_chat.models.rwkv.decode import BatchDecoder

    w = shapes.random_checkpoint(shape, dtype=torch.float16, device="cuda")
    model = RWKV(model=w, strategy="cuda fp16")
    del w
    torch.cuda.empty_cache()
    dec = BatchDecoder(model, max_batch=1)
    _, st = model.forward([1, 2, 3], None)
    h = dec.add(st)
    for _ in range(5):
        dec.step({h: 1})
    torch.cuda.synchronize()
    g, _ = dec._graph[1]
    n = 200
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    step_us = e0.elapsed_time(e1) * 1e3 / n
    reps = 5
    # kernels launched one by one from Python (eager decode_step): each starts after the previous one
    # ended, so the profiler's durations are the kernels' own run times (in the graph, a kernel that
    # starts early under programmatic dependent launch is timed from its early start)
    from rwkv_chat.models.backends import fused_cuda as fused7
    bufs = [tuple(buf[:1] for buf in bufs) for bufs in dec._bufs]
    ids = dec._ids[:1]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fused7.decode_step(model, ids, bufs)
            torch.cuda.synchronize()
    acc = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name.replace("void ", "").replace("rwkv_chat::(anonymous namespace)::", "")
            name = name.replace("(rwkv_chat::(anonymous namespace)::GemvBatch)", "")[:60]
            acc[name][0] += 1
            acc[name][1] += ev.device_time
    total = sum(v[1] for v in acc.values()) / reps
    seq = sorted((ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda ev: ev.time_range.start)
    per = len(seq) // reps
    one = seq[per * (reps - 1): per * reps]     # the last step, in launch order
    lines += [f"### RWKV-7 {shape}, `cuda fp16`, batch 1, {torch.cuda.get_device_name()}", "",
              f"graph step (events, {n} replays back to back): {step_us:.1f} us; kernel sum (profiler, eager "
              f"launches): {total:.1f} us; graph step - kernel sum: {step_us - total:.1f} us", "",
              "| kernel | per step | mean us | us per step |", "|---|---|---|---|"]
    for name, (cnt, t) in sorted(acc.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| `{name}` | {cnt / reps:.0f} | {t / cnt:.2f} | {t / reps:.1f} |")
    lines += ["", "launches of layer 1 (the second layer) in order, last eager step:", "",
              "| # | kernel | us |", "|---|---|---|"]
    for j, ev in enumerate(one[9:17]):
        lines.append(f"| {j} | `{ev.name.replace('void ', '').replace('rwkv_chat::(anonymous namespace)::', '')[:60]}`"
                     f" | {ev.device_time:.2f} |")
    lines.append("")
    print("\n".join(lines[-(len(acc) + 18):]), flush=True)
    del dec, model
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", default=[])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    lines: list[str] = []
    for s in a.shape or ["1.5B"]:
        profile(s, lines)
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
