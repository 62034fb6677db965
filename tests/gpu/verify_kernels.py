"""Check every CUDA kernel against the pure-torch path on fresh random inputs (run on a GPU machine).

    python tests/gpu/verify_kernels.py [--cache DIR] [--out results.md] [--family gemvq ...]

Builds the CUDA library (and reuses it from the cache), prints the build report, then runs every case
of ``tests/gpu/kernel_cases.py`` (fp32, fp16, bf16; T = 1 and sequences; batch 1 and > 1) with
NaN-poisoned outputs. Passing: relative error <= 1e-5 (fp32), <= 1e-2 (fp16/bf16). Exit status 1 on
any failure or a kernel that did not build.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.app.bench import provenance  # noqa: E402
from rwkv_chat.models import kernels  # noqa: E402
from tests.gpu.kernel_cases import TOL, all_cases  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None, help="build cache dir (default: the user cache dir)")
    ap.add_argument("--out", default=None, help="write the markdown table here")
    ap.add_argument("--family", nargs="*", default=None, help="run only these families' cases (e.g. gemvq mm8)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    loader = kernels.KernelLoader(cache_dir=args.cache, progress=lambda m: print(m, flush=True))
    t0 = time.perf_counter()
    status = loader.ensure_built("cuda")
    print(json.dumps({"status": status, "build": loader.builds.get("cuda")}, indent=1), flush=True)
    print(f"ensure_built('cuda'): {time.perf_counter() - t0:.1f} s", flush=True)
    lines = [*provenance(), "",
             "| op | shape | dtype | rel. error | tolerance | result |", "|---|---|---|---|---|---|"]
    failed = [f for f, v in status.items() if v != "ok"]
    cases = bad = 0
    for fam, desc, dt, fn in all_cases("cuda"):
        if args.family and fam not in args.family:
            continue
        try:
            err = fn()
            ok = err <= TOL[dt]
            res = "pass" if ok else "FAIL"
        except Exception as e:  # noqa: BLE001 - reported in the table
            err, ok, res = float("nan"), False, f"ERROR {type(e).__name__}: {str(e)[:120]}"
        cases += 1
        if not ok:
            bad += 1
            failed.append(f"{fam} {desc} {dt}")
        lines.append(f"| {fam} | {desc} | {str(dt).replace('torch.', '')} | {err:.2e} | {TOL[dt]:.0e} | {res} |")
        torch.cuda.synchronize()
    lines += ["", f"{cases} cases: {cases - bad} pass, {bad} fail"
              + "".join(f"; {f} did not build" for f, v in status.items() if v != "ok")]
    table = "\n".join(lines)
    print(table)
    print(f"\n{len(failed)} failure(s): {failed}" if failed else "\nall kernels pass")
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
