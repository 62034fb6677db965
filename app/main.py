"""Entry point of the terminal UI: ``rwkv-chat`` with no arguments calls :func:`run`."""

from __future__ import annotations

import argparse


def run(argv: list[str] | None = None) -> int:
    """Run the Textual UI until the user quits; returns the exit code (0).

    ``argv`` (default: none) accepts ``--no-autostart`` (do not start a daemon when none answers).
    """
    ap = argparse.ArgumentParser(prog="rwkv-chat", description="The rwkv-chat terminal UI.")
    ap.add_argument("--no-autostart", action="store_true", help="do not start a daemon when none is running")
    args = ap.parse_args(argv or [])
    from . import terminal
    from .chat_app import ChatApp

    terminal.install()          # pasted text stays text (escape sequences inside a paste are not keys)

    app = ChatApp(autostart=not args.no_autostart)
    app.run()
    return app.return_code or 0
