"""``rwkv-chat bench``: decode and prefill speed, achieved bandwidth, and the reference package as a peer.

    rwkv-chat bench --shape 1.5B --strategy "cuda fp16" --batch 1 64 --prompt-len 1024 --compare-rwkv-pip

Decode runs through ``models.decode.BatchDecoder`` (CUDA graph per batch bucket on one CUDA device;
RWKV-7 through the fused kernels of ``models/backends/fused_cuda.py``, other generations torch.compile'd), prefill
through ``RWKV.forward`` (RWKV-7 on CUDA: the fused prefill block). Bytes per decode step = every weight the step reads (all layers and
the head; the embedding row is negligible) + the recurrent state read and written; achieved GB/s is that
over the median step time, and the ceiling is a device-to-device copy measured in the same run (bytes
read + written). The reference ``rwkv`` 0.8.32 runs in a subprocess (``RWKV_V7_ON=1`` must precede its
import) on the same weights, saved to a temporary ``.pth``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def copy_bandwidth(dev: torch.device) -> float:
    """Measured device copy bandwidth, GB/s (bytes read + written), median of 10 copies."""
    n = (1 << 30) if dev.type == "cuda" else (1 << 27)
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_(0, 255)
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        _sync(dev)
        t = time.perf_counter()
        b.copy_(a)
        _sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t)
    del a, b
    return 2 * n / statistics.median(times) / 1e9


def step_bytes(model, batch: int) -> int:
    """Bytes a decode step must move: weights of every layer and the head, plus the state read + written."""
    from rwkv_chat.models.formats import nbytes as size

    w = sum(size(t) for layer in model.layers for t in layer.values()) + size(model.head)
    w += sum(t.numel() * t.element_size() for t in model.ln_out)
    st = sum(t.numel() * t.element_size() for layer in model.zero_state(1).layers for t in layer)
    return w + 2 * st * batch


def bench_decode(model, batch: int, tokens: int, graphs, compile, gemv: str, large: str = "fused",
                 ffn: str | None = None) -> dict:
    from rwkv_chat.models.rwkv.decode import BatchDecoder

    dev = model.emb.device
    dec = BatchDecoder(model, max_batch=batch, graphs=graphs, compile=compile, gemv=gemv, large=large, ffn=ffn)
    _, st = model.forward([1, 2, 3, 4], None)
    handles = [dec.add(st) for _ in range(batch)]
    toks = {h: (7 * i) % model.vocab_size for i, h in enumerate(handles)}
    t0 = time.perf_counter()
    out = dec.step(toks)                           # capture / compile
    _sync(dev)
    warm_s = time.perf_counter() - t0
    for _ in range(5):
        out = dec.step({h: int(torch.argmax(out[h])) for h in handles[:1]} | {h: 1 for h in handles[1:]})
    times = []
    for _ in range(tokens):
        t = time.perf_counter()
        if batch == 1:
            h = handles[0]
            out = dec.step({h: int(torch.argmax(out[h]))})   # greedy: the argmax syncs each token
        else:
            out = dec.step(toks)
            _sync(dev)
        times.append(time.perf_counter() - t)
    times.sort()
    p50, p90 = times[len(times) // 2], times[int(len(times) * 0.9)]
    mean = sum(times) / len(times)
    nbytes = step_bytes(model, batch)
    greedy = None
    if batch == 1:   # the argmax fed back on the device: no host round trip per token
        h = handles[0]
        from rwkv_chat.models.rwkv.decode import GREEDY_UNROLL
        dec.greedy({h: 1}, GREEDY_UNROLL + 1)      # capture both graphs (8 steps, 1 step)
        _sync(dev)
        t = time.perf_counter()
        dec.greedy({h: int(torch.argmax(out[h]))}, tokens)
        _sync(dev)
        greedy = tokens / (time.perf_counter() - t)
    return {"greedy_tok_s": greedy, "batch": batch, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3, "tok_s": batch / mean,
            "gb_s": nbytes / p50 / 1e9, "step_bytes": nbytes, "warmup_s": warm_s,
            "graphs": dec.graphs, "compile": dec.compile, "gemv": dec.gemv, "fused": dec.fused,
            "large": dec.large if batch > 4 else None,
            "ffn": (dec.ffn or getattr(model.backend, "ffn", None)) if dec.fused and batch <= 4 else None,
            "fold_norms": bool(getattr(model.backend, "fold_norms", False)) and dec.fused and batch <= 4
            and dec.gemv == "ours",
            "persistent": getattr(model.backend, "persistent", None) is not None and dec.fused and batch == 1
            and dec.gemv == "ours",
            "tuned_gemm": (bool(getattr(model.backend, "tuned_gemm", False)) if dec.fused and batch > 4
                           and dec.large != "compiled" else None)}


#: eager decode steps over which ``skipped_rows`` averages
SKIP_STEPS = 8


def rebuild_fused(model, **changes) -> str | None:
    """Rebuild the fused CUDA backend of ``model`` (before its first forward) with ``changes`` to its settings
    (``ffn``, ``mix_rkv``, ``fold_norms``, ``tuned_gemm``, ``wkv7_tensor_cores``, ``quant_rows``, ``persistent_step``;
    the others kept); None on success,
    else why it cannot (not RWKV-7 on the fused CUDA backend). A probed setting that does not serve is left off: the
    backend says why (``fold_note``)."""
    from rwkv_chat.models.backends.fused_cuda import FusedCuda

    be = model.backend
    if not isinstance(be, FusedCuda) or not be.decodes:
        return f"needs an RWKV-7 model on the fused CUDA backend (this one: {be})"
    settings = dict(ffn=be.ffn, mix_rkv=be.mix_rkv, fold_norms=be.fold_norms, tuned_gemm=be.tuned_gemm,
                    wkv7_tensor_cores=be.wkv7_tensor_cores, quant_rows=be.quant_rows,
                    persistent_step=be.persistent is not None)
    model.backend = FusedCuda(model, be.ops, **{**settings, **changes})
    return None


def use_sparse_ffn(model, fold_norms: bool = False) -> str | None:
    """Rebuild the fused CUDA backend of ``model`` (before its first forward) with the row kernel for the
    channel-mix value product; None on success, else why it cannot (not RWKV-7 on the fused CUDA backend, or
    ``fold_norms`` asked for and not serving)."""
    why = rebuild_fused(model, ffn="sparse", fold_norms=fold_norms)
    return why or (model.backend.fold_note if fold_norms else None)


def skipped_rows(model, steps: int = SKIP_STEPS) -> float | None:
    """The mean share of rows of the value matrices that the row kernel leaves unread over ``steps`` eager
    batch-1 decode steps (greedy from a short prompt), or None where no step used it."""
    from rwkv_chat.models.rwkv.decode import BatchDecoder

    be = model.backend
    be.skipped = []
    try:
        dec = BatchDecoder(model, max_batch=1, graphs=False, compile=False, gemv="ours", fused=True)
        _, st = model.forward([1, 2, 3, 4], None)
        h = dec.add(st)
        tok = 5
        for _ in range(steps):
            out = dec.step({h: tok})
            tok = int(torch.argmax(out[h]))
        shares = be.skipped
    finally:
        be.skipped = None
    return sum(shares) / len(shares) if shares else None


def _tuned_stats() -> list[dict]:
    from rwkv_chat.models.kernels import dispatch

    return dispatch.gemm_tuned_stats()


def _shape_key(s: dict) -> tuple:
    return tuple(s[k] for k in ("device", "batch", "rows", "K", "M"))


def tuned_gemm_note(batches, before: set) -> str | None:
    """One line per decode batch size above 4 on the per-shape cuBLASLt choices its steps made (products of ``rows``
    equal to that batch size, not among ``before``: the shapes kept before the decode runs, e.g. the load probe's);
    None when there are none."""
    new = [s for s in _tuned_stats() if _shape_key(s) not in before and s["us_first"] > 0]
    lines = []
    for b in batches:
        st = [s for s in new if s["rows"] == b]
        if not st:
            continue
        first, best = sum(s["us_first"] for s in st), sum(s["us_best"] for s in st)
        won = sum(s["index"] > 0 for s in st)
        lines.append(f"batch {b}: cuBLASLt algorithm timed per shape at the first step (L2 flushed before each timed "
                     f"call): {len(st)} product shapes, {won} of them on another algorithm than the heuristic's first "
                     f"pick; one call of each: {first:.1f} us by the first pick, {best:.1f} us kept "
                     f"({first / best:.2f}x)")
    return "\n\n".join(lines) or None


def _path(d: dict) -> str:
    if d["fused"] and d.get("large") == "compiled":
        return "torch.compile (fused path above 4 rows off)"
    if d["fused"]:
        ffn = f", channel-mix value {d['ffn']}" if d.get("ffn") and d.get("gemv") == "ours" else ""
        fold = ", ln1 / ln2 inside the GEMVs" if d.get("fold_norms") else ""
        if d.get("persistent"):
            fold = ", every layer in one persistent launch"
        tuned = {True: ", cuBLASLt tuned per shape", False: ", cuBLAS heuristic"}.get(d.get("tuned_gemm"), "")
        return "fused kernels" + (f" ({d['large']})" if d.get("large") else "") + ffn + fold + tuned
    return "torch.compile" if d["compile"] else "eager"


def bench_prefill(model, prompt_len: int, repeats: int = 5) -> dict:
    """Median prefill time of ``prompt_len`` tokens from the zero state. Where the model prefills through
    CUDA graphs (``models/rwkv/prefill_graph.py``: a shape is captured on its second prefill) the timed runs
    replay the graph, and the eager path is timed too (``eager_ms``)."""
    dev = model.emb.device
    ids = [(i * 131) % model.vocab_size for i in range(prompt_len)]

    def timed() -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.forward(ids, None)
            _sync(dev)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    model.forward(ids, None)
    model.forward(ids, None)
    _sync(dev)
    med = timed()
    res = {"prompt_len": prompt_len, "ms": med * 1e3, "tok_s": prompt_len / med}
    graphs = model.prefill_graphs
    if graphs is not None and graphs.disabled is None:
        graphs.disabled = "timing the eager path"
        try:
            res["eager_ms"] = timed() * 1e3
        finally:
            graphs.disabled = None
    return res


_REFERENCE = r'''
import json, os, sys, time, statistics
req = json.loads(sys.argv[1])
out = os.fdopen(os.dup(1), "w")   # our results; everything else (banners, extension builds) -> stderr
os.dup2(2, 1)
sys.stdout = sys.stderr
import torch
torch.set_num_threads(req["threads"])
from rwkv.model import RWKV
m = RWKV(model=req["model"], strategy=req["strategy"])
dev = "cuda" if req["strategy"].startswith("cuda") else "cpu"
sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)
logits, st = m.forward([1, 2, 3, 4], None)
for _ in range(3):
    logits, st = m.forward([int(torch.argmax(logits))], st)
print("ready", file=out, flush=True)
sys.stdin.readline()
times = []
for _ in range(req["tokens"]):
    t = time.perf_counter()
    logits, st = m.forward([int(torch.argmax(logits))], st)
    times.append(time.perf_counter() - t)
times.sort()
res = {"p50_ms": times[len(times) // 2] * 1e3, "p90_ms": times[int(len(times) * 0.9)] * 1e3,
       "tok_s": len(times) / sum(times)}
n = req["prompt_len"]
if n:
    ids = [(i * 131) % req["vocab"] for i in range(n)]
    m.forward(ids, None); sync()
    pt = []
    for _ in range(3):
        t = time.perf_counter(); m.forward(ids, None); sync(); pt.append(time.perf_counter() - t)
    res["prefill_tok_s"] = n / statistics.median(pt)
print(json.dumps(res), file=out, flush=True)
'''


class Reference:
    """The ``rwkv`` pip package on the same weights, in its own process (started early, so that its
    CUDA extension builds while our own benchmarks run; it times only after ``run`` is called)."""

    def __init__(self, pth: Path, strategy: str, tokens: int, prompt_len: int, vocab: int, v7: bool,
                 threads: int = 1):
        cpu = strategy.startswith("cpu")
        env = dict(os.environ, RWKV_JIT_ON="0" if cpu else "1", RWKV_CUDA_ON="0" if cpu else "1")
        if cpu:      # the same CPU threads as ours (OpenMP / MKL read these before torch starts)
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if v7:
            env["RWKV_V7_ON"] = "1"
        model = str(pth)[:-4] if v7 and str(pth).endswith(".pth") else str(pth)
        req = {"model": model, "strategy": " ".join(strategy.split()[:2]), "tokens": tokens,
               "prompt_len": prompt_len, "vocab": vocab, "threads": threads}
        self.log = tempfile.TemporaryFile(mode="w+")     # its banners and errors: the last line says why it failed
        self.proc = subprocess.Popen([sys.executable, "-c", _REFERENCE, json.dumps(req)], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def _why(self) -> str:
        self.log.seek(0)
        lines = [ln.strip() for ln in self.log.read().splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.proc.returncode}"

    def run(self, timeout: float = 900) -> dict:
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            self.proc.wait()
            return {"error": f"the reference did not start: {self._why()}"}
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        self.proc.wait(timeout=timeout)
        try:
            return json.loads(line)
        except ValueError:
            return {"error": f"the reference failed: {self._why()}"}


def build_model(args):
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv import shapes

    if args.model:
        return RWKV(model=args.model, strategy=args.strategy), Path(args.model), args.model
    fp32 = "fp32" in args.strategy.split()[1]
    dev = "cuda" if args.strategy.startswith("cuda") and torch.cuda.is_available() else "cpu"
    w = shapes.random_checkpoint(args.shape, dtype=torch.float32 if fp32 else torch.float16, device=dev)
    pth = None
    if args.compare_rwkv_pip:
        pth = Path(tempfile.mkdtemp(prefix="rwkv-bench-")) / f"rwkv7-{args.shape}.pth"
        shapes.save_pth(w, pth)
    model = RWKV(model=w, strategy=args.strategy)
    del w
    if dev == "cuda":
        torch.cuda.empty_cache()
    return model, pth, f"RWKV-7 {args.shape} (random weights)"


EXAMPLES = """examples:
  rwkv-chat bench --model ~/models/rwkv7-0.1B.pth --strategy "cpu fp32"
  rwkv-chat bench --shape 0.1B --strategy "cpu fp32" --threads 2 --compare-rwkv-pip
  rwkv-chat bench --shape 1.5B --strategy "cuda fp16" --batch 1 64 --prompt-len 1024 --compare-rwkv-pip
  rwkv-chat bench --family qwen2 --shape 1.5B --strategy "cuda bf16" --batch 1 64   (Qwen2; --family qwen2 --help)"""


def qwen2_main(argv: list[str]) -> int:
    """``rwkv-chat bench --family qwen2``: a Qwen2 folder or random weights of an official shape, decode and prefill
    with the measured ceilings and ``transformers`` as the peer (``rwkv_chat.models.qwen2.speed``)."""
    from rwkv_chat.models.qwen2 import shapes, speed
    from rwkv_chat.models.qwen2.fused import DEFAULT_GEMV, GEMV_MODES
    from rwkv_chat.models.qwen2.model import Qwen2
    from rwkv_chat.models.strategy import DTYPES, parse_strategy, torch_device

    ap = argparse.ArgumentParser(prog="rwkv-chat bench --family qwen2", description=(qwen2_main.__doc__ or "").replace("``", ""))
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=["tiny", *shapes.SHAPES], help="random weights of this shape")
    src.add_argument("--model", metavar="FOLDER",
                     help="a Hugging Face Qwen2 / Qwen3 folder (a folder given to rwkv-chat bench --model is one)")
    ap.add_argument("--strategy", default="cuda bf16" if torch.cuda.is_available() else "cpu fp32", metavar="S",
                    help='where and how the model runs (default "cuda bf16" on a GPU, else "cpu fp32")')
    ap.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="decode batch sizes (default 1)")
    ap.add_argument("--prompt-len", type=int, default=1024, metavar="T", help="prefill length (default 1024; 0: skip)")
    ap.add_argument("--tokens", type=int, default=100, metavar="N", help="timed decode steps (default 100)")
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--gemv", choices=GEMV_MODES, default=DEFAULT_GEMV,
                    help=f"decode products of 1..4 rows (default {DEFAULT_GEMV}): compiled-norm (the compiled grouped "
                         "GEMV with the residual add and RMSNorm inside its launches), compiled (RMSNorm, then the "
                         "compiled grouped GEMV), cublas (RMSNorm, then cuBLAS) or triton (norm_gemv, the RMSNorm "
                         "inside)")
    ap.add_argument("--md", metavar="FILE", help="append the table to this markdown file")
    args = ap.parse_args(argv)
    check_run_args(ap, args)
    stage = parse_strategy(args.strategy)[0]
    dev, dtype = torch_device(stage.device), stage.dtype
    with tempfile.TemporaryDirectory(prefix="qwen2-bench-") as tmp:
        folder = Path(args.model) if args.model else shapes.write_random(Path(tmp) / args.shape, args.shape, dtype,
                                                                         device=dev)
        model = Qwen2(folder, args.strategy)
        if args.gemv != DEFAULT_GEMV:          # the model chose its default at load
            model.use_kernels(gemv=args.gemv)
        peer = None if args.no_peer else speed.peer_speed(folder, dtype, dev, args.tokens, args.prompt_len)
        ceiling, peak = copy_bandwidth(dev), speed.matmul_peak(dtype, dev)
        name = args.model or f"Qwen2 {args.shape} (random)"
        rows = speed.table_rows(name, model, args.batch, args.prompt_len, args.tokens, ceiling, peak, peer)
    dt = next(k for k, v in DTYPES.items() if v == dtype)
    lines = [*provenance(["--family", "qwen2", *argv], prog="rwkv-chat bench", device=dev), "",
             f"strategy {args.strategy!r}, backend {model.backend}; ceilings: copy {ceiling:.0f} GB/s, {dt} matmul "
             f"{peak:.1f} TFLOP/s", "", *speed.HEADER, *rows]
    print("\n".join(lines))
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


def check_run_args(ap: argparse.ArgumentParser, args) -> None:
    """One-line usage errors (``ap.error``: exit 2) for run lengths and output files a run could not use: decode
    steps and batch sizes of 1 or more, a prefill length of 0 or more, ``--md`` / ``--json`` in an existing
    folder (checked before the run, so that no result is lost at its end)."""
    if args.tokens < 1:
        ap.error(f"--tokens must be 1 or more, got {args.tokens}")
    if any(b < 1 for b in args.batch):
        ap.error(f"--batch sizes must be 1 or more, got {' '.join(map(str, args.batch))}")
    if args.prompt_len < 0:
        ap.error(f"--prompt-len must be 0 (skip the prefill) or more, got {args.prompt_len}")
    for flag in ("md", "json"):
        out = getattr(args, flag, None)
        if out and not Path(out).resolve().parent.is_dir():       # the path as the run will open it
            ap.error(f"--{flag} {out}: the folder {Path(out).resolve().parent} does not exist")
        if out and Path(out).is_dir():
            ap.error(f"--{flag} {out} is a folder; give a file to append to")


def main(argv: list[str] | None = None) -> int:
    """Run ``rwkv-chat bench``; returns the exit code. ``--family qwen2``, or a folder given to ``--model`` (a
    Hugging Face checkpoint), measures a Qwen2 (:func:`qwen2_main`). A mistake the engine finds (a missing or
    unreadable model, a bad strategy, a device this torch lacks) is one line on stderr and exit code 2."""
    from rwkv_chat.models.errors import RWKVError

    family = argparse.ArgumentParser(add_help=False)
    family.add_argument("--family", choices=["rwkv", "qwen2"])
    known, rest = family.parse_known_args(sys.argv[1:] if argv is None else argv)
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model")
    model = peek.parse_known_args(rest)[0].model
    qwen = known.family == "qwen2" or (known.family is None and bool(model) and Path(model).expanduser().is_dir())
    try:
        return qwen2_main(rest) if qwen else rwkv_main(rest)
    except RWKVError as e:
        print(f"rwkv-chat bench: {e}", file=sys.stderr)
        return 2


def rwkv_main(argv: list[str]) -> int:
    """``rwkv-chat bench`` of an RWKV checkpoint or of random weights of an official RWKV-7 shape."""
    ap = argparse.ArgumentParser(prog="rwkv-chat bench", description=__doc__.split("\n\n")[0].replace("``", ""),
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--shape", choices=["0.1B", "0.4B", "1.5B", "2.9B", "7.2B"],
                     help="an RWKV-7 of this size with random weights (nothing to download)")
    src.add_argument("--model", metavar="PATH",
                     help="a checkpoint to measure (.pth / .safetensors; a Qwen2 folder: see --family qwen2 --help)")
    ap.add_argument("--strategy", default="cuda fp16" if torch.cuda.is_available() else "cpu fp32", metavar="S",
                    help='where and how the model runs (default "cuda fp16" on a GPU, else "cpu fp32"; '
                         "rwkv-chat load --help explains the syntax)")
    ap.add_argument("--threads", type=int, default=1, metavar="N",
                    help="CPU threads for ours and for the reference alike (default 1: steady on a busy machine)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1], metavar="B", help="decode batch sizes (default 1)")
    ap.add_argument("--prompt-len", type=int, default=512, metavar="T", help="prefill length (default 512; 0: skip)")
    ap.add_argument("--tokens", type=int, default=200, metavar="N", help="timed decode steps (default 200)")
    ap.add_argument("--compare-rwkv-pip", action="store_true",
                    help="also time the reference package (pip install rwkv==0.8.32) on the same weights")
    ap.add_argument("--no-graph", action="store_true", help="decode without CUDA graphs")
    ap.add_argument("--no-compile", action="store_true", help="decode without torch.compile")
    ap.add_argument("--gemv", choices=["auto", "ours", "cublas", "fused"], default="auto",
                    help="GPU only: large-matrix GEMV: ours (grouped kernel, fused RWKV-7 path), cublas, fused "
                         "(compiled path)")
    ap.add_argument("--large", choices=["fused", "fused-split", "compiled"], default="fused",
                    help="GPU only: fused RWKV-7 decode above 4 rows: fused kernels + batched cuBLAS GEMMs "
                         "(default), the same with the row-split WKV, or the torch.compile'd step")
    ap.add_argument("--ffn", choices=["gemv", "sparse"],
                    help="GPU only: the RWKV-7 channel-mix value product of decode steps at <= 4 rows: the grouped "
                         "GEMV or the row kernel that skips the rows where relu(k)^2 is zero (lossless; the share of "
                         "rows skipped is reported); default: the fused backend's choice for the width (the row "
                         "kernel from C = 4096, the 7.2B shape)")
    ap.add_argument("--fold-norms", action="store_true",
                    help="GPU only: RWKV-7 decode steps at <= 4 rows with ln1 / ln2 (residual add, LayerNorm, "
                         "token-shift lerps) inside the grouped GEMV launches (two launches per layer fewer)")
    ap.add_argument("--no-fold-norms", action="store_true",
                    help="GPU only: RWKV-7 decode steps with ln1 / ln2 in launches of their own (the default above "
                         "C = 768; --fold-norms forces them inside for any size)")
    ap.add_argument("--persistent-step", choices=("ring", "registers", "l2", "plain"),
                    help="GPU only: RWKV-7 decode steps of one row run every layer in one persistent launch "
                         "(csrc/fused/v7_step.cu), each block's weights streamed through a ring of shared-memory "
                         "tiles (sm_90+), or the next stage's weights requested before each grid barrier into "
                         "registers, into L2, or not")
    ap.add_argument("--untuned-gemm", action="store_true",
                    help="GPU only: RWKV-7 decode above 4 rows with cuBLAS's heuristic algorithm for every product "
                         "instead of the cuBLASLt algorithm timed per shape at the first step")
    ap.add_argument("--wkv7-chunk", choices=("tensor-cores", "cuda-cores"),
                    help="GPU only: RWKV-7 prefill's chunked WKV-7 on the tensor cores (Triton, tf32x3) or the CUDA "
                         "cores (csrc/wkv7); default: the fused backend's choice")
    ap.add_argument("--kernels", action="store_true",
                    help="build the compiled kernels (models.kernels) before loading and report their status "
                         "(the model uses them either way where they build)")
    ap.add_argument("--md", metavar="FILE", help="append the table to this markdown file")
    ap.add_argument("--json", metavar="FILE", help="append the results (one JSON line) to this file")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads must be 1 or more, got {args.threads}")
    check_run_args(ap, args)
    if args.fold_norms and args.no_fold_norms:
        ap.error("--fold-norms and --no-fold-norms exclude each other")
    if args.compare_rwkv_pip and not reference_installed():
        print("rwkv-chat bench: --compare-rwkv-pip needs the reference package: pip install rwkv==0.8.32",
              file=sys.stderr)
        return 1

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.kernels:
        from rwkv_chat.models import kernels

        dev_type = "cuda" if args.strategy.startswith("cuda") else "cpu"
        try:
            status = kernels.ensure_built(dev_type)
            print("kernels: " + "; ".join(f"{fam}: {why}" for fam, why in status.items()), file=sys.stderr)
        except Exception as e:  # the torch paths serve; say so
            print(f"kernels unavailable: {type(e).__name__}: {e}", file=sys.stderr)
            args.kernels = False
    model, pth, name = build_model(args)
    dev = model.emb.device
    gpu = dev.type == "cuda"
    skipped = None
    changes, flags = {}, []
    if args.ffn:
        changes["ffn"], flags = args.ffn, [f"--ffn {args.ffn}"]   # the fold kept as attach chose it for this width
    if args.fold_norms or args.no_fold_norms:
        changes["fold_norms"] = args.fold_norms
        flags.append("--fold-norms" if args.fold_norms else "--no-fold-norms")
    if args.persistent_step:
        changes["persistent_step"] = True
        flags.append(f"--persistent-step {args.persistent_step}")
    if args.untuned_gemm:
        changes["tuned_gemm"] = False
        flags.append("--untuned-gemm")
    if args.wkv7_chunk:
        changes["wkv7_tensor_cores"] = args.wkv7_chunk == "tensor-cores"
        flags.append(f"--wkv7-chunk {args.wkv7_chunk}")
    if changes:
        why = (rebuild_fused(model, **changes) or (model.backend.fold_note if args.fold_norms else None)
               or (model.backend.persistent_note if args.persistent_step else None))
        if why:
            print(f"rwkv-chat bench: {' '.join(flags)}: {why}", file=sys.stderr)
            return 2
    if args.persistent_step:
        from rwkv_chat.models.backends.persistent_step import PREFETCH
        if args.persistent_step == "ring" and torch.cuda.get_device_capability(model.devices[0])[0] < 9:
            print("rwkv-chat bench: --persistent-step ring: needs compute capability 9.0 or newer (bulk copies); "
                  "plain, l2 or registers run here", file=sys.stderr)
            return 2
        model.backend.persistent.prefetch = PREFETCH.index(args.persistent_step)
    if getattr(model.backend, "ffn", None) == "sparse" and getattr(model.backend, "decodes", False):
        with torch.no_grad():
            skipped = skipped_rows(model)
    ref = None
    if args.compare_rwkv_pip and gpu:  # start early: its CUDA build overlaps our runs
        ref = Reference(pth, args.strategy, min(args.tokens, 100), args.prompt_len, model.vocab_size,
                        model.version == "7", args.threads)
    bw = copy_bandwidth(dev) if gpu else None     # a GPU's ceiling; a CPU copy says little about a decode step
    graphs = False if args.no_graph else None
    comp = False if args.no_compile else None
    tuned_before = {_shape_key(s) for s in _tuned_stats()}     # the load probe's shapes, not the decode's
    with torch.no_grad():
        dec = []
        for b in args.batch:
            n = args.tokens if b == 1 else max(20, args.tokens // 4)
            try:
                dec.append(bench_decode(model, b, n, graphs, comp, args.gemv, args.large))
            except Exception as e:  # report, then measure the uncompiled path instead
                print(f"decode batch {b} with compile failed: {type(e).__name__}: {e}", file=sys.stderr)
                dec.append(bench_decode(model, b, n, graphs, False, args.gemv, args.large))
        pre = bench_prefill(model, args.prompt_len) if args.prompt_len else None
    if args.compare_rwkv_pip and ref is None:  # on CPU the peer runs alone, after ours
        ref = Reference(pth, args.strategy, min(args.tokens, 100), args.prompt_len, model.vocab_size,
                        model.version == "7", args.threads)
    ref_res = ref.run() if ref else None
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    device = torch.cuda.get_device_name(dev) if gpu else f"CPU ({threads})"
    cmd, machine = command_line(argv, "rwkv-chat bench"), machine_line(dev)
    res = {"model": name, "strategy": args.strategy, "device": device, "torch": torch.__version__,
           "threads": args.threads, "command": cmd, "machine": machine,
           "copy_gb_s": bw, "decode": dec, "prefill": pre, "reference": ref_res}
    kern = ", compiled kernels installed" if args.kernels else ""
    lines = [f"### {name}, `{args.strategy}`, {device}, torch {torch.__version__}{kern}", "",
             f"command: `{cmd}`", "", machine, ""]
    if gpu:
        lines += [f"copy bandwidth (measured, read+write): {bw:.0f} GB/s", "",
                  "| batch | decode tok/s | p50 ms/step | p90 ms/step | GB/s | % of copy BW | graph | path | gemv |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for d in dec:
            lines.append(f"| {d['batch']} | {d['tok_s']:.1f} | {d['p50_ms']:.3f} | {d['p90_ms']:.3f} | "
                         f"{d['gb_s']:.0f} | {100 * d['gb_s'] / bw:.0f}% | {d['graphs']} | {_path(d)} | {d['gemv']} |")
    else:
        lines += ["| batch | decode tok/s | p50 ms/step | p90 ms/step | GB/s | backend |", "|---|---|---|---|---|---|"]
        for d in dec:
            lines.append(f"| {d['batch']} | {d['tok_s']:.1f} | {d['p50_ms']:.3f} | {d['p90_ms']:.3f} | "
                         f"{d['gb_s']:.1f} | {model.backend.name} |")
    if any(d.get("tuned_gemm") for d in dec) and (note := tuned_gemm_note([d["batch"] for d in dec], tuned_before)):
        lines += ["", note]
    if args.persistent_step and gpu:
        with torch.no_grad():
            _, st = model.forward([1, 2, 3], None)
            us = model.backend.persistent.stage_times(model, [t.contiguous() for lay in st.layers for t in lay])
        res["persistent_stage_us"] = us
        lines += ["", "persistent step, µs per layer by stage to its barrier's exit (eager steps): " + ", ".join(
            f"{n} {u:.1f}" for n, u in zip(("A ln1 + r/k/v + low-rank 1", "B heads", "C output", "D ln2 + key",
                                            "E value"), us)) + f"; {sum(us):.1f} per layer"]
    if skipped is not None:
        lines += ["", f"channel-mix value product by the row kernel: {100 * skipped:.1f}% of the value matrices' rows "
                      f"skipped (relu(k)^2 zero; mean over {SKIP_STEPS} eager batch-1 decode steps)"]
        res["ffn_skipped"] = skipped
    for d in dec:
        if d.get("greedy_tok_s"):
            where = "on the device (no host round trip per token" if gpu else "in the decoder (no sampler"
            lines += ["", f"batch 1, greedy with the argmax {where}; "
                          f"`BatchDecoder.greedy`): {d['greedy_tok_s']:.1f} tok/s ({1e3 / d['greedy_tok_s']:.3f} ms/token)"]
    if pre:
        lines += ["", f"prefill {pre['prompt_len']} tokens: {pre['tok_s']:.0f} tok/s ({pre['ms']:.1f} ms)"]
        if "eager_ms" in pre:
            lines[-1] += (f" through a CUDA graph; eager launches {pre['prompt_len'] / pre['eager_ms'] * 1e3:.0f} tok/s "
                          f"({pre['eager_ms']:.1f} ms)")
    if ref_res:
        if "error" in ref_res:
            lines += ["", f"reference rwkv 0.8.32: {ref_res['error']}"]
        else:
            lines += ["", f"reference rwkv 0.8.32 ({threads if not gpu else device}): decode {ref_res['tok_s']:.1f} "
                      f"tok/s (p50 {ref_res['p50_ms']:.3f} ms) -> ratio {dec[0]['tok_s'] / ref_res['tok_s']:.2f}x"]
            if pre and "prefill_tok_s" in ref_res:
                lines[-1] += (f"; prefill {ref_res['prefill_tok_s']:.0f} tok/s -> ratio "
                              f"{pre['tok_s'] / ref_res['prefill_tok_s']:.2f}x")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(res) + "\n")
    if pth and not args.model:
        pth.unlink(missing_ok=True)
    return 0


def reference_installed() -> bool:
    """Whether the reference ``rwkv`` package can be imported (``--compare-rwkv-pip``)."""
    import importlib.util

    try:
        return importlib.util.find_spec("rwkv") is not None
    except (ImportError, ValueError):
        return False


# Where a result came from: every benchmark and check script (bench/, tests/gpu/) heads its table with
# ``provenance``, so that each table in bench/results/ names its command, machine, software, tree and date.

def command_line(argv: list[str] | None = None, prog: str | None = None) -> str:
    """The running command as one shell line: ``sys.orig_argv`` with the interpreter by its name (``python3
    -m rwkv_chat.app.bench ...``, ``python3 bench/kernels.py ...`` as typed) and an installed entry point by its
    name (``rwkv-chat bench ...``). Where a caller passes ``argv`` that the process was not started with
    (``main(argv)`` from Python), ``prog`` followed by ``argv``."""
    import shlex

    words = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    if argv is not None:
        argv = [str(a) for a in argv]
        if len(words) < len(argv) or words[len(words) - len(argv):] != argv:
            return shlex.join([*shlex.split(prog or ""), *argv])
    if words and Path(words[0]).name.startswith("python"):
        words[0] = Path(words[0]).name
        if (len(words) > 1 and not words[1].startswith("-") and not words[1].endswith(".py")
                and Path(words[1]).is_file()):
            words = [Path(words[1]).name, *words[2:]]     # an entry point script (bin/rwkv-chat)
    return shlex.join(words)


def _source_tree(root: Path | None = None) -> str | None:
    """The git commit of the checkout this package runs from (``root``: the package's folder); where its files
    (tracked, or new and not ignored) differ from that commit, ``+ local changes, content <tree>``: the git tree id
    of the files as they are, which is the tree id of any commit that holds the same files
    (``git log --format='%h %T'`` finds it). None elsewhere (a copy without ``.git``)."""
    root = (root or Path(__file__).resolve().parents[1]).resolve()

    def git(*a: str, env: dict | None = None) -> str:
        return subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True, timeout=60,
                              check=True, env=env).stdout.strip()
    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None
        head = git("rev-parse", "--short=10", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        with tempfile.TemporaryDirectory() as d:    # a scratch index: the checkout's own index is left alone
            env = {**os.environ, "GIT_INDEX_FILE": str(Path(d) / "index")}
            git("add", "--all", env=env)
            tree = git("write-tree", env=env)
        return head if tree == git("rev-parse", "HEAD^{tree}") else f"{head} + local changes, content {tree[:10]}"
    except (OSError, subprocess.SubprocessError):    # e.g. a read-only .git: whether tracked files differ
        try:
            return head + (" + local changes" if git("status", "--porcelain", "--untracked-files=no") else "")
        except (OSError, subprocess.SubprocessError):
            return head


def machine_line(device: str | torch.device | None = None) -> str:
    """Accelerator (name, multiprocessors, memory, driver), CPU, torch / CUDA / Python versions, source tree
    and UTC date-time, in one line. ``device``: the CUDA device used (default: device 0 where CUDA is
    available); a CPU device leaves the accelerator out."""
    import datetime
    import platform

    parts = []
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0 if dev is None or dev.index is None else dev.index)
        gpu = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB"
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.split()
            gpu += f", driver {drv[0]}" if drv else ""
        except (OSError, subprocess.SubprocessError):
            pass
        parts.append(gpu + ")")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts.append(f"{cpu}, {platform.machine()} {os.cpu_count()} cores")
    sw = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
    parts.append(f"{sw}, Python {platform.python_version()}")
    tree = _source_tree()
    if tree:
        parts.append(f"tree {tree}")
    parts.append(datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    return "; ".join(parts)


def provenance(argv: list[str] | None = None, prog: str | None = None,
               device: str | torch.device | None = None) -> list[str]:
    """The lines a result table starts with: ``command: `...` `` (``command_line``), a blank line, and
    ``machine_line``."""
    return [f"command: `{command_line(argv, prog)}`", "", machine_line(device)]


if __name__ == "__main__":
    sys.exit(main())
