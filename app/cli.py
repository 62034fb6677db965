"""The ``rwkv-chat`` command line (one binary): the TUI, the daemon's lifecycle, and scriptable clients.

``complete`` and ``chat`` write only generated text to stdout (progress and status go to stderr), so they
compose in pipes. Exit codes: 0 success, 1 error (a model that did not load, a failed generation; ``daemon
status``: no daemon answers), 2 usage (a bad flag, a conversation that does not exist or is named
ambiguously), 3 a daemon already runs (``daemon start --foreground``), 4 the daemon was lost mid-stream, 130
interrupted or cancelled (Ctrl-C, or the daemon cancelled the generation: ``daemon stop``, another client's
cancel).

Conversations are named by their id, by the start of their id (as the TUI shows it) or by their exact title.
"""

from __future__ import annotations

import argparse
import os
import sys

from .cli_args import parser  # noqa: F401  (rwkv-chat --help; tests)
from .chat_cli import _chat, _complete, _conversations, _serve
from .cli_common import UsageError, _err, said
from .daemon_cli import _daemon, _doctor, _load


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code. A closed stdout (``rwkv-chat doctor | head``) ends
    the command quietly with 0 (a generation in progress is cancelled)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        if argv[:1] == ["plan"]:
            from rwkv_chat.app.plan import main as plan_main

            return plan_main(argv[1:])
        if argv[:1] == ["convert"]:
            from rwkv_chat.app.convert import main as convert_main

            return convert_main(argv[1:])
        return _main(argv)
    except BrokenPipeError:
        try:                     # later flushes (interpreter exit) must not raise again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0


def _bench(argv: list[str]) -> int:
    from rwkv_chat.app.bench import main as bench_main

    return bench_main(argv) or 0


def _subparser(ap: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost parser of the command ``args`` names (``rwkv-chat conversations rm`` -> its own parser)."""
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                return _subparser(action.choices[name], args)
    return ap


def _main(argv: list[str]) -> int:
    ap = parser()
    args, extra = ap.parse_known_args(argv)
    if extra:       # a mistyped flag: the usage of the command it was given to, not the top-level one
        _subparser(ap, args).error(f"unrecognized arguments: {' '.join(extra)}")
    from rwkv_chat.daemon.client import DaemonError, DaemonLost, GenerationFailed
    from rwkv_chat.daemon.paths import UnsafeDirectory, UnusableDirectory
    from rwkv_chat.daemon.protocol import InvalidId

    try:
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd is None:
            return _tui()
        from . import models_cli

        return {"daemon": _daemon, "load": _load, "complete": _complete, "chat": _chat,
                "conversations": _conversations, "doctor": _doctor, "pull": models_cli.pull,
                "models": models_cli.models, "ps": models_cli.ps, "unload": models_cli.unload}[args.cmd](args)
    except (UsageError, InvalidId) as e:
        _err(f"rwkv-chat: {e}")
        return 2
    except DaemonLost as e:
        _err(f"rwkv-chat: daemon lost: {e.message}")
        return 4
    except UnusableDirectory as e:
        _err(f"rwkv-chat: {e}")
        return 1
    except (DaemonError, UnsafeDirectory) as e:
        if isinstance(e, DaemonError) and e.kind in ("InvalidId", "NotFound", "Conflict") \
                and not isinstance(e, GenerationFailed):
            # what the user named is not there (any more)
            _err(f"rwkv-chat: {e.message}")
            return 2
        _err(f"rwkv-chat: {said(e) if isinstance(e, DaemonError) else e}")
        return 1
    except KeyboardInterrupt:
        _err("rwkv-chat: interrupted")
        return 130


def _tui() -> int:
    try:
        from rwkv_chat.app.main import run
    except ImportError as e:
        _err(f"rwkv-chat: the terminal UI is not available ({e}); the other commands work: rwkv-chat --help")
        return 1
    return run() or 0


if __name__ == "__main__":
    sys.exit(main())
