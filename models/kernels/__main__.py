"""``python -m rwkv_chat.models.kernels cpu|cuda [--cache-dir DIR] [--source-dir DIR] [--nice N]``: build (or
load from the cache) one device type's kernels and print their status; exit status 0 when the library was built
or found, 1 when the build failed (the reason is the last line on stderr). ``KernelLoader.build_in_background``
runs this."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_chat.models.kernels",
                                 description="Build the compiled kernels of one device type.")
    ap.add_argument("device", choices=("cpu", "cuda"), help="which library to build")
    ap.add_argument("--cache-dir", help="where builds are kept (default: the user cache dir)")
    ap.add_argument("--source-dir", help="the csrc folder to build (default: the package's)")
    ap.add_argument("--nice", type=int, default=0, help="lower this process's priority by N first")
    args = ap.parse_args(argv)
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            pass
    from rwkv_chat.models.kernels import KernelLoader

    loader = KernelLoader(source_dir=args.source_dir, cache_dir=args.cache_dir)
    status = loader.ensure_built(args.device)
    for family, what in status.items():
        print(f"{family}: {what}")
    if args.device in loader.builds:
        return 0
    print(next((v for v in status.values() if v != "ok"), "no library was built"), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
