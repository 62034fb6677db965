"""Where the time of one RWKV-7 decode step goes per weight format (run on a GPU).

    python bench/formats_profile.py --shape 7.2B [--formats "" i8 i4 f8] [--batch 1] [--large compiled]
                                    [--out formats_profile.md]

Random weights of an official RWKV-7 shape, ``cuda fp16`` + format. For each format: a ``BatchDecoder`` of
``--batch`` rows on the fused path without graphs (above 4 rows ``--large`` picks the step: the fused kernels with
batched cuBLAS products, or the torch.compile'd one), three warm-up steps, then ``torch.profiler`` over one step: per
kernel name the launches and the summed device time, largest first, the sum of all kernels and the wall time of the
step (eager). ``--out`` gains one section per run (appended: runs of several batch sizes share a file).
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
    ap.add_argument("--batch", type=int, default=1, help="rows per decode step (default 1)")
    ap.add_argument("--large", choices=["fused", "fused-split", "compiled"], default="fused",
                    help="above 4 rows: the step's path (BatchDecoder's large; default fused)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch must be 1 or more, got {args.batch}")
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv import shapes
    from rwkv_chat.app.bench import provenance
    from rwkv_chat.models.rwkv.decode import BatchDecoder

    rows = f", batch {args.batch}" + (f" ({args.large} path)" if args.batch > 4 else "")
    lines = [f"### RWKV-7 {args.shape} decode step per format{rows}", "",
             *provenance(None, "python bench/formats_profile.py", "cuda"), ""]
    ckpt = shapes.random_checkpoint(args.shape, dtype=torch.float16, device="cuda")
    for fmt in args.formats:
        model = RWKV(ckpt, f"cuda fp16{fmt}")
        dec = BatchDecoder(model, max_batch=args.batch, graphs=False, fused=True, large=args.large)
        hs = [dec.add(None) for _ in range(args.batch)]
        kernel_table(lambda: dec.step({h: 7 for h in hs}), lines,
                     f"cuda fp16{fmt} ({model.backend.name}{', compiled step' if dec.compile else ''})", level=4)
        print("\n".join(lines[-30:]), flush=True)
        del dec, model
        gc.collect()
        torch.cuda.empty_cache()
    text = "\n".join(lines)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
