"""Weight-only GEMVs for few rows: int4 (GPTQ layout, ``formats.i4``), fp8 e4m3 (``formats.f8``) and the reference's
uint8 scheme (``formats.i8``), in Triton.

A decode step multiplies a few activation rows by every weight once: its time is the weight bytes over the
memory bandwidth. These kernels read the packed weight (0.5 byte per weight for int4, 1 for fp8), dequantize in
registers and accumulate in float32, so the step reads a quarter / half of fp16's bytes.

``i4_gemv(x, q)`` (M <= ``I4_ROWS``; ``i4_gemv_stack(x [G, M, K], qs)``: G matrices of one stack in one
launch), ``f8_gemv(x, q)`` (M <= ``GEMV_ROWS``) and ``i8_gemm(x, q)`` (M <= ``I8_ROWS``):
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


def _split_one_wave(K: int, programs: int, device, block_k: int) -> tuple[int, int]:
    """(splits of K, K per split) for ``programs`` tiles of output: as many splits as keep every program in one
    wave of two per multiprocessor (a third, partial wave costs more than the splits save: H100, int4, 64 rows,
    16384x4096 in 128-wide tiles: 8 splits 55.2 us, 9 splits 67.2), at least one."""
    want = max(1, min(2 * _sms(device) // max(programs, 1), -(-K // block_k)))
    per = -(-K // want)
    per = -(-per // block_k) * block_k
    return -(-K // per), per


def i4_tiles(rows: int, K: int, N: int) -> dict:
    """The int4 kernel's tile for a batch of ``rows`` and a K x N matrix: BLOCK_N outputs by BLOCK_K inputs, warps
    and pipeline stages. Up to 32 rows 64 x 128 (4 warps, 3 stages); above, 128 x 128 for matrices of 2^25 weights
    or more (H100, 64 rows, best of 7 tiles x 5 splits: 4096x16384 51.8 us (fp16 cuBLAS 54.2), 16384x4096 55.2
    (57.2); 4096x4096 keeps 64 x 128: 20.0 (14.8))."""
    bn = 128 if rows > 32 and K * N >= 1 << 25 else 64
    return {"BLOCK_N": bn, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


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
    layout (``Int4Weight.output_major``: the kernel reads ``qweight`` through its strides). Tiles by ``i4_tiles``;
    above 32 rows the K splits keep the programs in one wave (``_split_one_wave``).

    Raises: UnsupportedDtypeError, ShapeMismatchError, DeviceError.
    """
    K, N = q.shape
    _check(x, K, {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales, "g_idx": q.g_idx}, I4_ROWS)
    kp, np_ = q.qweight.shape[0] * 8, q.qweight.shape[1]
    x = x.contiguous()
    if kp != K:
        x = torch.nn.functional.pad(x, (0, kp - K))
    y = _i4_launch(x.unsqueeze(0), q, (0, 0, 0))[0]
    return y if np_ == N else y[:, :N]


def i4_stack_strides(qs: list[Int4Weight]) -> tuple[int, int, int] | None:
    """(qweight, qzeros, scales) element strides from one matrix to the next where ``qs`` are G >= 2 views of one
    stack (``formats.i4.stack_i4``: same shape, layout, group and strides, no g_idx, each tensor lying a fixed
    number of elements after the previous one's), else None."""
    if len(qs) < 2:
        return None
    q0 = qs[0]
    if any(q.g_idx is not None or q.shape != q0.shape or q.group_size != q0.group_size
           or q.output_major != q0.output_major or q.qweight.device != q0.qweight.device
           or q.scales.dtype != q0.scales.dtype
           or any(getattr(q, n).stride() != getattr(q0, n).stride() for n in ("qweight", "qzeros", "scales"))
           for q in qs):
        return None
    strides = []
    for n in ("qweight", "qzeros", "scales"):
        t0 = getattr(q0, n)
        d = (getattr(qs[1], n).data_ptr() - t0.data_ptr()) // t0.element_size()
        if d <= 0 or any(getattr(q, n).data_ptr() - t0.data_ptr() != i * d * t0.element_size()
                         for i, q in enumerate(qs)):
            return None
        strides.append(d)
    return tuple(strides)


def i4_gemv_stack(x: torch.Tensor, qs: list[Int4Weight], strides: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x[g] @ qs[g].dequantize()`` for every g in one launch: x [G, M, K] (M <= I4_ROWS, fp16/bf16, CUDA, last dim
    contiguous) and G int4 weights that are views of one stack (``i4_stack_strides``; the r, k, v matrices of an
    RWKV-7 layer at a decode batch) -> [G, M, N] in x's dtype. K and N multiples of 8 (no padding). The G matrices
    share one grid, so their tiles need fewer K splits than one 4096² matrix alone (H100, 64 rows: 256 programs of
    8 k-tiles, 20.0 us, against 14.8 for fp16 cuBLAS). ``strides``: what ``i4_stack_strides(qs)`` returns, where the
    caller has it already (found here otherwise).

    Raises: ShapeMismatchError (not one stack, or x's shape), UnsupportedDtypeError, DeviceError.
    """
    strides = i4_stack_strides(qs) if strides is None else strides
    q = qs[0]
    K, N = q.shape
    if strides is None or x.dim() != 3 or x.shape[0] != len(qs) or q.qweight.shape[0] * 8 != K \
            or q.qweight.shape[1] != N or x.stride(-1) != 1:
        raise ShapeMismatchError(f"i4_gemv_stack needs x [G, M, {K}] (last dim contiguous) and G views of one int4 "
                                 f"stack of K and N multiples of 8; got x {tuple(x.shape)} and {len(qs)} weights",
                                 tensor="x", expected=(len(qs), "M", K), actual=tuple(x.shape))
    _check(x[0], K, {"qweight": q.qweight, "qzeros": q.qzeros, "scales": q.scales}, I4_ROWS)
    return _i4_launch(x, q, strides)


def _i4_launch(x: torch.Tensor, q: Int4Weight, strides: tuple[int, int, int]) -> torch.Tensor:
    """The int4 kernel over x [G, M, Kp] (rows contiguous) and the G matrices that lie ``strides`` (qweight, qzeros,
    scales elements) after ``q`` -> [G, M, Np]."""
    G, M, K = x.shape
    N = q.qweight.shape[1]
    device = x.device
    tiles = i4_tiles(M, K, N)
    block_m = min(64, max(16, 1 << (M - 1).bit_length()))
    row_blocks = -(-M // block_m)
    blocks_n = -(-N // tiles["BLOCK_N"])
    if M > 32:
        splits, per = _split_one_wave(K, blocks_n * row_blocks * G, device, tiles["BLOCK_K"])
    else:       # the G matrices as G x N columns
        splits, per = _split(K, G * N, device, tiles["BLOCK_N"], tiles["BLOCK_K"])
    counters = _counters(device) if splits > 1 and blocks_n * row_blocks * G <= _MAX_TILES else None
    if counters is None:
        splits, per = 1, K
    y = torch.empty(G, M, N, dtype=x.dtype, device=device)
    ws = torch.empty(G, splits, M, N, dtype=torch.float32, device=device) if splits > 1 else y
    gi = q.g_idx if q.g_idx is not None else q.qweight
    _kernels().i4_gemv_kernel[(blocks_n, splits, G * row_blocks)](
        x, q.qweight, q.qzeros, q.scales, gi, y, ws, counters if counters is not None else y, M, K, N, q.group_size,
        q.qweight.stride(0), q.qweight.stride(1), x.stride(1), N, per, splits, row_blocks,
        x.stride(0) if G > 1 else 0, *strides, M * N if G > 1 else 0,
        HAS_GIDX=q.g_idx is not None, ONE_GROUP=q.g_idx is None and q.group_size % tiles["BLOCK_K"] == 0,
        BF16=x.dtype == torch.bfloat16, SPLIT=splits > 1, BLOCK_M=block_m, **tiles)
    return y


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
