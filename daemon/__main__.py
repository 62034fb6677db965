"""``python -m rwkv_chat.daemon [--model PATH] [--strategy S]`` — run the daemon in the foreground.

Exit codes: 0 after a clean stop, 2 for an unusable config or home (``ConfigError``, ``UnsafeDirectory``,
an endpoint refused: ``ProtocolError``), 3 when a daemon already runs for this home (``AlreadyRunning``).
"""

import argparse
import sys

from .config import ConfigError, load_config
from .launcher import AlreadyRunning, run_foreground
from .paths import UnsafeDirectory, UnusableDirectory, ensure_dirs, get_paths
from .protocol import ProtocolError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkv_chat.daemon",
                                 description="Run the rwkv-chat daemon in the foreground.")
    ap.add_argument("--model", help="checkpoint to load at start")
    ap.add_argument("--strategy", help='strategy for --model, e.g. "cpu fp32"')
    args = ap.parse_args(argv)
    try:
        paths = ensure_dirs(get_paths())
        return run_foreground(paths, load_config(paths.config_file), args.model, args.strategy)
    except AlreadyRunning as e:
        print(f"rwkv-chat: {e}", file=sys.stderr, flush=True)
        return 3
    except UnusableDirectory as e:
        print(f"rwkv-chat: {e}", file=sys.stderr, flush=True)
        return 1
    except (ConfigError, UnsafeDirectory, ProtocolError) as e:
        print(f"rwkv-chat: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
