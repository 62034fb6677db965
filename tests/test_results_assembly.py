"""``bench/assemble.py`` merges one device run's result files into a GPU's results file: a section a run wrote
replaces the old one (without the heading the file opened with), per-command blocks replace only their own
block, and sections the run did not write are kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _assemble(out_dir: Path, base: Path) -> str:
    subprocess.run([sys.executable, str(ROOT / "bench" / "assemble.py"), str(out_dir), "--gpu", "NVIDIA H100 80GB HBM3",
                    "--base", str(base)], check=True, capture_output=True, text=True)
    return (out_dir / "h100.md").read_text()


def test_a_run_replaces_its_sections_and_keeps_the_others(tmp_path):
    base = tmp_path / "h100.md"
    base.write_text("# NVIDIA H100 80GB HBM3\n\n## Weight formats (bench/formats.py)\n\nold formats table\n\n"
                    "## Qwen2 (ours vs Hugging Face transformers on the same weights)\n\n"
                    "command: `rwkv-chat bench --family qwen2 --md /o/q.md --shape 1.5B`\n\nold 1.5B\n\n"
                    "command: `rwkv-chat bench --family qwen2 --md /o/q.md --shape 7B`\n\nold 7B\n\n"
                    "## Something measured by hand\n\nkept as it was\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "formats_bench.md").write_text("\n## Weight formats (bench/formats.py)\n\nnew formats table\n")
    (out / "qwen_bench.md").write_text("command: `rwkv-chat bench --family qwen2 --md /x/y.md --shape 7B`\n\nnew 7B\n")
    text = _assemble(out, base)
    assert text.count("## Weight formats (bench/formats.py)") == 1
    assert "new formats table" in text and "old formats table" not in text
    assert "old 1.5B" in text and "new 7B" in text and "old 7B" not in text
    assert "## Something measured by hand\n\nkept as it was" in text
