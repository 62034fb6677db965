"""Kernel benchmark on a GPU: each kernel's time against the bytes it must move, with the copy
bandwidth measured in the same run, and the WKV-7 sequence kernel and the chunked WKV-7 kernel that
prefill runs against the ``rwkv`` pip package's ``wkv7s`` kernel on the same inputs.

    python bench/kernels.py [--cache DIR] [--ref-src DIR_WITH_rwkv7_op.cpp_AND_rwkv7.cu] [--out FILE.md]
                            [--only mm8|gemvq|wkv|gemm]

Method: CUDA events around a CUDA graph of back-to-back launches (an eager loop where a column says so),
median of 7 replays; inputs rotate among enough sets to exceed 3x the L2 cache (read from the device),
so weights come from device memory. Bytes = every input read once plus every output written once. Peers
per mm8 size: a copy of the same bytes and a launch that only reads them (Triton), the floor of one launch. Pass
mark for mm8 with one row (decode): >= 70% of the large-copy bandwidth at 2048², 4096² and 4096x16384.
The int4 / fp8 decode GEMVs (``csrc/gemvq``) are timed against the fp16 cuBLAS GEMV of the same matrix in one
table (``bench_gemvq``); the int4 GEMM on the tensor cores of decode batches against the Triton int4 kernel and fp16
cuBLAS in another (``bench_gemmq``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rwkv_chat.app.bench import provenance  # noqa: E402
from rwkv_chat.models import kernels  # noqa: E402
from rwkv_chat.models.kernels import dispatch  # noqa: E402
from rwkv_chat.models.formats import i8 as quant  # noqa: E402
from rwkv_chat.models.ops.wkv5_chunk import wkv5_chunk  # noqa: E402
from rwkv_chat.models.ops.wkv7_chunk import wkv7_chunk  # noqa: E402

def l2_bytes() -> int:
    """The device's L2 cache size (H100: 50 MB)."""
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2**20)


def time_ms(fn, n_sets: int = 1, iters: int = 40, reps: int = 7, graph: bool = True) -> float:
    """Median milliseconds per call of fn(i) (i rotates over n_sets input sets).

    graph=True captures `iters` calls in a CUDA graph and times its replays, so host-side launch
    overhead does not hide microsecond kernels; graph=False times eager launches.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(max(3, n_sets)):
            fn(i % n_sets)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for i in range(iters):
                fn(i % n_sets)
        run = g.replay
    else:
        def run():
            for i in range(iters):
                fn(i % n_sets)
    run()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / iters)
    return statistics.median(out)


def sets_for(nbytes: int) -> int:
    """Distinct input sets to rotate among so that their total exceeds 3x the L2 cache (each set is
    evicted before it comes round again)."""
    return max(2, math.ceil(3 * l2_bytes() / max(nbytes, 1)))


def copy_bw(nbytes_moved: int) -> float:
    """GB/s of a device-to-device copy moving nbytes_moved (read + write), rotating buffers."""
    half = nbytes_moved // 2
    n = sets_for(nbytes_moved)
    src = [torch.randint(0, 255, (half,), dtype=torch.uint8, device="cuda") for _ in range(n)]
    dst = [torch.empty_like(t) for t in src]
    ms = time_ms(lambda i: dst[i].copy_(src[i]), n)
    return 2 * half / ms / 1e6


def _read_kernel():
    """A Triton kernel that only reads (grid-stride 16-byte loads, one int32 sum written per program), or
    None without Triton."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def read_only(src, out, n, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(src + offs, mask=offs < n, other=0, eviction_policy="evict_first")
        tl.store(out + pid, tl.sum(acc, axis=0))

    return read_only


def read_bw(nbytes: int) -> float | None:
    """GB/s of one launch that only reads nbytes (``_read_kernel``, 8 programs per multiprocessor), rotating
    buffers, in a CUDA graph: the floor a kernel launch that must read those bytes starts from. None
    without Triton."""
    kern = _read_kernel()
    if kern is None:
        return None
    n = sets_for(nbytes)
    src = [torch.randint(0, 2**30, (nbytes // 4,), dtype=torch.int32, device="cuda") for _ in range(n)]
    grid = 8 * torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.empty(grid, dtype=torch.int32, device="cuda")
    ms = time_ms(lambda i: kern[(grid,)](src[i], out, src[i].numel(), BLOCK=1024), n)
    return nbytes / ms / 1e6


def peak_copy_bw() -> tuple[float, str]:
    """The best device-to-device copy bandwidth measured (GB/s) over 512 MiB and 2 GiB moved, and a label."""
    best = max((copy_bw(m), m) for m in (512 * 2**20, 2 * 2**30))
    return best[0], f"{best[1] / 2**20:.0f} MiB moved"


MM8_LAUNCHES = 50   # back-to-back launches per CUDA graph
MM8_PASS_SHAPES = ((2048, 2048), (4096, 4096), (4096, 16384))


def bench_mm8(rows_md: list, peak: float) -> bool:
    """mm8 (fp16 activations, i8 weights output-major as on CUDA): a CUDA graph of MM8_LAUNCHES launches
    rotating among weight sets that total > 3x L2, median of 7 replays. Bytes = weights + scales + x + y.
    Returns whether one row reaches >= 70% of the large-copy bandwidth at every MM8_PASS_SHAPES size."""
    ok = True
    rows_md += ["", f"### mm8 (fp16 activations, i8 weights stored output-major; CUDA graph of {MM8_LAUNCHES} "
                    f"launches over weight sets > 3x L2 ({l2_bytes() / 2**20:.0f} MiB))", "",
                "| rows | N x M | sets | graph time (us) | GB/s | % of large copy | copy same bytes GB/s | "
                "% of same-bytes copy | read-only launch same bytes GB/s | eager (us) | torch path (us) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rows, N, M in ((1, 2048, 2048), (1, 4096, 4096), (1, 4096, 16384), (1, 16384, 4096), (1, 4096, 65536),
                       (2, 4096, 4096), (4, 4096, 4096), (16, 4096, 4096), (128, 4096, 4096)):
        n = sets_for(N * M)
        qs = [quant.quantize_i8(torch.randn(N, M, device="cuda") * 0.1, torch.float16) for _ in range(n)]
        assert all(q.output_major for q in qs)
        x = torch.randn(rows, N, device="cuda", dtype=torch.float16)
        y = torch.empty(rows, M, device="cuda", dtype=torch.float16)
        nbytes = N * M + rows * (N + M) * 2 + (N + M) * 4
        small_copy = copy_bw(N * M)
        small_read = read_bw(N * M)
        read_txt = "-" if small_read is None else f"{small_read:.0f}"
        t = time_ms(lambda i: kernels.mm8(x, qs[i], out=y), n, iters=MM8_LAUNCHES)
        t_eager = time_ms(lambda i: kernels.mm8(x, qs[i], out=y), n, iters=MM8_LAUNCHES, reps=3, graph=False)
        t_torch = time_ms(lambda i: quant.mm8_torch(x, qs[i]), n, iters=10, reps=3, graph=False)
        bw = nbytes / t / 1e6
        rows_md.append(f"| {rows} | {N}x{M} | {n} | {t * 1e3:.2f} | {bw:.0f} | {100 * bw / peak:.0f}% | "
                       f"{small_copy:.0f} | {100 * bw / small_copy:.0f}% | {read_txt} | {t_eager * 1e3:.1f} | "
                       f"{t_torch * 1e3:.1f} |")
        print(rows_md[-1], flush=True)
        if rows == 1 and (N, M) in MM8_PASS_SHAPES:
            ok &= bw >= 0.7 * peak
        qs.clear()
        torch.cuda.empty_cache()
    return ok


def bench_mm8_decode(rows_md: list, peak: float, shape: str = "7.2B") -> None:
    """The i8 weight stream of RWKV-7 decode layers as ``models/backends/fused_cuda.py`` issues it (one row): per layer the
    grouped op for receptance/key/value, then output, ffn key, ffn value (relu² on load), each an mm8
    launch; layers rotate among sets > 3x L2. GB/s of the weight stream (weights + scales + x + y)."""
    from rwkv_chat.models.rwkv import shapes

    _, C = shapes.SHAPES[shape]
    F = 4 * C
    dims = [(C, C)] * 4 + [(C, F), (F, C)]
    layer_bytes = sum(N * M + (N + M) * 2 * 2 + (N + M) * 2 for N, M in dims)
    n = sets_for(layer_bytes)
    layers = [[quant.quantize_i8(torch.randn(N, M, device="cuda") * 0.1, torch.float16) for N, M in dims]
              for _ in range(n)]
    xs = {N: torch.randn(1, N, device="cuda", dtype=torch.float16) for N in (C, F)}
    ys = {M: [torch.empty(1, M, device="cuda", dtype=torch.float16) for _ in range(3)] for M in (C, F)}
    op = torch.ops.rwkv_chat.mm8_multi_cuda

    def grouped(qs, xs_, ys_, acts):
        op(xs_, [q.storage for q in qs], [q.mx for q in qs], [q.rx for q in qs], [q.my for q in qs],
           [q.ry for q in qs], ys_, acts)

    def layer(i):
        r, k, v, o, fk, fv = layers[i]
        grouped([r, k, v], [xs[C]] * 3, ys[C], [0, 0, 0])
        grouped([o], [xs[C]], ys[C][:1], [0])
        grouped([fk], [xs[C]], ys[F][:1], [0])
        grouped([fv], [xs[F]], ys[C][:1], [3])

    t = time_ms(layer, n, iters=max(8, 2 * n))
    bw = layer_bytes / t / 1e6
    rows_md += ["", f"### i8 decode weight stream, RWKV-7 {shape} layer shapes (C={C}), one row, 4 launches per layer "
                    "(grouped r/k/v, output, ffn key, ffn value with relu²), CUDA graph", "",
                "| per layer (us) | MB per layer | GB/s | % of large copy |", "|---|---|---|---|",
                f"| {t * 1e3:.1f} | {layer_bytes / 1e6:.1f} | {bw:.0f} | {100 * bw / peak:.0f}% |"]
    print(rows_md[-1], flush=True)
    layers.clear()
    torch.cuda.empty_cache()


def load_ref(ref_src: str | None):
    if not ref_src:
        return False
    from torch.utils.cpp_extension import load
    src = Path(ref_src)
    build = Path("/tmp/wkv7s_build")
    build.mkdir(exist_ok=True)
    load(name="wkv7s", sources=[str(src / "rwkv7_op.cpp"), str(src / "rwkv7.cu")], is_python_module=False,
         build_directory=str(build), verbose=False,
         extra_cuda_cflags=["-res-usage", "--use_fast_math", "-O3", "-Xptxas -O3", "--extra-device-vectorization",
                            "-D_N_=64", "-gencode=arch=compute_90,code=sm_90"])
    return True


def bench_wkv7(rows_md: list, have_ref: bool) -> None:
    rows_md += ["", "### WKV-7 (fp16 activations, head size 64, fp32 state)", "",
                "| B | T | H | graph time (us) | eager time (us) | GB/s (graph) | rwkv pip wkv7s eager (us) | "
                "speed-up vs wkv7s (eager/eager) | y rel. diff vs wkv7s | chunked, CUDA cores L=32 (graph us) | "
                "chunked, tensor cores L=32 (graph us) | tensor cores L=16 (graph us) | tensor cores y, state rel. diff "
                "vs the sequential kernel |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    N = 64
    for B, T, H in ((1, 1, 32), (1, 1, 64), (64, 1, 32), (1, 64, 32), (1, 128, 32), (1, 256, 32), (1, 1024, 32),
                    (1, 4096, 12),
                    (1, 1024, 64), (2, 1024, 32), (2, 1024, 64), (4, 1024, 32), (4, 1024, 64), (8, 1024, 32),
                    (8, 256, 32)):
        C = H * N
        g = torch.Generator(device="cuda").manual_seed(B * 1000 + T)
        rnd = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
        r, k, v = (rnd(B, T, H, N).half() for _ in range(3))
        kk = torch.nn.functional.normalize(rnd(B, T, H, N), dim=-1)
        a, b = (-kk).half(), (kk * torch.sigmoid(rnd(B, T, H, N))).half()
        w_raw = torch.log(math.exp(-0.5) * torch.sigmoid(rnd(B, T, H, N))).half()   # decay = exp(-exp(w_raw))
        w = torch.exp(-torch.exp(w_raw.float()))
        s = rnd(B, H, N, N) * 0.3
        y, s2 = torch.empty(B, T, H, N, device="cuda"), torch.empty_like(s)
        op = torch.ops.rwkv_chat.wkv7_cuda
        it = 20 if T > 100 else 100
        t = time_ms(lambda i: op(r, w, k, v, a, b, s, y, s2), iters=it)
        t_eager = time_ms(lambda i: op(r, w, k, v, a, b, s, y, s2), iters=it, graph=False)
        nbytes = B * T * C * (5 * 2 + 4 + 4) + 2 * B * H * N * N * 4
        ref_cell = speed = diff = "-"
        cuda_t = tc32 = tc16 = tc_diff = "-"
        if T >= 64 and hasattr(torch.ops.rwkv_chat, "wkv7_chunk_cuda"):
            yc, sc = torch.empty_like(y), torch.empty_like(s)
            cop = torch.ops.rwkv_chat.wkv7_chunk_cuda
            cuda_t = f"{time_ms(lambda i: cop(r, w, k, v, a, b, s, yc, sc, 32), iters=it) * 1e3:.1f}"
        if T >= 16 and dispatch._triton_ok():   # the tensor-core kernels (ops.wkv7_chunk), y and state checked first
            yt, st_ = wkv7_chunk(r, w, k, v, a, b, s)
            op(r, w, k, v, a, b, s, y, s2)
            tc_diff = (f"{((yt - y).norm() / y.norm()).item():.1e}, "
                       f"{((st_ - s2).norm() / s2.norm()).item():.1e}")
            tc32, tc16 = (f"{t_ * 1e3:.1f}" for t_ in (
                time_ms(lambda i, L=L: wkv7_chunk(r, w, k, v, a, b, s, out=(yt, st_), chunk=L), iters=it)
                for L in (32, 16)))
        if have_ref and B == 1:
            yr = torch.empty(T, C, device="cuda", dtype=torch.float16)
            st = s[0].clone()
            args = (r.view(T, C), w_raw.view(T, C), k.view(T, C), v.view(T, C), a.view(T, C), b.view(T, C))
            torch.ops.wkv7s.forward_fp16(1, T, C, H, st, *args, yr)
            op(r, w, k, v, a, b, s, y, s2)
            diff = f"{((yr.float() - y.view(T, C)).norm() / y.norm()).item():.1e}"
            tr = time_ms(lambda i: torch.ops.wkv7s.forward_fp16(1, T, C, H, st, *args, yr), iters=it, graph=False)
            ref_cell, speed = f"{tr * 1e3:.1f}", f"{tr / t_eager:.2f}x"
        rows_md.append(f"| {B} | {T} | {H} | {t * 1e3:.1f} | {t_eager * 1e3:.1f} | {nbytes / t / 1e6:.0f} | "
                       f"{ref_cell} | {speed} | {diff} | {cuda_t} | {tc32} | {tc16} | {tc_diff} |")


def bench_wkv456(rows_md: list) -> None:
    rows_md += ["", "### WKV-4 / WKV-5 / WKV-6 (fp16 activations, fp32 state)", "",
                "| op | B | T | C | time (us) | GB/s |", "|---|---|---|---|---|---|"]
    for B, T, H in ((1, 1, 32), (64, 1, 32), (1, 1024, 32)):
        N, C = 64, 32 * 64
        r, k, v = (torch.randn(B, T, H, N, device="cuda").half() for _ in range(3))
        u = torch.randn(H, N, device="cuda")
        s = torch.randn(B, H, N, N, device="cuda")
        y, s2 = torch.empty_like(r), torch.empty_like(s)
        for fam, w in (("wkv5", torch.rand(H, N, device="cuda")), ("wkv6", torch.rand(B, T, H, N, device="cuda"))):
            op = getattr(torch.ops.rwkv_chat, f"{fam}_cuda")
            t = time_ms(lambda i: op(r, k, v, w, u, s, y, s2), iters=20 if T > 100 else 100)
            nbytes = B * T * C * (4 * 2 + (4 if fam == "wkv6" else 0)) + 2 * B * H * N * N * 4
            rows_md.append(f"| {fam} | {B} | {T} | {C} | {t * 1e3:.1f} | {nbytes / t / 1e6:.0f} |")
            if T > 1:     # the chunked Triton kernel on the same inputs (ops.wkv5_chunk, kernels.wkv5(chunk=16))
                yc, sc = wkv5_chunk(r, k, v, w, u, s)
                diff = ((yc.float() - y.float()).norm() / y.float().norm()).item()
                tc = time_ms(lambda i: wkv5_chunk(r, k, v, w, u, s, out=(yc, sc)), iters=20)
                rows_md.append(f"| {fam} chunked L=16 (Triton; {t / tc:.2f}x the sequential kernel, y rel. diff "
                               f"{diff:.1e}) | {B} | {T} | {C} | {tc * 1e3:.1f} | {nbytes / tc / 1e6:.0f} |")
                yp, sp = wkv5_chunk(r, k, v, w, u, s, parallel=True)
                diff = ((yp.float() - y.float()).norm() / y.float().norm()).item()
                tp = time_ms(lambda i: wkv5_chunk(r, k, v, w, u, s, out=(yp, sp), parallel=True), iters=20)
                rows_md.append(f"| {fam} chunked L=16, three launches (Triton; {t / tp:.2f}x the sequential kernel, "
                               f"y rel. diff {diff:.1e}) | {B} | {T} | {C} | {tp * 1e3:.1f} | {nbytes / tp / 1e6:.0f} |")
        kk, vv = r.view(B, T, C), v.view(B, T, C)
        w4, u4 = -torch.rand(C, device="cuda"), torch.randn(C, device="cuda")
        st = [torch.randn(B, C, device="cuda") for _ in range(3)]
        outs = [torch.empty_like(kk)] + [torch.empty_like(x) for x in st]
        t = time_ms(lambda i: torch.ops.rwkv_chat.wkv4_cuda(w4, u4, kk, vv, *st, *outs), iters=20 if T > 100 else 100)
        nbytes = B * T * C * 3 * 2 + 6 * B * C * 4
        rows_md.append(f"| wkv4 | {B} | {T} | {C} | {t * 1e3:.1f} | {nbytes / t / 1e6:.0f} |")


GEMVQ_SHAPES = ((4096, 4096), (4096, 16384), (16384, 4096))   # K x N (input x output)
GEMVQ_LAUNCHES = 50


def bench_gemvq(rows_md: list, peak: float) -> None:
    """The int4 and fp8 decode GEMVs (``csrc/gemvq`` through ``kernels.mm4`` / ``kernels.mmf8``; i4 held
    output-major as on CUDA, group 128) against the fp16 cuBLAS GEMV of the same logical matrix (held
    output-major, as the fused backend holds float matrices) and the Triton GEMVs of ``ops.gemv``: CUDA graphs
    of GEMVQ_LAUNCHES launches over weight sets > 3x L2, median of 7 replays. Bytes = weights (+ scales and
    zeros) + x + y; speed-up = fp16 time / time."""
    from rwkv_chat.models.formats import f8, i4
    from rwkv_chat.models.ops import gemv as triton_gemv
    from rwkv_chat.models.ops._triton import reason as triton_reason

    triton = triton_reason() is None
    rows_md += ["", f"### i4 / f8 decode GEMV vs fp16 cuBLAS (fp16 activations; CUDA graph of {GEMVQ_LAUNCHES} "
                    f"launches over weight sets > 3x L2)", "",
                "| rows | K x N | fp16 cuBLAS us (GB/s) | i4 us | i4 GB/s | i4 % of copy | i4 speed-up | "
                "i4 Triton us | f8 us | f8 GB/s | f8 % of copy | f8 speed-up | f8 Triton us |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rows in (1, 4):
        for K, N in GEMVQ_SHAPES:
            x = torch.randn(rows, K, device="cuda", dtype=torch.float16)
            io = rows * (K + N) * 2
            # fp16: [N, K] contiguous, multiplied as its [K, N] transposed view
            n = sets_for(K * N * 2)
            ws = [(torch.randn(N, K, device="cuda") * K ** -0.5).half().t() for _ in range(n)]
            t16 = time_ms(lambda i: kernels.gemm(x, ws[i]), n, iters=GEMVQ_LAUNCHES)
            ws.clear()
            b16 = K * N * 2 + io
            # i4
            group = 128
            b4 = K * N // 2 + (K // group) * N * 2 + (K // group) * N // 2 + io
            n = sets_for(b4)
            qs = [i4.quantize_i4(torch.randn(K, N, device="cuda") * K ** -0.5, group).to("cuda") for _ in range(n)]
            assert all(dispatch.gemvq_i4_ok(q) for q in qs)
            t4 = time_ms(lambda i: kernels.mm4(x, qs[i]), n, iters=GEMVQ_LAUNCHES)
            t4t = time_ms(lambda i: triton_gemv.i4_gemv(x, qs[i]), n, iters=GEMVQ_LAUNCHES) if triton else None
            qs.clear()
            # f8
            b8 = K * N + N * 4 + io
            n = sets_for(b8)
            fs = [f8.quantize_f8(torch.randn(K, N, device="cuda") * K ** -0.5) for _ in range(n)]
            t8 = time_ms(lambda i: kernels.mmf8(x, fs[i]), n, iters=GEMVQ_LAUNCHES)
            t8t = time_ms(lambda i: triton_gemv.f8_gemv(x, fs[i]), n, iters=GEMVQ_LAUNCHES) if triton else None
            fs.clear()
            torch.cuda.empty_cache()
            bw16, bw4, bw8 = b16 / t16 / 1e6, b4 / t4 / 1e6, b8 / t8 / 1e6
            tri = lambda t: "-" if t is None else f"{t * 1e3:.1f}"  # noqa: E731
            rows_md.append(f"| {rows} | {K}x{N} | {t16 * 1e3:.1f} ({bw16:.0f}) | {t4 * 1e3:.1f} | {bw4:.0f} | "
                           f"{100 * bw4 / peak:.0f}% | {t16 / t4:.2f}x | {tri(t4t)} | {t8 * 1e3:.1f} | {bw8:.0f} | "
                           f"{100 * bw8 / peak:.0f}% | {t16 / t8:.2f}x | {tri(t8t)} |")
            print(rows_md[-1], flush=True)


GEMMQ_ROWS = (8, 16, 32, 64, 128)
GEMMQ_SPLITS = (1, 2, 3, 4, 6, 8, 12)
#: the r, k, v stacks timed in one launch (C x C each)
GEMMQ_STACK_C = (2048, 4096)


def fastest_split(run, n_sets: int, K: int) -> str:
    """"us (splits)" of the fastest of GEMMQ_SPLITS K splits (those K allows) for run(i, splits) over n_sets inputs."""
    sweep = {s: time_ms(lambda i: run(i, s), n_sets, iters=GEMVQ_LAUNCHES) for s in GEMMQ_SPLITS if s <= K // 128}
    best = min(sweep, key=sweep.get)
    return f"{sweep[best] * 1e3:.1f} ({best})"


def cublas_rows(K: int, N: int) -> tuple[dict, dict]:
    """({rows: fp16 x [rows, K]}, {rows: ms of x @ an fp16 K x N weight (cuBLAS)}) at GEMMQ_ROWS rows, weight sets
    > 3x L2."""
    xs = {rows: torch.randn(rows, K, device="cuda", dtype=torch.float16) for rows in GEMMQ_ROWS}
    n = sets_for(K * N * 2)
    ws = [(torch.randn(N, K, device="cuda") * K ** -0.5).half().t() for _ in range(n)]
    return xs, {rows: time_ms(lambda i: x @ ws[i], n, iters=GEMVQ_LAUNCHES) for rows, x in xs.items()}


def gemmq_row(rows, K, N, t16, tt, tr, kg_rule, splits, cells, e_tc, e_tr) -> str:
    """One printed row of the tensor-core GEMM tables (times in ms: cuBLAS, Triton, the rule's launch)."""
    row = (f"| {rows} | {K}x{N} | {t16 * 1e3:.1f} | {tt * 1e3:.1f} | {tr * 1e3:.1f} ({kg_rule}, {splits}) | "
           f"{' | '.join(cells)} | {t16 / tr:.2f}x | {tt / tr:.2f}x | {e_tc:.1e} | {e_tr:.1e} |")
    print(row, flush=True)
    return row


def bench_gemmq(rows_md: list) -> None:
    """The int4 GEMM on the tensor cores for decode batches (``kernels.gemmq``, ``csrc/gemvq/gemmq_cuda.cu``) against
    the Triton int4 kernel (``ops.gemv.i4_gemv``) and the fp16 cuBLAS product of the same matrix, at GEMMQ_ROWS rows
    (fp16 activations, group 128, held output-major): CUDA graphs of GEMVQ_LAUNCHES launches over weight sets
    > 3x L2, median of 7 replays; the launch rule (``gemmq.k_groups_for``, ``gemmq.gemmq_tiles``), and for 1, 2 and
    (up to 32 rows) 4 K groups of 4 warps the fastest of GEMMQ_SPLITS K splits (how far the rule is from the best);
    relative errors against float64. Then r, k, v stacks (three C x C) in one launch against the Triton stack kernel,
    three launches and a batched fp16 cuBLAS product."""
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.kernels import gemmq
    from rwkv_chat.models.ops import gemv as triton_gemv

    if not gemmq.built():
        rows_md += ["", "int4 GEMM on the tensor cores: not built"]
        return
    dev = torch.device("cuda")
    groups = (1, 2, 4)
    rows_md += ["", f"### int4 GEMM on the tensor cores vs the Triton int4 kernel and fp16 cuBLAS (decode batches; CUDA "
                    f"graph of {GEMVQ_LAUNCHES} launches over weight sets > 3x L2)", "",
                "| rows | K x N | fp16 cuBLAS us | Triton i4 us | tensor cores, rule us (K groups, splits) | "
                + " | ".join(f"{g} K group{'s' if g > 1 else ''}, fastest us (splits)" for g in groups)
                + " | rule / cuBLAS | rule / Triton | rel. err tensor cores | rel. err Triton |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for K, N in GEMVQ_SHAPES:
        xs, t16 = cublas_rows(K, N)
        n = sets_for(K * N // 2)
        qs = [i4.quantize_i4(torch.randn(K, N, device="cuda") * K ** -0.5, 128).to("cuda") for _ in range(n)]
        ref_w = qs[0].dequantize(torch.float64)
        for rows, x in xs.items():
            ref = x.double() @ ref_w
            err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
            e_tc, e_tr = err(gemmq.gemmq_i4(x, qs[0])), err(triton_gemv.i4_gemv(x, qs[0]))
            kg_rule = gemmq.k_groups_for(rows, dev)
            _, splits = gemmq.gemmq_tiles(rows, K, N, dev, 4, torch.float16, kg_rule)
            tt = time_ms(lambda i: triton_gemv.i4_gemv(x, qs[i]), n, iters=GEMVQ_LAUNCHES)
            t4 = time_ms(lambda i: gemmq.gemmq_i4(x, qs[i]), n, iters=GEMVQ_LAUNCHES)
            cells = []
            for kg in groups:
                if kg == 4 and rows > 32:
                    cells.append("–")
                    continue
                try:
                    gemmq.gemmq_i4(x, qs[0], None, 4, kg)
                except RuntimeError as e:   # too little shared memory a block on this device
                    cells.append(f"not run: {str(e).splitlines()[0][:40]}")
                    continue
                cells.append(fastest_split(lambda i, s: gemmq.gemmq_i4(x, qs[i], s, 4, kg), n, K))
            rows_md.append(gemmq_row(rows, K, N, t16[rows], tt, t4, kg_rule, splits, cells, e_tc, e_tr))
        qs.clear()
        torch.cuda.empty_cache()
    rows_md += ["", "#### r, k, v (three C x C int4 weights of one stack, each with its own x) in one launch", "",
                "| rows | 3 x C x C | fp16 cuBLAS bmm us | Triton stack us | tensor cores, stack us | tensor cores, "
                "three launches us | stack / cuBLAS | stack / Triton | rel. err stack |",
                "|---|---|---|---|---|---|---|---|---|"]
    for C in GEMMQ_STACK_C:
        xs, t16 = bmm_rows(C)
        n = sets_for(3 * C * C // 2)
        stacks = [i4.stack_i4([i4.quantize_i4(torch.randn(C, C, device="cuda") * C ** -0.5, 128).to("cuda")
                               for _ in range(3)]) for _ in range(n)]
        strides = triton_gemv.i4_stack_strides(stacks[0])
        for rows, x in xs.items():
            y = gemmq.gemmq_i4_stack(x, stacks[0])
            e = stack_error(y, x, stacks[0])
            ts = time_ms(lambda i: gemmq.gemmq_i4_stack(x, stacks[i]), n, iters=GEMVQ_LAUNCHES)
            t3 = time_ms(lambda i: [gemmq.gemmq_i4(x[g], stacks[i][g]) for g in range(3)], n, iters=GEMVQ_LAUNCHES)
            tt = time_ms(lambda i: triton_gemv.i4_gemv_stack(x, stacks[i], strides), n, iters=GEMVQ_LAUNCHES)
            rows_md.append(f"| {rows} | 3 x {C}x{C} | {t16[rows] * 1e3:.1f} | {tt * 1e3:.1f} | {ts * 1e3:.1f} | "
                           f"{t3 * 1e3:.1f} | {t16[rows] / ts:.2f}x | {tt / ts:.2f}x | {e:.1e} |")
            print(rows_md[-1], flush=True)
        stacks.clear()
        torch.cuda.empty_cache()


def stack_error(y: torch.Tensor, x: torch.Tensor, qs: list) -> float:
    """The largest relative error of y[g] against x[g] @ qs[g] dequantized, in float64, over a stack."""
    return max(((y[g].double() - (r := x[g].double() @ q.dequantize(torch.float64))).norm() / r.norm()).item()
               for g, q in enumerate(qs))


def bmm_rows(C: int) -> tuple[dict, dict]:
    """x [3, rows, C] fp16 per GEMMQ_ROWS rows and the fp16 cuBLAS batched product's seconds for three C x C weights
    (CUDA graphs of GEMVQ_LAUNCHES launches over weight sets > 3x L2): the r/k/v stacks' baseline."""
    n = sets_for(3 * C * C * 2)
    ws = [(torch.randn(3, C, C, device="cuda") * C ** -0.5).half() for _ in range(n)]
    xs = {rows: torch.randn(3, rows, C, device="cuda", dtype=torch.float16) for rows in GEMMQ_ROWS}
    t16 = {rows: time_ms(lambda i: torch.bmm(x, ws[i]), n, iters=GEMVQ_LAUNCHES) for rows, x in xs.items()}
    ws.clear()
    return xs, t16


def bench_gemmq_u8(rows_md: list) -> None:
    """The uint8 form of the tensor-core GEMM (``gemmq.gemmq_u8``: i8 weights of the reference's scheme, fp16 x)
    against the Triton i8 kernel (``ops.gemv.i8_gemm``) and fp16 cuBLAS at GEMMQ_ROWS rows: CUDA graphs of
    GEMVQ_LAUNCHES launches over weight sets > 3x L2, median of 7 replays; the launch rule, and the fastest of
    GEMMQ_SPLITS K splits with 1 and 2 K groups; relative errors against float64."""
    from rwkv_chat.models.formats import i8
    from rwkv_chat.models.kernels import gemmq
    from rwkv_chat.models.ops import gemv as triton_gemv

    if not gemmq.built():
        return
    dev = torch.device("cuda")
    rows_md += ["", "#### i8 (the reference's uint8 scheme) on the tensor cores: the uint8 form (fp16 activations)", "",
                "| rows | K x N | fp16 cuBLAS us | Triton i8 us | tensor cores, rule us (K groups, splits) | "
                "1 K group, fastest us (splits) | 2 K groups, fastest us (splits) | rule / cuBLAS | rule / Triton | "
                "rel. err tensor cores | rel. err Triton |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for K, N in GEMVQ_SHAPES:
        xs, t16 = cublas_rows(K, N)
        n = sets_for(K * N)
        qs = [i8.quantize_i8(torch.randn(K, N, device="cuda") * K ** -0.5, torch.float16, output_major=True)
              for _ in range(n)]
        ref_w = qs[0].dequantize(torch.float64)
        for rows, x in xs.items():
            ref = x.double() @ ref_w
            err = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
            try:
                e_tc = err(gemmq.gemmq_u8(x, qs[0]))
            except RuntimeError as e:
                rows_md.append(f"| {rows} | {K}x{N} | not run: {str(e).splitlines()[0][:80]} |")
                continue
            e_tr = err(triton_gemv.i8_gemm(x, qs[0]))
            kg_rule = gemmq.k_groups_for(rows, dev, u8=True)
            _, splits = gemmq.gemmq_tiles(rows, K, N, dev, 4, torch.float16, kg_rule, 1, True)
            tt = time_ms(lambda i: triton_gemv.i8_gemm(x, qs[i]), n, iters=GEMVQ_LAUNCHES)
            tr = time_ms(lambda i: gemmq.gemmq_u8(x, qs[i]), n, iters=GEMVQ_LAUNCHES)
            cells = []
            for kg in (1, 2):
                cells.append(fastest_split(lambda i, s: gemmq.gemmq_u8(x, qs[i], s, 4, kg), n, K))
            rows_md.append(gemmq_row(rows, K, N, t16[rows], tt, tr, kg_rule, splits, cells, e_tc, e_tr))
        qs.clear()
        torch.cuda.empty_cache()
    rows_md += ["", "#### r, k, v (three C x C i8 weights of one stack, each with its own x) in one launch, uint8 form",
                "", "| rows | 3 x C x C | fp16 cuBLAS bmm us | stack us | three launches us | Triton i8, three launches "
                "us | stack / cuBLAS | stack / three | rel. err stack |", "|---|---|---|---|---|---|---|---|---|"]
    for C in GEMMQ_STACK_C:
        xs, t16 = bmm_rows(C)
        n = sets_for(3 * C * C)
        stacks = [i8.stack_i8([i8.quantize_i8(torch.randn(C, C, device="cuda") * C ** -0.5, torch.float16,
                                              output_major=True) for _ in range(3)]) for _ in range(n)]
        for rows, x in xs.items():
            y = gemmq.gemmq_u8_stack(x, stacks[0])
            e = stack_error(y, x, stacks[0])
            ts = time_ms(lambda i: gemmq.gemmq_u8_stack(x, stacks[i]), n, iters=GEMVQ_LAUNCHES)
            t3 = time_ms(lambda i: [gemmq.gemmq_u8(x[g], stacks[i][g]) for g in range(3)], n, iters=GEMVQ_LAUNCHES)
            tt = time_ms(lambda i: [triton_gemv.i8_gemm(x[g], stacks[i][g]) for g in range(3)], n,
                         iters=GEMVQ_LAUNCHES)
            rows_md.append(f"| {rows} | 3 x {C}x{C} | {t16[rows] * 1e3:.1f} | {ts * 1e3:.1f} | {t3 * 1e3:.1f} | "
                           f"{tt * 1e3:.1f} | {t16[rows] / ts:.2f}x | {t3 / ts:.2f}x | {e:.1e} |")
            print(rows_md[-1], flush=True)
        stacks.clear()
        torch.cuda.empty_cache()


def bench_gemvq_group(rows_md: list) -> None:
    """Three products in one launch (``dispatch.gemvq_group``, the fused RWKV-7 decode's r, k, v) against three
    launches (``kernels.mm4`` / ``kernels.mmf8``), one row, CUDA graphs over weight sets > 3x L2."""
    from rwkv_chat.models.formats import f8, i4

    rows_md += ["", "### i4 / f8 decode GEMV: r, k, v in one launch vs three (one row, fp16 activations)", "",
                "| format | 3 x K x N | one launch (us) | three launches (us) |", "|---|---|---|---|"]
    for fmt in ("i4", "f8"):
        for C in (2048, 4096):
            per = C * C // 2 if fmt == "i4" else C * C
            n = sets_for(3 * per)
            make = (lambda: i4.quantize_i4(torch.randn(C, C, device="cuda") * C ** -0.5).to("cuda")) if fmt == "i4" \
                else (lambda: f8.quantize_f8(torch.randn(C, C, device="cuda") * C ** -0.5))
            qs = [[make() for _ in range(3)] for _ in range(n)]
            xs = [torch.randn(1, C, device="cuda", dtype=torch.float16) for _ in range(3)]
            one = kernels.mm4 if fmt == "i4" else kernels.mmf8
            tg = time_ms(lambda i: dispatch.gemvq_group(xs, qs[i]), n, iters=GEMVQ_LAUNCHES)
            ts = time_ms(lambda i: [one(x, q) for x, q in zip(xs, qs[i])], n, iters=GEMVQ_LAUNCHES)
            qs.clear()
            torch.cuda.empty_cache()
            rows_md.append(f"| {fmt} | 3 x {C}x{C} | {tg * 1e3:.1f} | {ts * 1e3:.1f} |")
            print(rows_md[-1], flush=True)


def bench_gemm(rows_md: list) -> None:
    rows_md += ["", "### gemm (fp16, fp32 accumulation) vs torch.matmul", "",
                "| rows | K x M | cuBLAS gemm (us) | torch.matmul (us) | TFLOP/s |", "|---|---|---|---|---|"]
    for rows, K, M in ((1, 4096, 4096), (16, 4096, 4096), (512, 4096, 4096), (4096, 4096, 4096)):
        n = sets_for(K * M * 2)
        ws = [torch.randn(K, M, device="cuda").half() for _ in range(n)]
        x = torch.randn(rows, K, device="cuda").half()
        t = time_ms(lambda i: kernels.gemm(x, ws[i]), n)
        tt = time_ms(lambda i: x @ ws[i], n)
        rows_md.append(f"| {rows} | {K}x{M} | {t * 1e3:.1f} | {tt * 1e3:.1f} | {2 * rows * K * M / t / 1e9:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None)
    ap.add_argument("--ref-src", default=None, help="folder with the rwkv pip package's rwkv7_op.cpp and rwkv7.cu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default=None, choices=("mm8", "gemvq", "wkv", "gemm"),
                    help="run one section (with the copy bandwidth it is measured against)")
    args = ap.parse_args()
    loader = kernels.KernelLoader(cache_dir=args.cache, progress=print)
    status = loader.ensure_built("cuda")
    if any(v != "ok" for v in status.values()):
        print(status)
        return 1
    have_ref = load_ref(args.ref_src)
    peak, peak_label = peak_copy_bw()
    md = [*provenance(), "",
          f"Large device-to-device copy (best of 512 MiB and 2 GiB moved, read + write; best at {peak_label}): "
          f"**{peak:.0f} GB/s**"]
    ok = True
    if args.only in (None, "mm8"):
        ok = bench_mm8(md, peak)
        bench_mm8_decode(md, peak)
    if args.only in (None, "gemvq"):
        bench_gemvq(md, peak)
        bench_gemvq_group(md)
        bench_gemmq(md)
        bench_gemmq_u8(md)
    if args.only in (None, "wkv"):
        bench_wkv7(md, have_ref)
        bench_wkv456(md)
    if args.only in (None, "gemm"):
        bench_gemm(md)
    if args.only in (None, "mm8"):
        md += ["", f"mm8 one-row >= 70% of copy bandwidth at 2048², 4096², 4096x16384: "
               f"{'PASS' if ok else 'FAIL'}"]
    text = "\n".join(md)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
