"""``rwkv-chat plan MODEL --strategy S``: a dry run of a load, reading only the checkpoint's header.

Prints, per stage and per device, the layers, the weight bytes by format, the state of a conversation, the
bytes streamed per token for a ``*N+`` stage, the transfers between devices per token, and whether each
device's need fits its free memory (``rwkv_chat.models.plan``). Nothing is loaded, so it answers in about a
second even for large checkpoints, and for GPUs this machine does not have (fit "unknown").

This is a local tool: it imports the engine directly (as ``app/bench.py`` does), never through the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """examples:
  rwkv-chat plan ~/models/rwkv7-7.2B.pth --strategy "cuda:0 fp16 *16 -> cuda:1 fp16"
  rwkv-chat plan ~/models/rwkv7-7.2B.pth --strategy "cuda fp16 *10+"
  rwkv-chat plan ~/models/Qwen2-7B --strategy "cuda fp16" --context 8192
  rwkv-chat plan ~/models/rwkv7-1.5B.pth --suggest          # strategies that fit this machine
"""


def parser() -> argparse.ArgumentParser:
    """The command's argument parser (``rwkv-chat plan --help``)."""
    ap = argparse.ArgumentParser(prog="rwkv-chat plan", description=__doc__.split("\n\n")[0].replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    ap.add_argument("model", metavar="MODEL", help="an RWKV .pth / .safetensors file, or a Qwen2 model folder")
    ap.add_argument("--strategy", metavar="S", help='e.g. "cuda fp16", "cuda:0 fp16 *16 -> cuda:1 fp16", '
                    '"cuda fp16 *10+" (rwkv-chat load --help explains the syntax); default for a file of '
                    '`rwkv-chat convert`: the strategy it was converted for')
    ap.add_argument("--suggest", action="store_true", help="list strategies that fit the devices of this machine")
    ap.add_argument("--conversations", type=int, default=1, metavar="N",
                    help="conversations whose state the need counts (default 1)")
    ap.add_argument("--context", type=int, default=None, metavar="T",
                    help="Qwen2: KV cache tokens per conversation (default: the config's [model] context_limit, "
                    "else the model's max_position_embeddings)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def _context(given: int | None) -> int | None:
    """``--context``, else the daemon's ``[model] context_limit`` where set (it caps the KV cache so)."""
    if given is not None:
        return given
    from rwkv_chat.daemon.config import load_config
    from rwkv_chat.daemon.paths import get_paths

    return load_config(get_paths().config_file).model.context_limit or None


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0 (fits or unknown), 1 (a device does not fit) or 2 (a user mistake, one line
    on stderr)."""
    ap = parser()
    args = ap.parse_args(argv)
    if args.strategy is None and not args.suggest:
        from rwkv_chat.models.rwkv.convert import converted_metadata

        meta = converted_metadata(Path(args.model).expanduser())
        if not (meta and meta.get("strategy")):
            from rwkv_chat.models.errors import RWKVError
            from rwkv_chat.models.header import read_header

            if not Path(args.model).expanduser().exists():     # a missing file is named, not asked a strategy
                print(f"rwkv-chat plan: checkpoint not found: {args.model}", file=sys.stderr)
                return 2
            try:                                 # an unreadable file is named as such, not asked for a strategy
                if Path(args.model).expanduser().is_file():
                    read_header(Path(args.model).expanduser())
            except RWKVError as e:
                print(f"rwkv-chat plan: {e}", file=sys.stderr)
                return 2
            ap.error("give --strategy S (or --suggest); a file of `rwkv-chat convert` plans its own")
        args.strategy = meta["strategy"]         # the strategy the file was converted for, as `load` takes it
    if args.conversations < 1:
        ap.error(f"--conversations must be 1 or more, got {args.conversations}")
    if args.context is not None and args.context < 1:
        ap.error(f"--context must be 1 or more, got {args.context}")

    from rwkv_chat.daemon.config import ConfigError
    from rwkv_chat.models.errors import RWKVError
    from rwkv_chat.models.plan import plan_memory, suggest

    try:
        if args.suggest and args.strategy is None:
            found, mp = suggest(args.model, conversations=args.conversations), None
        else:
            found, mp = None, plan_memory(args.model, args.strategy, conversations=args.conversations,
                                          context=_context(args.context))
    except (RWKVError, ConfigError, OSError, ValueError) as e:
        print(f"rwkv-chat plan: {e}", file=sys.stderr)
        return 2
    if found is not None:       # printed outside the handler above: a closed stdout is the caller's (cli.main)
        print(json.dumps(found) if args.json else "\n".join(found))
        return 0
    print(json.dumps(mp.to_dict(), indent=1, default=str) if args.json else mp)
    return 1 if mp.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
