"""Weight formats on a GPU: batch-1 (and batch-64) decode of random-weight RWKV-7 models of the official shapes in
fp16 against fp16i8 / fp16i4 / fp16f8 in one call, the fp8 GEMM against the bf16 matmul, and the fused
LayerNorm + int4 q/k/v projection. Writes a Markdown table (``--out``, e.g. ``bench/results/h200.md``).

    python bench/formats.py --shapes 0.1B 1.5B 7.2B --batch 1 64 --out bench/results/h200-formats.md

Decode runs through ``BatchDecoder`` (CUDA graphs; RWKV-7 through the fused CUDA backend, whose large products go
to the model's ops: ``kernels.mm8`` / ``mm4`` / ``mmf8``). tok/s is the mean over ``--tokens`` steps after warm-up;
"× fp16" is the ratio to the fp16 model of the same shape measured in the same call (with ``--ffn``, the same
channel-mix value product: each format's model rebuilt with each one, "sparse" for the i8 / f8 value matrices
too (``FusedCuda(quant_rows=True)``), the share of rows the row kernel skipped reported). Bytes per step are the
weights of every layer and the head (``formats.nbytes``) plus the state read and written (every row of the value
matrices counted). "fp16 bytes / bytes" is the ratio a format would reach at fp16's bandwidth of the same call: the
ceiling of "× fp16" unless the format's step moves its bytes faster than fp16's does.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FORMATS = ("", "i8", "i4", "f8")


def _time(fn, reps: int = 50) -> float:
    """Median seconds of ``fn()`` on the current CUDA device (events; 5 warm-up calls)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def _backend(model, fmt: str) -> str:
    """The backend's name, with the probe outcome of the compiled GEMVs a quantized format's decode uses."""
    probes = getattr(model, "kernels", {}).get("cuda", {})
    keys = {"i8": ("gemvq u8 probe", "gemmq u8 probe"), "i4": ("gemvq probe",), "f8": ("gemvq probe",)}.get(fmt, ())
    notes = [f"{key}: {probes[key]}" for key in keys if key in probes]
    note = {"i4": "rkv_stack_note", "i8": "rkv8_stack_note"}.get(fmt)   # r, k, v of decode batches in one launch
    if note and hasattr(model.backend, note):
        notes.append(f"r/k/v stack: {getattr(model.backend, note) or 'ok'}")
    return f"{model.backend.name} ({'; '.join(notes)})" if notes else model.backend.name


def decode_rows(shape: str, batches: list[int], tokens: int, ffns: list[str | None] = (None,),
                i4_gemms: list[str | None] = (None,), i8_gemms: list[str | None] = (None,)) -> list[dict]:
    """Decode rows of every format (and, per ``ffns`` entry not None, the fused backend rebuilt with that channel-mix
    value product: "gemv" or "sparse"; per ``i4_gemms`` / ``i8_gemms`` entry not None, the i4 / i8 format with that
    product of decode batches: "tensor-cores" (``kernels.gemmq``; for i8 its uint8 form) or "triton")."""
    from rwkv_chat.app.bench import bench_decode, rebuild_fused, skipped_rows
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.kernels import gemmq
    from rwkv_chat.models.rwkv import shapes

    rows = []
    ckpt = shapes.random_checkpoint(shape, dtype=torch.float16, device="cuda")
    base: dict[tuple, float] = {}
    base_mb: dict[tuple, float] = {}
    tree_gemm, tree_u8, tree_stack = gemmq.ENABLED, gemmq.U8_ENABLED, gemmq.U8_STACK_ENABLED
    per_fmt = {"i4": i4_gemms, "i8": i8_gemms}
    runs = [(f, ff, g) for f in FORMATS for ff in ffns for g in per_fmt.get(f, (None,))]
    for fmt, ffn, gemm in runs:
        strategy = f"cuda fp16{fmt}"
        gemmq.ENABLED = tree_gemm if gemm is None or fmt != "i4" else gemm == "tensor-cores"
        gemmq.U8_ENABLED = tree_u8 if gemm is None or fmt != "i8" else gemm.startswith("tensor-cores")
        gemmq.U8_STACK_ENABLED = tree_stack if gemm is None or fmt != "i8" else gemm == "tensor-cores-stack"
        t0 = time.perf_counter()
        model = RWKV(ckpt, strategy)
        load_s = time.perf_counter() - t0
        note = "" if gemm is None else f", {'int4' if fmt == 'i4' else 'uint8'} GEMM of batches: {gemm}"
        if ffn is not None:
            why = rebuild_fused(model, ffn=ffn, quant_rows=ffn == "sparse")   # the row kernel for every format
            note += f", value product {ffn}" if why is None else f", value product: {why}"
            if why is None and ffn == "sparse" and (share := skipped_rows(model)) is not None:
                note += f" ({share:.1%} of rows skipped)"
        for b in batches:
            r = bench_decode(model, b, tokens, graphs=True, compile=None, gemv="auto")
            tok_s = r["tok_s"]
            if fmt == "":
                base[b, ffn], base_mb[b, ffn] = tok_s, r["step_bytes"] / 2**20
            rows.append({"shape": shape, "strategy": strategy, "batch": b, "tok_s": tok_s,
                         "ratio": tok_s / base[b, ffn], "gb_s": r["gb_s"], "step_mb": r["step_bytes"] / 2**20,
                         "bytes_ratio": base_mb[b, ffn] / (r["step_bytes"] / 2**20),
                         "greedy": r["greedy_tok_s"], "load_s": load_s,
                         "backend": _backend(model, fmt) + (note if b <= 4 or gemm else "")})
            print(rows[-1], flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    gemmq.ENABLED, gemmq.U8_ENABLED, gemmq.U8_STACK_ENABLED = tree_gemm, tree_u8, tree_stack
    del ckpt
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def fp8_gemm_row(n: int = 8192) -> dict:
    """``fp8_gemm`` at n³ against the bf16 ``torch.matmul`` of the same call, both timed as CUDA graphs of
    back-to-back calls (``bench/kernels.py``'s ``time_ms``, median of 7 replays): with per-row / per-column
    scales (the form ``FP8Linear`` uses: a per token, b per output channel) and with one scale per operand."""
    from bench.kernels import time_ms
    from rwkv_chat.models.ops import fp8_gemm, quantize_fp8

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    qa, sa = quantize_fp8(a)
    qb, sb = quantize_fp8(b.t().contiguous())
    qa1, sa1 = quantize_fp8(a, granularity="tensor")
    qb1, sb1 = quantize_fp8(b.t().contiguous(), granularity="tensor")
    t_bf16 = time_ms(lambda i: a @ b, 1, iters=10) / 1e3
    t_fp8 = time_ms(lambda i: fp8_gemm(qa, qb.t(), sa, sb.t(), output_dtype=torch.bfloat16), 1, iters=10) / 1e3
    t_one = time_ms(lambda i: fp8_gemm(qa1, qb1.t(), sa1, sb1, output_dtype=torch.bfloat16), 1, iters=10) / 1e3
    flops = 2 * n ** 3
    return {"n": n, "bf16_ms": t_bf16 * 1e3, "fp8_ms": t_fp8 * 1e3, "ratio": t_bf16 / t_fp8,
            "fp8_tflops": flops / t_fp8 / 1e12, "bf16_tflops": flops / t_bf16 / 1e12,
            "tensor_ms": t_one * 1e3, "tensor_ratio": t_bf16 / t_one}


def gptq_rows(H: int = 4096, sweep: bool = False) -> list[dict]:
    """``fused_ln_qkv_gptq`` at B=S=1 (the GEMV form) with qweight in the GPTQ layout and held output-major; with
    ``sweep`` also every (BLOCK_N, BLOCK_K, warps) of the GEMV form (the best per layout)."""
    return [gptq_row(H, om, sweep) for om in (False, True)]


GPTQ_SWEEP = [(bn, bk, w) for bn in (8, 16, 32, 64) for bk in (64, 128, 256) for w in (4, 8) if bn * bk <= 16384]


def gptq_row(H: int = 4096, output_major: bool = False, sweep: bool = False) -> dict:
    """Kernel time of one call in a CUDA graph (``bench.kernels.time_ms``: weight sets rotated past 3x the L2
    cache, so the weights come from device memory; no host launch cost in the figure)."""
    from bench.kernels import sets_for, time_ms
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.ops import fused_ln_qkv_gptq
    from rwkv_chat.models.ops.gptq import fused_ln_qkv_gptq_reference

    qs = [i4.quantize_i4(torch.randn(H, 3 * H, device="cuda") * 0.02).with_layout(output_major)]
    qs += [i4.quantize_i4(torch.randn(H, 3 * H, device="cuda") * 0.02).with_layout(output_major)
           for _ in range(sets_for(qs[0].nbytes()) - 1)]
    x = torch.randn(1, 1, H, device="cuda", dtype=torch.float16)
    lw, lb = torch.rand(H, device="cuda", dtype=torch.float16) + 0.5, torch.randn(H, device="cuda", dtype=torch.float16)

    def args(q):
        return (x, q.qweight, q.qzeros, q.scales, lw, lb, q.group_size, 1e-5)
    err = ((fused_ln_qkv_gptq(*args(qs[0])).float() - fused_ln_qkv_gptq_reference(*args(qs[0])).float()).norm()
           / fused_ln_qkv_gptq_reference(*args(qs[0])).float().norm()).item()
    t = time_ms(lambda i: fused_ln_qkv_gptq(*args(qs[i])), len(qs)) / 1e3
    nbytes = qs[0].nbytes() + 2 * H * 2
    from rwkv_chat.models.kernels import dispatch

    q = qs[0]
    compiled = dispatch.norm_gemv_i4(x.view(1, H), q.qweight, q.qzeros, q.scales, q.group_size, lw, lb, 1e-5,
                                     False) is not None
    row = {"H": H, "us": t * 1e6, "gb_s": nbytes / t / 1e9, "rel_err": err,
           "layout": "output-major" if output_major else "GPTQ layout",
           "path": "compiled int4 GEMV (csrc/gemvq)" if compiled else "Triton"}
    if sweep:
        found = {}
        for blocks in GPTQ_SWEEP:
            try:
                found[blocks] = time_ms(lambda i, b=blocks: fused_ln_qkv_gptq(*args(qs[i]), blocks=b), len(qs)) * 1e3
            except Exception as e:  # noqa: BLE001 — a config that does not compile is left out of the sweep
                print(f"blocks {blocks}: {type(e).__name__}", file=sys.stderr)
        if found:
            best = min(found, key=found.get)
            row["sweep"] = f"best (BLOCK_N, BLOCK_K, warps) {best}: {found[best]:.1f} µs; " + ", ".join(
                f"{b}: {us:.1f}" for b, us in sorted(found.items()))
    return row


def table(dec: list[dict], gemm: dict | None, gptq: list[dict] | None, argv: list[str]) -> str:
    from rwkv_chat.app.bench import provenance

    lines = ["## Weight formats (bench/formats.py)", "", *provenance(argv, "python bench/formats.py", "cuda")]
    if dec:
        lines += ["", "| shape | strategy | batch | tok/s | × fp16 | fp16 bytes / bytes | GB/s | MiB/step | backend |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in dec:
        lines.append(f"| {r['shape']} | {r['strategy']} | {r['batch']} | {r['tok_s']:.1f} | {r['ratio']:.2f}× | "
                     f"{r['bytes_ratio']:.2f}× | {r['gb_s']:.0f} | {r['step_mb']:.0f} | {r['backend']} |")
    if gemm:
        lines += ["", f"fp8_gemm {gemm['n']}³: {gemm['fp8_ms']:.2f} ms ({gemm['fp8_tflops']:.0f} TFLOP/s) vs bf16 "
                      f"matmul {gemm['bf16_ms']:.2f} ms ({gemm['bf16_tflops']:.0f} TFLOP/s): {gemm['ratio']:.2f}× "
                      f"(scales per row of a and per column of b; one scale per operand: {gemm['tensor_ms']:.2f} ms, "
                      f"{gemm['tensor_ratio']:.2f}×; CUDA graphs, median of 7 replays)"]
    for g in gptq or ():
        lines += ["", f"fused_ln_qkv_gptq H={g['H']}, B=S=1, qweight {g['layout']} ({g['path']}): {g['us']:.1f} µs "
                      f"({g['gb_s']:.0f} "
                      f"GB/s of weights; kernel time in a CUDA graph), relative error vs the torch reference "
                      f"{g['rel_err']:.2e}"]
        if "sweep" in g:
            lines += ["", f"sweep ({g['layout']}): {g['sweep']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["0.1B", "1.5B", "7.2B"],
                    help="decode rows of these shapes (none: the op rows only)")
    ap.add_argument("--batch", nargs="+", type=int, default=[1])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--skip-ops", action="store_true", help="decode only (no fp8_gemm / fused_ln_qkv_gptq rows)")
    ap.add_argument("--sweep", action="store_true", help="also every block shape of fused_ln_qkv_gptq's GEMV form")
    ap.add_argument("--ffn", nargs="+", choices=["gemv", "sparse"], default=None,
                    help="each format also with these RWKV-7 channel-mix value products of decode steps at <= 4 rows "
                         "(the grouped GEMV; the row kernel skipping zero rows of relu(k)^2); default: the backend's "
                         "choice for the width")
    ap.add_argument("--i4-gemm", nargs="+", choices=["tensor-cores", "triton"], default=None,
                    help="the i4 format also with these int4 products of decode batches above 4 rows (the compiled GEMM "
                         "on the tensor cores, kernels.gemmq; the Triton kernel); default: the tree's")
    ap.add_argument("--i8-gemm", nargs="+", choices=["tensor-cores", "tensor-cores-stack", "triton"], default=None,
                    help="the i8 format also with these products of decode batches above 4 rows (the uint8 form of "
                         "the tensor-core GEMM, kernels.gemmq.gemmq_u8; the same with r, k, v in one launch, "
                         "gemmq.U8_STACK_ENABLED; the Triton kernel); default: the tree's")
    ap.add_argument("--out", help="write the Markdown table here (appended)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/formats.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from rwkv_chat.models import kernels

    kernels.ensure_built("cuda")
    dec = [r for s in args.shapes
           for r in decode_rows(s, args.batch, args.tokens, args.ffn or [None], args.i4_gemm or [None],
                                args.i8_gemm or [None])]
    gemm = gptq = None
    if not args.skip_ops:
        gemm = fp8_gemm_row()
        gptq = gptq_rows(sweep=args.sweep)
    text = table(dec, gemm, gptq, argv)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
