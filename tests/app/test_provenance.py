"""The source tree a benchmark table names (``app.bench._source_tree``), against git itself on a scratch repository."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from rwkv_chat.app import bench

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root, *args) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_a_changed_checkout_names_the_tree_of_the_commit_that_holds_its_files(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "a.py").write_text("a = 1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "one")
    head = _git(tmp_path, "rev-parse", "--short=10", "HEAD")
    assert bench._source_tree(tmp_path) == head

    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "x.bin").write_text("scratch")
    assert bench._source_tree(tmp_path) == head                     # ignored files do not count

    (tmp_path / "a.py").write_text("a = 2\n")
    (tmp_path / "b.py").write_text("b = 1\n")                       # new, not ignored: counts
    index = (tmp_path / ".git" / "index").read_bytes()
    named = bench._source_tree(tmp_path)
    assert (tmp_path / ".git" / "index").read_bytes() == index     # the checkout's index is left alone
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "two")
    assert named == f"{head} + local changes, content {_git(tmp_path, 'rev-parse', 'HEAD^{tree}')[:10]}"


def test_a_folder_outside_git_names_no_tree(tmp_path):
    assert bench._source_tree(tmp_path) is None
