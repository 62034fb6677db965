"""Where the time of one batch-1 RWKV-7 decode step goes per weight format (run on a GPU).

    python bench/formats_profile.py --shape 7.2B [--formats "" i8 i4 f8] [--out formats_profile.md]

Random weights of an official RWKV-7 shape, ``cuda fp16`` + format. For each format: a ``BatchDecoder`` of batch 1
without graphs, three warm-up steps, then ``torch.profiler`` over one step: per kernel name the launches and the
summed device time, largest first, the sum of all kernels and the wall time of the step (eager).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.qwen2_profile import kernel_table  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="7.2B")
    ap.add_argument("--formats", nargs="+", default=["", "i8", "i4", "f8"])
    ap.add_argument("--out")
    args = ap.parse_args()
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv import shapes
    from rwkv_chat.models.rwkv.decode import BatchDecoder

    lines = [f"## RWKV-7 {args.shape} decode step per format", ""]
    ckpt = shapes.random_checkpoint(args.shape, dtype=torch.float16, device="cuda")
    for fmt in args.formats:
        model = RWKV(ckpt, f"cuda fp16{fmt}")
        dec = BatchDecoder(model, max_batch=1, graphs=False)
        h = dec.add(None)
        kernel_table(lambda: dec.step({h: 7}), lines, f"cuda fp16{fmt} ({model.backend.name})")
        print("\n".join(lines[-30:]), flush=True)
        del dec, model
        gc.collect()
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
