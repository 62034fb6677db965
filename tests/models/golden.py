"""Golden values from the reference ``rwkv`` package (0.8.32), computed in a subprocess."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

RUNNER = Path(__file__).with_name("reference_runner.py")


def reference(model: Path, strategy: str, version: str, jobs: list[dict], deep_embed: bool = False) -> list[dict]:
    """Run ``jobs`` (see reference_runner) on the reference package and return its results."""
    req = {"model": str(model), "strategy": strategy, "v7": version == "7", "jobs": jobs, "deep_embed": deep_embed}
    proc = subprocess.run([sys.executable, str(RUNNER)], input=json.dumps(req), capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


@functools.lru_cache(maxsize=None)
def cached_reference(model: str, strategy: str, version: str, jobs_json: str) -> list[dict]:
    return reference(Path(model), strategy, version, json.loads(jobs_json))
