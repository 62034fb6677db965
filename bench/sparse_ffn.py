"""The channel-mix value product of an RWKV-7 decode step on a GPU: the grouped GEMV on the output-major matrix
(``fused_cuda._gemv``, the default path) against the compiled row kernel on the input-major one
(``dispatch.ffn_rows``, ``csrc/fused/ffn_rows.cu``), dense (every row read) and sparse (rows where relu(k)² is zero
in every batch row skipped), and the Triton form of the same product (``ops.sparse_ffn.ffn_value``, sparse), at the
7.2B (C=4096, F=16384) and 1.5B (C=2048, F=8192) shapes, fp16, batch 1..4.

    python bench/sparse_ffn.py [--out FILE.md] [--tiles]

h = relu(k)² of Gaussian k (about half zero per row; the share of rows zero in all M rows is then ~0.5^M), and
"trained-like" inputs where a share of the F rows is zero in every batch row (trained RWKV-7 channel-mixes are
sparser than random ones). Method as ``bench/kernels.py``: CUDA graph of back-to-back launches, median of 7
replays, weights rotated over enough copies to exceed 3x the L2 cache. GB/s: full matrix bytes (F·C·2) per
second ("effective", comparable across paths), and the bytes the sparse kernel actually reads (rows kept).
``--tiles``: also sweep the row kernel's grid (blocks per multiprocessor, threads per column tile) at M = 1
and 4.
``--decode 7.2B``: also whole decode steps of a random RWKV-7 model of that shape (fp16, CUDA graphs) at batch 1
and 4 with the value product sparse, dense and by the grouped GEMV (``app.bench.bench_decode``; its GB/s counts
every weight byte of a dense step).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.kernels import peak_copy_bw, sets_for, time_ms  # noqa: E402
from rwkv_chat.app.bench import bench_decode, provenance  # noqa: E402
from rwkv_chat.models import kernels  # noqa: E402
from rwkv_chat.models.backends import fused_cuda  # noqa: E402
from rwkv_chat.models.kernels import dispatch  # noqa: E402
from rwkv_chat.models.ops import _triton, sparse_ffn  # noqa: E402

SHAPES = {"7.2B": (4096, 16384), "1.5B": (2048, 8192)}
BLOCKS_PER_SM = (1, 2, 4)
TILE_THREADS = (0, 16, 32, 128)


def make_h(M: int, F: int, dead: float | None, g: torch.Generator) -> torch.Tensor:
    """fp16 h [M, F] = relu(k)²; with ``dead``, that share of rows zero in every batch row."""
    h = torch.relu(torch.randn(M, F, generator=g, device="cuda")).square()
    if dead is not None:
        h[:, torch.rand(F, generator=g, device="cuda") < dead] = 0
    return h.half()


def bench_shape(lines: list, name: str, peak: float) -> None:
    C, F = SHAPES[name]
    nbytes = F * C * 2
    n = sets_for(nbytes)
    g = torch.Generator(device="cuda").manual_seed(0)
    w_in = [(torch.randn(F, C, generator=g, device="cuda") * 0.02).half() for _ in range(n)]    # input-major
    w_out = [w.t().contiguous() for w in w_in]                                                   # output-major
    lines += ["", f"#### {name}: C={C}, F={F}, fp16 ({nbytes / 2**20:.0f} MiB; {n} copies rotated)", "",
              "| M | h | rows skipped | gemv (output-major) µs | GB/s | dense rows µs | GB/s | sparse rows µs | "
              "eff. GB/s | GB/s read | sparse vs gemv | Triton sparse µs | sparse == dense | rel. err vs gemv |",
              "|---" * 14 + "|"]
    for M in (1, 2, 3, 4):
        for dead in (None, 0.8, 0.9):
            h = make_h(M, F, dead, g)
            share = sparse_ffn.zero_row_fraction(h)
            t_gemv = time_ms(lambda i: fused_cuda._gemv([h], [w_out[i]], [0]), n) * 1e3
            t_dense = time_ms(lambda i: dispatch.ffn_rows(h, w_in[i], skip_zeros=False), n) * 1e3
            t_sparse = time_ms(lambda i: dispatch.ffn_rows(h, w_in[i]), n) * 1e3
            t_triton = time_ms(lambda i: sparse_ffn.ffn_value(h, w_in[i]), n) * 1e3 if _triton.available() else None
            y = dispatch.ffn_rows(h, w_in[0])
            same = torch.equal(y, dispatch.ffn_rows(h, w_in[0], skip_zeros=False))
            ref = fused_cuda._gemv([h], [w_out[0]], [0])[0].double()
            err = ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            gbs = lambda us, b=nbytes: b / us / 1e3       # noqa: E731
            lines.append(f"| {M} | {'relu² of randn' if dead is None else f'{dead:.0%} rows dead'} | {share:.1%} | "
                         f"{t_gemv:.1f} | {gbs(t_gemv):.0f} | {t_dense:.1f} | {gbs(t_dense):.0f} | {t_sparse:.1f} | "
                         f"{gbs(t_sparse):.0f} | {gbs(t_sparse, nbytes * (1 - share)):.0f} | "
                         f"{t_gemv / t_sparse:.2f}x | {'-' if t_triton is None else f'{t_triton:.1f}'} | {same} | "
                         f"{err:.1e} |")
            print(lines[-1], flush=True)
    lines.append(f"\ncopy bandwidth {peak:.0f} GB/s")


def bench_tiles(lines: list, name: str) -> None:
    """The row kernel's grid (blocks per multiprocessor) at M = 1 and 4."""
    C, F = SHAPES[name]
    n = sets_for(F * C * 2)
    g = torch.Generator(device="cuda").manual_seed(1)
    w_in = [(torch.randn(F, C, generator=g, device="cuda") * 0.02).half() for _ in range(n)]
    lines += ["", f"#### {name}, grid sweep of the row kernel", "",
              "| M | rows skipped | blocks per SM | threads per column tile | dense µs | sparse µs |",
              "|---|---|---|---|---|---|"]
    for M in (1, 4):
        h = make_h(M, F, None, g)
        share = sparse_ffn.zero_row_fraction(h)
        for bps in BLOCKS_PER_SM:
            for tpr in TILE_THREADS:
                kw = dict(blocks_per_sm=bps, tile_threads=tpr)
                td = time_ms(lambda i: dispatch.ffn_rows(h, w_in[i], skip_zeros=False, **kw), n) * 1e3
                ts = time_ms(lambda i: dispatch.ffn_rows(h, w_in[i], **kw), n) * 1e3
                lines.append(f"| {M} | {share:.1%} | {bps} | {tpr or 'auto'} | {td:.1f} | {ts:.1f} |")
                print(lines[-1], flush=True)


def bench_steps(lines: list, shape: str, tokens: int = 200) -> None:
    """Decode tok/s of a random RWKV-7 ``shape`` model with the value product sparse / dense / grouped GEMV."""
    from rwkv_chat.app.bench import use_sparse_ffn
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.backends.fused_cuda import FusedCuda
    from rwkv_chat.models.rwkv import shapes

    model = RWKV(model=shapes.random_checkpoint(shape, dtype=torch.float16, device="cuda", seed=3),
                 strategy="cuda fp16")
    use_sparse_ffn(model)             # the row kernel's input-major layout, before any forward (else "NOT SPARSE")
    lines += ["", f"#### decode steps, random RWKV-7 {shape}, cuda fp16, backend {model.backend}", "",
              "| batch | value product | tok/s | p50 ms/step | GB/s (dense step bytes) |", "|---|---|---|---|---|"]
    runs = [("sparse", "sparse"), ("dense", "dense")]
    if getattr(model.backend, "ffn", None) != "sparse":
        runs = []
        lines.append(f"| - | NOT SPARSE: {model.backend} | | | |")
    for label, ffn in runs + [("grouped GEMV", None)]:
        if ffn is None:      # the output-major layout: a backend built again (no forward since the prefill)
            model.backend = FusedCuda(model, model.backend.ops, ffn="gemv")
        for b in (1, 4):
            d = bench_decode(model, b, tokens, None, None, "auto", ffn=ffn)
            lines.append(f"| {b} | {label} | {d['tok_s']:.1f} | {d['p50_ms']:.3f} | {d['gb_s']:.0f} |")
            print(lines[-1], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiles", action="store_true")
    ap.add_argument("--decode", default=None, help="also time decode steps of a random model of this shape")
    args = ap.parse_args()
    print(kernels.ensure_built("cuda"), flush=True)
    peak, how = peak_copy_bw()
    lines = [*provenance(), "", "### RWKV-7 channel-mix value product, decode (batch 1..4)", "",
             f"row kernel: ``dispatch.ffn_rows`` (csrc/fused/ffn_rows.cu, 2 blocks per SM); Triton: "
             f"``ops.sparse_ffn.ffn_value``; copy bandwidth {peak:.0f} GB/s ({how})"]
    with torch.no_grad():
        for name in SHAPES:
            bench_shape(lines, name, peak)
            if args.tiles:
                bench_tiles(lines, name)
    if args.decode:
        bench_steps(lines, args.decode)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
