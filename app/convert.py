"""``rwkv-chat convert``: a local tool writing a checkpoint in another container or pre-quantized for a strategy.

    rwkv-chat convert MODEL.pth --strategy "cuda fp16i4" -o MODEL-i4.safetensors   # packed once, loads as is
    rwkv-chat convert MODEL.pth -o MODEL.safetensors                                # same tensors, other container
    rwkv-chat convert QWEN_FOLDER --strategy "cuda fp16i4" -o QWEN-GPTQ             # a 4-bit GPTQ folder

It runs in this process, without the daemon (the engine's ``rwkv/convert.py`` does the work; for a Qwen2
folder, ``qwen2/convert.py``, which writes a GPTQ folder and needs i4 stages); like
``rwkv-chat bench`` it is one of the local tools that use the engine directly. A mistake (a missing file, a bad
strategy, an unsupported output, an existing output file without ``--force``) is one line on stderr and exit code 2;
a failure while writing, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="rwkv-chat convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write an RWKV checkpoint pre-quantized for a strategy (weights packed once, so a load does\n"
                    "not quantize again; format, strategy and the source's fingerprint in the file's metadata),\n"
                    "or, without --strategy, the same tensors as .pth or .safetensors. A Qwen2 folder with an\n"
                    "i4 strategy becomes a 4-bit GPTQ folder (OUT is a folder) that loads without quantizing.",
        epilog="examples:\n"
               '  rwkv-chat convert rwkv7-1.5B.pth --strategy "cuda fp16i4" -o rwkv7-1.5B-i4.safetensors\n'
               "  rwkv-chat convert rwkv7-1.5B.pth -o rwkv7-1.5B.safetensors\n"
               '  rwkv-chat load rwkv7-1.5B-i4.safetensors --strategy "cuda fp16i4"')
    ap.add_argument("model", metavar="MODEL", help="the source checkpoint (.pth or .safetensors, or a Qwen2 folder)")
    ap.add_argument("-o", "--output", required=True, metavar="OUT",
                    help="the file to write (.safetensors for a quantized one; .pth or .safetensors otherwise)")
    ap.add_argument("--strategy", metavar="S",
                    help='the strategy the file is for, e.g. "cuda fp16i4" (i8, i4 or f8 stages are packed); '
                         "load the result with the same formats")
    ap.add_argument("--force", action="store_true", help="replace OUT where it is an existing file")
    return ap


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from rwkv_chat.models.errors import RWKVError
    from rwkv_chat.models.rwkv.convert import convert as rwkv_convert

    convert = _qwen2_convert if Path(args.model).expanduser().is_dir() else rwkv_convert
    if Path(args.output).expanduser().is_file() and not args.force:
        print(f"rwkv-chat convert: {args.output} exists; give --force to replace it", file=sys.stderr)
        return 2

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r\x1b[Kconverting: {done}/{total} tensors")
            sys.stderr.flush()

    try:
        r = convert(args.model, args.output, args.strategy, progress=progress)
    except RWKVError as e:
        print(f"\nrwkv-chat convert: {e}" if sys.stderr.isatty() else f"rwkv-chat convert: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"rwkv-chat convert: cannot write {args.output}: {e}", file=sys.stderr)
        return 1
    if sys.stderr.isatty():
        sys.stderr.write("\r\x1b[K")
    packed = ", ".join(f"{n} {fmt}" for fmt, n in r["packed"].items()) or "none packed"
    family = f"Qwen{r['version']}" if r.get("family") == "qwen2" else f"RWKV-{r['version']}"
    print(f"wrote {r['out']} ({family}, {r['bytes'] / 2**20:.1f} MiB; matrices: {packed}"
          + (f"; strategy {r['strategy']!r})" if r["strategy"] else ")"), file=sys.stderr)
    return 0


def _qwen2_convert(src: str, out: str, strategy: str | None, progress) -> dict:
    """A Qwen2 folder to a GPTQ folder (``rwkv_chat.models.qwen2.convert``); a strategy with i4 stages is required.
    Raises StrategyError without one."""
    from rwkv_chat.models.errors import StrategyError
    from rwkv_chat.models.qwen2.convert import convert

    if not strategy:
        raise StrategyError('a Qwen2 folder converts only to a GPTQ folder: give --strategy with i4 stages '
                            '(e.g. "cuda fp16i4")')
    return convert(Path(src).expanduser(), Path(out).expanduser(), strategy, progress=progress)
