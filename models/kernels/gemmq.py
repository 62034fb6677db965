"""The int4 GEMM on the tensor cores for decode batches (``csrc/gemvq/gemmq_cuda.cu``, op ``gemmq_i4_cuda``).

``y = x @ W`` for x [M, K] fp16/bf16 (M from 5 up: the compiled GEMV of ``csrc/gemvq`` serves 1..4 rows) and an
``Int4Weight`` held output-major (the layout of CUDA weights; ``formats.i4``). The kernel dequantizes the GPTQ words
in registers straight into the B operand of ``mma.sync.m16n8k16`` (no shuffled copy of the weights: the product's
k order is permuted instead, and x, which is small, is staged in that order), float32 accumulation; for fp16
activations the weights take the values of ``Int4Weight.dequantize``, for bf16 the scale is rounded to bf16 first.
K splits write float32 partials that the last split of each tile adds in split order (no atomics on y).

``dispatch.mm4`` calls ``gemmq_i4`` where ``ENABLED``, ``serves_rows``, ``gemmq_i4_ok(q)`` and the device's probe
(``dispatch.gemmq_sound``) agree; ``gemmq_tiles`` is the launch rule (warps per block, K splits). Needs compute
capability 8.0 or later (the launcher refuses older devices).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.formats.i4 import Int4Weight
from rwkv_chat.models.kernels import available
from rwkv_chat.models.ops import gemv as _gemv
from rwkv_chat.models.ops._triton import multiprocessors as _sms

#: K per unit of the kernel (K and the group must be multiples)
UNIT = 128
#: the fewest rows it serves (fewer: the compiled GEMV of ``csrc/gemvq``)
MIN_ROWS = 5
#: rows it leaves to the Triton int4 kernel (r, k, v of a layer stacked in one launch), which measured faster there:
#: the 7.2B decode at batch 64 ran 0.93x fp16 that way and 0.88x with this kernel, at batches 16 and 128 this kernel
#: was ahead (1.17x against 1.00x, 0.75x against 0.73x; H100, ``bench/formats.py --i4-gemm``, one call)
TRITON_ROWS = range(33, 65)
#: whether ``dispatch.mm4`` routes decode batches here (checked by ``tests/gpu/verify_kernels.py --family gemvq``;
#: timed against the Triton int4 kernel by ``bench/kernels.py --only gemvq`` and ``bench/formats.py --i4-gemm``)
ENABLED = True


def built() -> bool:
    """Whether the op is loaded (it is built with the ``gemvq`` family of ``csrc``)."""
    return available("cuda", "gemvq") and hasattr(torch.ops.rwkv_chat, "gemmq_i4_cuda")


def serves_rows(rows: int) -> bool:
    """Whether ``dispatch.mm4`` gives products of ``rows`` rows to this kernel: ``MIN_ROWS`` up, outside
    ``TRITON_ROWS`` (the upper bound is the caller's, ``ops.gemv.I4_ROWS``)."""
    return rows >= MIN_ROWS and rows not in TRITON_ROWS


def gemmq_i4_ok(q: Int4Weight) -> bool:
    """Whether the kernel reads ``q``: on CUDA, held output-major, no g_idx, K and the group multiples of 128, float16
    scales, contiguous tensors, 16-byte aligned words and scales (the binding's checks, so a weight it would refuse
    takes another path)."""
    K = q.shape[0]
    return (q.qweight.is_cuda and q.output_major and q.g_idx is None and K % UNIT == 0 and q.group_size % UNIT == 0
            and K % q.group_size == 0 and q.qweight.shape[0] * 8 == K and q.scales.dtype == torch.float16
            and q.storage.is_contiguous() and q.qzeros.is_contiguous() and q.scales.is_contiguous()
            and q.storage.shape[0] % 8 == 0 and q.storage.data_ptr() % 16 == 0 and q.scales.data_ptr() % 16 == 0)


def row_tile(rows: int) -> int:
    """Rows of x one block takes: 16, 32 or 64 (the kernel's 1, 2 or 4 tiles of 16 rows)."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


#: blocks a multiprocessor per row tile that the split rule aims at. Measured on an H100 (bench/results/h100.md,
#: "int4 GEMM on the tensor cores": splits swept at 8-128 rows, 4096 x 4096, 4096 x 16384, 16384 x 4096): every
#: further split adds float32 partials to write and add, which costs more than the latency more warps would hide,
#: beyond two blocks a multiprocessor of 16- or 32-row tiles and one of 64-row tiles.
WAVE = {16: 2, 32: 2, 64: 1}

_OCCUPANCY: dict[tuple, int] = {}


def blocks_per_sm(device, dtype: torch.dtype, rows: int, warps: int) -> int:
    """Blocks of the kernel for ``rows`` rows of ``dtype`` and ``warps`` that one multiprocessor of ``device`` holds
    at once (the op's occupancy query, cached per device, dtype, row tile and warps); 2 where the op is not built."""
    if not built():
        return 2
    d = torch.device(device)
    index = d.index if d.index is not None else torch.cuda.current_device()
    key = (index, dtype, row_tile(rows), warps)
    if key not in _OCCUPANCY:
        n = torch.ops.rwkv_chat.gemmq_i4_occupancy(index, dtype == torch.bfloat16, rows, warps)
        _OCCUPANCY[key] = max(1, int(n))
    return _OCCUPANCY[key]


def gemmq_tiles(rows: int, K: int, N: int, device, warps: int = 4,
                dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """(warps per block, K splits) for ``rows`` x K @ K x N: blocks of ``warps`` x 32 outputs and ``row_tile(rows)``
    rows, as many K splits as keep the blocks within one wave of ``WAVE[row_tile(rows)]`` blocks a multiprocessor
    (at most ``blocks_per_sm``), at least one."""
    tile = row_tile(rows)
    blocks = -(-N // (32 * warps)) * -(-rows // tile)
    resident = min(WAVE[tile], blocks_per_sm(device, dtype, rows, warps)) * _sms(device)
    splits = max(1, min(K // UNIT, resident // max(blocks, 1)))
    return warps, splits


def gemmq_i4(x: torch.Tensor, q: Int4Weight, splits: int | None = None, warps: int = 4,
             k_groups: int = 1) -> torch.Tensor:
    """``x @ q.dequantize()`` on the tensor cores: x [M, K] fp16/bf16 contiguous on q's CUDA device, ``q`` as
    ``gemmq_i4_ok`` asks -> [M, N] in x's dtype. ``splits`` / ``warps`` override ``gemmq_tiles`` (measuring);
    ``k_groups=2`` (4 warps, more than 32 rows) has two groups of warps share each block's K range, adding their sums
    in shared memory: about 135 KiB of shared memory a block (A100, H100, H200; the op raises elsewhere), splits by
    the one-group rule; not yet timed on a GPU, so ``dispatch.mm4`` does not use it.
    Raises RuntimeError (the op's checks) for inputs outside that contract; callers check first."""
    M, K = x.shape
    N = q.shape[1]
    w, s = gemmq_tiles(M, K, N, x.device, warps, x.dtype)
    s = splits or s
    counters = _gemv._counters(x.device) if s > 1 else None
    if counters is None:
        s = 1
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    work = torch.empty(s, M, N, dtype=torch.float32, device=x.device) if s > 1 else y
    torch.ops.rwkv_chat.gemmq_i4_cuda(x, q.storage, q.qzeros, q.scales, q.group_size, s, w, k_groups, work,
                                      counters if counters is not None else y, y)
    return y
