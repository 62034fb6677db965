"""Where the time of a Qwen2 decode step and of a prefill goes (run on a GPU).

    python bench/qwen2_profile.py --shape 1.5B --prompt-len 1024 [--out qwen2_profile.md]

Random weights of an official Qwen2 shape (``models/qwen2/shapes.py``), ``cuda bf16``. For a batch-1 decode step
(``Qwen2Decoder`` without graphs, after a 64-token prompt) and for one ``Qwen2.forward`` of the prompt:
``torch.profiler`` after warm-up, per kernel name the launches and the summed device time, largest first, the
sum of all kernels and the wall time; the decode step's wall time is also given with CUDA graphs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def kernel_table(fn, lines: list[str], title: str, top: int = 25, level: int = 3) -> None:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    agg: dict = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            a = agg[e.name[:90]]
            a[0] += 1
            a[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    total = sum(v[1] for v in agg.values()) / 1e3
    n = sum(v[0] for v in agg.values())
    lines += [f"{'#' * level} {title}", "", f"wall {wall:.3f} ms, kernels {total:.3f} ms in {n} launches", "",
              "| kernel | launches | ms | % |", "|---|---|---|---|"]
    for name, (cnt, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| `{name}` | {cnt} | {us / 1e3:.3f} | {100 * us / 1e3 / max(total, 1e-9):.1f} |")
    lines.append("")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="1.5B")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--strategy", default="cuda bf16")
    from rwkv_chat.models.qwen2 import shapes
    from rwkv_chat.models.qwen2.fused import DEFAULT_GEMV, GEMV_MODES
    from rwkv_chat.models.qwen2.model import Qwen2

    ap.add_argument("--gemv", choices=GEMV_MODES, default=DEFAULT_GEMV,
                    help=f"the products of 1..4 rows (Qwen2.use_kernels; default {DEFAULT_GEMV}, the model's)")
    ap.add_argument("--out")
    args = ap.parse_args()

    from rwkv_chat.app.bench import provenance

    lines = [*provenance(), "", f"Qwen2 {args.shape}, `{args.strategy}`, products of 1..4 rows: {args.gemv}, random "
             "weights", ""]
    with tempfile.TemporaryDirectory() as tmp:
        folder = shapes.write_random(Path(tmp) / "m", args.shape, device="cuda")
        model = Qwen2(folder, args.strategy)
        if args.gemv != DEFAULT_GEMV:
            model.use_kernels(gemv=args.gemv)
    _, state = model.forward(list(range(1, 65)), None)
    for graphs in (False, True):
        dec = model.decoder(1, graphs=graphs)
        h = dec.add(state)
        step = lambda: dec.step({h: 7})  # noqa: E731
        if graphs:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                step()
            torch.cuda.synchronize()
            lines += [f"decode step with CUDA graphs: {(time.perf_counter() - t0) / 50 * 1e3:.3f} ms", ""]
        else:
            kernel_table(step, lines, "decode step b=1 (no graphs)")
        dec.remove(h)
    ids = torch.randint(0, model.vocab_size, (args.prompt_len,)).tolist()
    kernel_table(lambda: model.forward(ids, None), lines, f"prefill {args.prompt_len}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
