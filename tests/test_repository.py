"""The repository's own files: no merge-conflict markers left in any source, script or document, and every shell
script parses (``bash -n``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".py", ".sh", ".md", ".toml", ".tcss", ".cu", ".cuh", ".cpp", ".h", ".txt", ".cfg", ".ini", ".yml", ".yaml",
        ".json", ".service", ".plist", ".desktop"}
SKIP = {".git", ".venv", "build", "dist", "__pycache__", ".whl", ".peers"}
MARKER = re.compile(r"^(<<<<<<< |>>>>>>> |\|\|\|\|\|\|\| )", re.M)


def files(suffixes=TEXT):
    for p in ROOT.rglob("*"):
        if p.is_file() and not SKIP.intersection(p.relative_to(ROOT).parts) and \
                (p.suffix in suffixes or p.parent.name == ".ci"):
            yield p


def test_no_merge_conflict_markers():
    found = [f"{p.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
             for p in files() for text in [p.read_text(errors="replace")] for m in MARKER.finditer(text)]
    assert not found, "merge-conflict markers at " + ", ".join(found)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash on this machine")
def test_every_shell_script_parses():
    scripts = [p for p in files({".sh"})] + [p for p in (ROOT / ".ci").glob("*") if p.is_file()]
    assert scripts
    for p in scripts:
        out = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert out.returncode == 0, f"{p.relative_to(ROOT)}: {out.stderr}"
