"""Shared fixtures: locating ../shared (real tiny models, tokenizers) beside the repository.

When ../shared is missing, tests that need it fail under CI (``CI=true``) and are skipped with a reason
elsewhere.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# The tiny test models are far too small to gain from intra-op threads; on a 2-core machine running
# daemons beside the tests, threads only add contention.
torch.set_num_threads(1)

# Tests never touch the user's own home: this process (and daemons it starts without a home of their own)
# use a home made for the session. Every test home shares one kernel build cache that outlives the session
# (builds are keyed by source hash, torch version and arch, so a stale build is never reused).
SESSION_HOME = Path(tempfile.mkdtemp(prefix="rwkv-chat-tests-"))
os.environ["RWKV_CHAT_HOME"] = str(SESSION_HOME)
KERNEL_CACHE = Path(tempfile.gettempdir()) / f"rwkv-chat-test-kernels-{os.getuid()}"


def link_kernel_cache(home: Path) -> Path:
    """Make ``home``'s kernel build cache the shared test cache (call before starting a daemon in ``home``)."""
    KERNEL_CACHE.mkdir(mode=0o700, exist_ok=True)
    cache = Path(home) / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    link = cache / "kernels"
    if not link.exists():
        link.symlink_to(KERNEL_CACHE, target_is_directory=True)
    return home


link_kernel_cache(SESSION_HOME)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build (or load from the shared cache) the CPU kernels once, before any daemon needs them."""
    from rwkv_chat.models import kernels

    kernels.set_cache_dir(KERNEL_CACHE)
    return kernels.ensure_built("cpu")

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
MODEL_NAMES = {
    "4": "tiny-rwkv-4v0-660K.pth",
    "5": "tiny-rwkv-5v1-730K.pth",
    "5.2": "tiny-rwkv-5v2-730K.pth",
    "6": "tiny-rwkv-6v0-1m.pth",
    "7": "tiny-rwkv-7v0-834K.pth",
}


def _require(path: Path) -> Path:
    if path.exists():
        return path
    msg = f"{path} is missing (the shared test data belongs beside the repository)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def models_dir(shared_dir) -> Path:
    return _require(shared_dir / "models")


@pytest.fixture(scope="session")
def model_path(models_dir):
    """``model_path("5.2")`` or ``model_path("tiny-rwkv-5v2-730K.pth")`` -> Path."""

    def get(name: str) -> Path:
        return _require(models_dir / MODEL_NAMES.get(name, name))

    return get
