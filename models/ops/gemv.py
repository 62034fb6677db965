"""Weight-only GEMVs for few rows: int4 (GPTQ layout, ``formats.i4``), fp8 e4m3 (``formats.f8``) and the reference's
uint8 scheme (``formats.i8``), in Triton.

A decode step multiplies a few activation rows by every weight once: its time is the weight bytes over the
memory bandwidth. These kernels read the packed weight (0.5 byte per weight for int4, 1 for fp8), dequantize in
registers and accumulate in float32, so the step reads a quarter / half of fp16's bytes.

``i4_gemv(x, q)`` (M <= ``I4_ROWS``), ``f8_gemv(x, q)`` (M <= ``GEMV_ROWS``) and ``i8_gemm(x, q)`` (M <= ``I8_ROWS``):
x [M, K] fp16/bf16 on CUDA -> [M, N] in x's dtype. Row blocks of 16, 32 or 64 (the next power of two of M, at
least 16: ``tl.dot``'s minimum). The dispatch products ``rwkv_chat.models.kernels.mm4`` / ``mmf8`` / ``mm8`` call
them where they apply and use torch (or the compiled kernels) elsewhere. Errors: ``ShapeMismatchError``, ``UnsupportedDtypeError``, ``DeviceError`` (no CUDA / Triton).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.formats.f8 import Float8Weight
from rwkv_chat.models.formats.i4 import Int4Weight
from rwkv_chat.models.formats.i8 import Int8Weight
from rwkv_chat.models.ops._checks import HALF_DTYPES, check_cuda, check_dtype
from rwkv_chat.models.ops._triton import kernels as triton_kernels
from rwkv_chat.models.ops._triton import multiprocessors as _sms

#: the most rows the fp8 GEMV serves (beyond, the fp8 tensor cores: ``ops.fp8``)
GEMV_ROWS = 8
#: the most rows the int4 kernel serves (decode batches; longer prompts dequantize once for cuBLAS)
I4_ROWS = 256
#: the most rows the i8 kernel serves (decode batches above the compiled mm8 GEMV's; prompts dequantize for cuBLAS)
I8_ROWS = 256
_BLOCK_N, _BLOCK_K = 64, 128


def _kernels():
    return triton_kernels("rwkv_chat.models.ops._gemv_kernels", "weight-only GEMV")



def _split(K: int, N: int, device, block_n: int = _BLOCK_N, block_k: int = _BLOCK_K) -> tuple[int, int]:
    """(splits of K, K per split): enough programs to fill every multiprocessor twice."""
    blocks_n = -(-N // block_n)
    want = max(1, min(-(-2 * _sms(device) // blocks_n), -(-K // block_k)))
    per = -(-K // want)
    per = -(-per // block_k) * block_k
    return -(-K // per), per


def i8_tiles(rows: int) -> dict:
    """The i8 kernel's tile for a batch of ``rows``: BLOCK_N outputs by BLOCK_K inputs, warps and pipeline stages
    (H100, K x N of 4096 x 4096, 4096 x 16384 and 16384 x 4096: (64, 64, 4, 4) fastest at 16 rows, (128, 64, 4, 4)
    at 64 and 128)."""
    bn = 64 if rows <= 32 else 128
    return {"BLOCK_N": bn, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}


def _check(x: torch.Tensor, K: int, tensors: dict, rows: int = GEMV_ROWS) -> None:
    check_dtype(x, "x", HALF_DTYPES)
    if x.dim() != 2 or x.shape[1] != K or x.shape[0] > rows:
        raise ShapeMismatchError(f"x has shape {tuple(x.shape)}; expected [M <= {rows}, {K}]", tensor="x",
                                 expected=(f"<= {rows}", K), actual=tuple(x.shape))
    check_cuda({"x": x, **tensors})


_COUNTERS: dict[torch.device, torch.Tensor] = {}
#: tiles (N blocks × row blocks) one split launch may count in the shared counters
_MAX_TILES = 1 << 16


def _counters(device: torch.device) -> torch.Tensor | None:
    """The device's split-K counters (int32, zero between launches: the last split of a tile resets its own),
    made at first use outside CUDA graph capture (None while capturing before that)."""
    c = _COUNTERS.get(device)
    if c is None and not torch.cuda.is_current_stream_capturing():
        c = _COUNTERS[device] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return c


def _launch(kernel, x, N, args, extra, device, tiles: dict | None = None, **const):
    """Launch a GEMV kernel on x [M, K] (contiguous) -> y [M, N] in x's dtype; ``tiles``: BLOCK_N, BLOCK_K and
    launch options (default: ``_BLOCK_N`` x ``_BLOCK_K``, Triton's defaults). Launches on one stream at a time
    share the device's counters (CUDA graphs and the decoder run one stream)."""
    M, K = x.shape
    tiles = tiles or {"BLOCK_N": _BLOCK_N, "BLOCK_K": _BLOCK_K}
    block_n = tiles["BLOCK_N"]
    splits, per = _split(K, N, device, block_n, tiles["BLOCK_K"])
    block_m = min(64, max(16, 1 << (M - 1).bit_length()))
    grid = (-(-N // block_n), splits, -(-M // block_m))
    counters = _counters(device) if splits > 1 and grid[0] * grid[2] <= _MAX_TILES else None
    if counters is None:
        splits, per = 1, K
        grid = (grid[0], 1, grid[2])
    y = torch.empty(M, N, dtype=x.dtype, device=device)
    ws = torch.empty(splits, M, N, dtype=torch.float32, device=device) if splits > 1 else y
    kernel[grid](x, *args, y, ws, counters if counters is not None else y, M, K, N, *extra, x.stride(0), y.stride(0),
                 per, splits, SPLIT=splits > 1, BLOCK_M=block_m, **tiles, **const)
    return y


def i4_gemv(x: torch.Tensor, q: Int4Weight) -> torch.Tensor:
    """``x @ q.dequantize()`` for x [M, K] (M <= I4_ROWS, fp16/bf16, CUDA) -> [M, N] in x's dtype; q in either
    layout (``Int4Weight.output_major``: the kernel reads ``qweight`` through its strides).

    Raises: UnsupportedDtypeError, ShapeMismatchError, DeviceError.
    """
    K, N = q.shape
    kp, np_ = q.qweight.shape[0] * 8, q.qweight.shape[1]
    _check(x, K, {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales, "g_idx": q.g_idx}, I4_ROWS)
    x = x.contiguous()
    if kp != K:
        x = torch.nn.functional.pad(x, (0, kp - K))
    k = _kernels()
    gi = q.g_idx if q.g_idx is not None else q.qweight
    y = _launch(k.i4_gemv_kernel, x, np_, (q.qweight, q.qzeros, q.scales, gi),
                (q.group_size, q.qweight.stride(0), q.qweight.stride(1)), x.device,
                HAS_GIDX=q.g_idx is not None, ONE_GROUP=q.g_idx is None and q.group_size % _BLOCK_K == 0,
                BF16=x.dtype == torch.bfloat16)
    return y if np_ == N else y[:, :N]


def i8_gemm(x: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """``x @ q.dequantize()`` for the reference's uint8 scheme (``formats.i8``: (w + 0.5) ry rx + my + mx) and x [M, K]
    (M <= I8_ROWS, fp16/bf16, CUDA) -> [M, N] in x's dtype; q in either layout (``Int8Weight.output_major``: the
    kernel reads ``w`` through its strides), its scales in any float dtype. The uint8 weights are read once, as they
    are (no dequantized copy): rx ⊙ ((x ry) @ w + 0.5 Σ x ry) + x @ my + (Σ x) mx, the product on the tensor cores in
    x's dtype (w exact, the weight tile as the first operand) with float32 accumulation; tiles by ``i8_tiles``.

    Raises: UnsupportedDtypeError, ShapeMismatchError, DeviceError.
    """
    K, N = q.shape
    _check(x, K, {"w": q.w, "mx": q.mx, "rx": q.rx, "my": q.my, "ry": q.ry}, I8_ROWS)
    x = x.contiguous()
    k = _kernels()
    return _launch(k.i8_gemm_kernel, x, N, (q.w, q.mx.contiguous(), q.rx.contiguous(), q.my.contiguous(),
                                            q.ry.contiguous()), (q.w.stride(0), q.w.stride(1)), x.device,
                   i8_tiles(x.shape[0]))


def f8_gemv(x: torch.Tensor, q: Float8Weight) -> torch.Tensor:
    """``x @ q.dequantize()`` for x [M, K] (M <= GEMV_ROWS, fp16/bf16, CUDA) -> [M, N] in x's dtype.

    Raises: UnsupportedDtypeError, ShapeMismatchError, DeviceError.
    """
    K, N = q.shape
    _check(x, K, {"w8": q.w8, "scale": q.scale})
    k = _kernels()
    return _launch(k.f8_gemv_kernel, x.contiguous(), N, (q.w8, q.scale), (), x.device)


def fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (per-token) e4m3 quantization in one launch: x [M, K] fp16/bf16/fp32 on CUDA (last dim
    contiguous) -> (q float8_e4m3fn [M, K], scale float32 [M, 1]) with ``x ≈ q * scale`` (``scale = amax / 448``,
    1 for a zero row). No input checks: callers check (``ops.fp8``)."""
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, 1, dtype=torch.float32, device=x.device)
    _kernels().fp8_rows_kernel[(M,)](x, q, s, K, x.stride(0), BLOCK_K=1024)
    return q, s
