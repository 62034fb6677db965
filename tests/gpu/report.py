"""The end of a GPU check script: its Markdown table printed and, where asked, written to a file."""

from __future__ import annotations

from pathlib import Path


def finish(lines: list[str], out: str | None, ok: bool) -> int:
    """Print ``lines`` (one Markdown text), write it to ``out`` where given; the exit status: 0 when ``ok``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).write_text(text)
    return 0 if ok else 1
