"""Chunked WKV-7 for prefill on the tensor cores (Triton, CUDA): T tokens in chunks of L, three launches.

RWKV-7's state S [V, K] per (batch, head): ``S_t = S_{t-1} (diag(w_t) + a_t b_tᵀ) + v_t k_tᵀ``, ``y_t = S_t r_t``
(ChatRWKV ``rwkv/cuda/rwkv7.cu``, pip 0.8.32). The formulas are ``models/rwkv/chunked.py``'s ``wkv7_chunked`` (the
WY form of the generalized delta rule: Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule
over Sequence Length"; flash-linear-attention's chunked DPLR delta rule), the same three phases as the CUDA-core
kernels of ``csrc/wkv7/wkv7_chunk_cuda.cu``: every chunk's in-chunk terms at once, a scan over the chunks (one
[16, N] x [N, N] product per chunk and 16 value rows), the outputs at once. Here every product runs on the tensor
cores, in three tf32 products per float32 product (``tf32x3``: float32's precision class, ~1e-7 relative against
float64, as the sequential kernel), so the all-chunks phase is no longer bound by the CUDA cores
(``_wkv7_chunk_kernels`` has the details).

    y, s_new = wkv7_chunk(r, w, k, v, a, b, s)      # same contract as models.rwkv.wkv.wkv7_torch

Not yet faster than the CUDA-core kernels (H100, T = 1,024, 32 heads of 64: 348.3 us at L = 16, 402.6 at L = 32,
against 238.0; ``bench/results/h100.md``): the all-chunks phase in tf32x3 costs 1.8-3.1x its one-pass tf32 time
(its small products keep the tensor cores at about 40 TFLOP/s; at L = 32 the inverse's fifteen full-tile products are
a third of its multiply-adds), and the scan is a chain of one small product per chunk. So ``kernels.dispatch.wkv7``
takes it only when asked (``tensor_cores=True``); ``precision`` picks cheaper passes for measuring. No host
synchronisation: CUDA-graph capturable. Float32 workspace: 4 B H nc (2 N² + 2 L N) bytes, nc = ceil(T / L).
Checked in Triton's interpreter against the float64 recurrence (``tests/gpu/interpret_wkv7_chunk.py``, in CI) and
on a GPU against the sequential kernel (``tests/gpu/verify_kernels.py``).

Errors: ``UnsupportedDtypeError``, ``ShapeMismatchError`` (as ``kernels.checks.check_wkv7``; head size other than
64), ``DeviceError`` (not on CUDA, no Triton); ValueError for a chunk length other than 16 or 32.
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.kernels.checks import check_wkv7
from rwkv_chat.models.ops import _checks, _triton

_KERNELS = "rwkv_chat.models.ops._wkv7_chunk_kernels"
#: tokens per chunk (the default) and the lengths the kernels take
CHUNK, CHUNKS = 32, (16, 32)
#: the head size the kernels take
HEAD_SIZE = 64
#: value rows per program of the scan
SCAN_ROWS = 16
#: warps of the all-chunks phase per chunk length (H100, T = 1024, 32 heads: L = 32 233 us with 8, 278 with 4;
#: L = 16 134 with 4, 215 with 8; bench/results/h100.md, "Lab: the chunked WKV-7 on the tensor cores")
PREP_WARPS = {16: 4, 32: 8}
#: ``precision`` -> the input precision of (the state's products: P, D, the scan, the outputs; the in-chunk products)
PRECISIONS = {"tf32x3": ("tf32x3", "tf32x3"), "mixed": ("tf32x3", "tf32"), "tf32": ("tf32", "tf32"),
              "ieee": ("ieee", "ieee")}


def wkv7_chunk(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor, s: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None,
               chunk: int = CHUNK, precision: str = "tf32x3"):
    """The RWKV-7 WKV over T tokens, chunked; same contract as ``wkv.wkv7_torch``.

    Args:
        r, k, v, a, b: [B, T, H, 64] float32 / float16 / bfloat16 (one dtype).
        w: float32 [B, T, H, 64], decay factors in RWKV-7's range [0.545, 1) (``exp(-e^{-1/2} sigmoid(.))``).
        s: float32 [B, H, 64, 64] indexed [value, key] (read, not modified unless ``out`` names it).
        out: ``(y, s_new)`` to write into (s_new may be s itself).
        chunk: tokens per chunk, 16 or 32.
        precision: the products' ``input_precision``: ``"tf32x3"`` (tensor cores, float32 class), ``"mixed"``
            (the in-chunk products of the all-chunks phase in one tf32 pass, the state's in tf32x3), ``"tf32"``
            (one pass throughout: faster, about 1e-3 relative per product) or ``"ieee"`` (float32 on the CUDA cores).
    Returns:
        ``(y float32 [B, T, H, 64], s_new float32 [B, H, 64, 64])``.
    Raises:
        UnsupportedDtypeError, ShapeMismatchError, DeviceError; ValueError for another chunk or precision.
    """
    if chunk not in CHUNKS:
        raise ValueError(f"wkv7_chunk: chunk must be one of {CHUNKS}, not {chunk!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"wkv7_chunk: precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    prec, prec_in = PRECISIONS[precision]
    check_wkv7(r, w, k, v, a, b, s, out)
    B, T, H, N = r.shape
    if N != HEAD_SIZE:
        raise ShapeMismatchError(f"wkv7_chunk: head size {N} is not {HEAD_SIZE}", tensor="r",
                                 expected=(B, T, H, HEAD_SIZE), actual=tuple(r.shape))
    _checks.check_cuda({"r": r, "w": w, "k": k, "v": v, "a": a, "b": b, "s": s})
    kern = _triton.kernels(_KERNELS, op="wkv7_chunk")
    r, w, k, v, a, b, s = (t.contiguous() for t in (r, w, k, v, a, b, s))
    y, s_new = out if out is not None else (torch.empty(r.shape, dtype=torch.float32, device=r.device),
                                            torch.empty_like(s))
    BH, L = B * H, chunk
    if BH and T:
        nc = -(-T // L)
        work = torch.empty(BH * nc * (2 * N * N + 2 * L * N), dtype=torch.float32, device=r.device)
        p, d, q, yv = work.split([BH * nc * N * N, BH * nc * N * N, BH * nc * L * N, BH * nc * L * N])
        with _triton.on(r.device):
            kern.wkv7_prep_kernel[(nc, BH)](r, w, k, v, a, b, p, d, q, yv, T, H, nc, N=N, L=L, PREC=prec,
                                            PREC_IN=prec_in, num_warps=PREP_WARPS[L])
            kern.wkv7_scan_kernel[(BH, N // SCAN_ROWS)](s, p, d, s_new, nc, N=N, R=SCAN_ROWS, PREC=prec,
                                                        num_warps=4, num_stages=2)
            kern.wkv7_out_kernel[(nc, BH)](q, yv, d, y, T, H, nc, N=N, L=L, PREC=prec, num_warps=4)
    elif s_new.data_ptr() != s.data_ptr():
        s_new.copy_(s)
    return y, s_new
