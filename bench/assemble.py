"""Merge the result files of one device run into the GPU's results file.

    python3 bench/assemble.py OUT_DIR --gpu "NVIDIA H100 80GB HBM3" [--base bench/results/h100.md]

``bench/device_run.sh`` calls this at its end. The result files in OUT_DIR (``verify_kernels.md``,
``bench.md``, ...: every script heads its table with ``command:`` and the machine line of
``rwkv_chat.app.bench.provenance``) become the sections of ``OUT_DIR/<gpu>.md``: a section whose file
the run wrote replaces that section of the base file (default ``bench/results/<gpu>.md``), the others
are kept as they were. In "Decode and prefill" each ``rwkv-chat bench`` table is one block, keyed by its
command without the output paths (``--md``, ``--json``, ``--out``): a run that re-measured some rows
replaces those blocks and keeps the rest. Copy the result over ``bench/results/<gpu>.md`` to publish it.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

#: (section title, result file in OUT_DIR, merged per command block)
SECTIONS = (
    ("Kernel checks", "verify_kernels.md", False),
    ("Grouped GEMV (bias, SwiGLU) and i8 product checks", "verify_gemv_group.md", False),
    ("WKV-5 / WKV-6 (sequential and chunked) and tuned GEMM checks", "verify_wkv56.md", False),
    ("Chunked WKV-7 checks (tensor cores and CUDA cores)", "verify_wkv7.md", False),
    ("WKV kernel benchmark", "wkv_bench.md", False),
    ("RWKV-7 against the Albatross-class engine (same call)", "peers.md", False),
    ("Fused RWKV-7 paths vs the torch path", "verify_fused.md", False),
    ("Whole model vs rwkv 0.8.32", "pip.md", False),
    ("Kernel benchmark", "kernels_bench.md", False),
    ("Sparse channel-mix value product", "sparse_ffn.md", False),
    ("Triton ops vs torch references", "verify_ops.md", False),
    ("Triton ops benchmark", "ops_bench.md", False),
    ("Decode products with their norms (norm_gemv)", "prenorm_bench.md", False),
    ("Decode and prefill", "bench.md", True),
    ("Daemon vs engine", "daemon_overhead.md", False),
    ("Daemon vs engine, sampled", "daemon_sampled.md", False),
    ("Daemon vs engine, sampled, peaked logits (head x5)", "daemon_sampled_peaked.md", False),
    ("Sampling on the GPU vs the host path", "verify_sampling.md", False),
    ("Prefill profile", "prefill_profile.md", False),
    ("Compiled int4 / fp8 GEMVs (csrc/gemvq)", "verify_gemvq.md", False),
    ("Int4 / fp8 decode GEMVs vs fp16 cuBLAS", "gemvq_bench.md", False),
    ("Weight formats (bench/formats.py)", "formats_bench.md", False),
    ("Weight formats at decode batches (bench/formats.py)", "formats_batches.md", False),
    ("Weight formats at 2-4 rows (bench/formats.py)", "formats_few.md", False),
    ("rwkv-quant-nv (the weight formats' peer)", "quant_peers.md", False),
    ("RWKV-7 decode step per weight format (profile)", "formats_profile.md", False),
    ("Weight-format checks", "verify_formats.md", False),
    ("Qwen2 (ours vs Hugging Face transformers on the same weights)", "qwen_bench.md", True),
    ("Qwen2 checks", "verify_qwen2.md", False),
    ("Qwen2 decode step and prefill profile (diagnostic)", "qwen2_profile.md", False),
    ("Conversation tree, draft prefill and shared prompt states", "tree.md", False),
)
PREAMBLE = ("Every section is written by the script its `command:` line names, with the machine, torch, source "
            "tree and date of that run. `bash bench/device_run.sh` regenerates this file section by section "
            "(`bench/assemble.py`): the sections of the steps a run took are replaced, the others kept.")


def gpu_slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``h100``: the first word of the name with a digit in it, vendor words
    left out."""
    words = [w for w in re.split(r"[\s_-]+", name.lower()) if w not in ("nvidia", "geforce", "tesla", "")]
    return next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")


def command_key(line: str) -> str:
    """The command of a ``command: `...` `` line without its output paths (``--md``, ``--json``, ``--out``)."""
    m = re.match(r"command: `([^`]*)`", line)
    words = shlex.split(m.group(1)) if m else [line]
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w in ("--md", "--json", "--out"):
            skip = True
        elif not w.startswith(("--md=", "--json=", "--out=")):
            out.append(w)
    return shlex.join(out)


def blocks(text: str) -> list[tuple[str, str]]:
    """(key, text) per block: a block starts at a ``command:`` line, or at the ``### `` heading right above
    it; text before the first block goes with the first."""
    lines = text.strip("\n").splitlines()
    starts = []
    for i, line in enumerate(lines):
        if line.startswith("command: "):
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            starts.append((j if j >= 0 and lines[j].startswith("### ") and (not starts or j > starts[-1][0])
                           else i, command_key(line)))
    if not starts:
        return [("", "\n".join(lines))] if lines else []
    starts[0] = (0, starts[0][1])
    ends = [s for s, _ in starts[1:]] + [len(lines)]
    return [(key, "\n".join(lines[s:e]).strip("\n")) for (s, key), e in zip(starts, ends)]


def sections(text: str) -> dict[str, str]:
    """``## `` title -> body of a results file."""
    out, title, body = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if title:
                out[title] = "\n".join(body).strip("\n")
            title, body = line[3:].strip(), []
        elif title:
            body.append(line)
    if title:
        out[title] = "\n".join(body).strip("\n")
    return out


def own_heading_dropped(text: str) -> str:
    """A result file's text without the ``## `` heading some scripts open it with (the section gives one)."""
    lines = text.strip("\n").splitlines()
    if lines and lines[0].startswith("## "):
        lines = lines[1:]
    return "\n".join(lines).strip("\n")


def merge(old: str, new: str) -> str:
    """Blocks of ``new`` replace the blocks of ``old`` with the same key, in place; new keys are appended."""
    merged = dict(blocks(old))
    for key, text in blocks(new):
        merged[key] = text
    return "\n\n".join(merged.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--gpu", required=True, help="the GPU's name (nvidia-smi --query-gpu=name)")
    ap.add_argument("--base", type=Path, help="the results file to update (default bench/results/<gpu>.md)")
    args = ap.parse_args(argv)
    slug = gpu_slug(args.gpu)
    base = args.base or Path(__file__).resolve().parent / "results" / f"{slug}.md"
    old = sections(base.read_text()) if base.is_file() else {}
    parts = [f"# {args.gpu}", "", PREAMBLE]
    taken = []
    for title, name, per_block in SECTIONS:
        f = args.out_dir / name
        body = old.get(title, "")
        if f.is_file() and f.read_text().strip():
            new = own_heading_dropped(f.read_text())
            body = merge(body, new) if per_block else new
            taken.append(name)
        if body:
            parts += ["", f"## {title}", "", body]
    extra = [t for t in old if t not in {s[0] for s in SECTIONS}]
    for title in extra:                      # sections this script does not write: kept as they are
        parts += ["", f"## {title}", "", old[title]]
    dest = args.out_dir / f"{slug}.md"
    dest.write_text("\n".join(parts) + "\n")
    print(f"{dest}: {', '.join(taken) or 'no new sections'} merged into "
          f"{base if base.is_file() else 'an empty file'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
