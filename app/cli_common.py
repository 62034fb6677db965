"""What the CLI's commands share: paths, config, one-line errors, a client of the daemon."""

from __future__ import annotations

import sys


def _paths():
    from rwkv_chat.daemon.paths import ensure_dirs, get_paths

    return ensure_dirs(get_paths())


def _config(paths):
    from rwkv_chat.daemon.config import load_config

    return load_config(paths.config_file)


def _err(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


class UsageError(Exception):
    """A mistake in what the user asked (exit code 2, one line on stderr)."""


def said(e) -> str:
    """A daemon error as a sentence: its message, with what kind of trouble it is where the message alone
    does not say (a busy queue, an internal error)."""
    if e.kind == "Busy":
        return f"the daemon is busy: {e.message}"
    if e.kind == "Internal":
        return f"internal error in the daemon: {e.message} (its log: rwkv-chat doctor shows where)"
    return e.message


def _with_client(run) -> int:
    """``run(client)`` with a client of this home's daemon (started when none runs). A daemon this command
    started is stopped again when the command fails: a failing ``chat`` leaves nothing running behind."""
    from rwkv_chat.daemon.client import Client, DaemonError

    c = Client(_paths())
    rc = 1
    try:
        rc = run(c)
        return rc
    finally:
        if c.spawned and rc != 0:
            try:
                c.shutdown()
            except DaemonError:
                pass
        c.close()


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """``[#########.....................]  7/25``."""
    filled = width * done // total if total else 0
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total}"

