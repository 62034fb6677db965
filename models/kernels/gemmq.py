"""The int4 GEMM on the tensor cores for decode batches (``csrc/gemvq/gemmq_cuda.cu``, op ``gemmq_i4_cuda``), and
its form for the reference's uint8 weights (``gemmq_u8``, op ``gemmq_u8_cuda``; fp16 activations, ``U8_ENABLED``).

``y = x @ W`` for x [M, K] fp16/bf16 (M from 5 up, from 3 for large weights: the compiled GEMV of ``csrc/gemvq``
serves the fewer rows) and an ``Int4Weight`` held output-major (the layout of CUDA weights; ``formats.i4``). The
kernel dequantizes the GPTQ words in registers straight into the B operand of ``mma.sync.m16n8k16`` (no shuffled
copy of the weights: the product's k order is permuted instead, and x, which is small, is staged in that order),
float32 accumulation; for fp16
activations the weights take the values of ``Int4Weight.dequantize``, for bf16 the scale is rounded to bf16 first.
K splits write float32 partials that the last split of each tile adds in split order (no atomics on y).

``dispatch.mm4`` (and ``mm4_stack``, ``gemvq_group``) call it where ``ENABLED``, ``serves``, ``gemmq_i4_ok(q)`` and
the device's probe (``dispatch.gemmq_sound``) agree; ``k_groups_for`` and ``gemmq_tiles`` are the launch rule (K
groups, warps per block, K splits). Needs compute capability 8.0 or later (the launcher refuses older devices).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.formats.i4 import Int4Weight
from rwkv_chat.models.formats.i8 import Int8Weight
from rwkv_chat.models.kernels import available
from rwkv_chat.models.ops import gemv as _gemv
from rwkv_chat.models.ops._triton import multiprocessors as _sms

#: K per unit of the kernel (K and the group must be multiples)
UNIT = 128
#: the fewest rows it serves (fewer: the compiled GEMV of ``csrc/gemvq``)
MIN_ROWS = 5
#: rows it leaves to the Triton int4 kernel (none: with two K groups a block at 33-64 rows and r, k, v stacked in
#: one launch (``gemmq_i4_stack``) this kernel took them too; see ``K_GROUPS``)
TRITON_ROWS = range(0)
#: whether ``dispatch.mm4`` routes decode batches here (checked by ``tests/gpu/verify_kernels.py --family gemvq``;
#: timed against the Triton int4 kernel by ``bench/kernels.py --only gemvq`` and ``bench/formats.py --i4-gemm``)
ENABLED = True


def built() -> bool:
    """Whether the op is loaded (it is built with the ``gemvq`` family of ``csrc``)."""
    return available("cuda", "gemvq") and hasattr(torch.ops.rwkv_chat, "gemmq_i4_cuda")


def serves_rows(rows: int) -> bool:
    """Whether ``dispatch.mm4`` gives products of ``rows`` rows to this kernel whatever the weight: ``MIN_ROWS`` up,
    outside ``TRITON_ROWS`` (the upper bound is the caller's, ``ops.gemv.I4_ROWS``)."""
    return rows >= MIN_ROWS and rows not in TRITON_ROWS


#: fewer rows that it takes from the compiled GEMV for large weights (at least ``FEW_ROWS_WEIGHTS`` values): on an
#: H100 the GEMV took 33.8 / 42.7 us for 4096 x 16384 / 16384 x 4096 at 4 rows (about 6 / 9 us a row beyond the
#: first), this kernel 24.2 / 24.9 at 8 (one 16-row tile, the same at fewer rows); for 4096 x 4096 they tied at 4
#: rows (11.5 / 11.4 us), so smaller weights keep the GEMV
FEW_ROWS = range(3, MIN_ROWS)
FEW_ROWS_WEIGHTS = 1 << 25


def serves(rows: int, K: int, N: int) -> bool:
    """Whether ``dispatch.mm4`` gives ``rows`` x K @ K x N to this kernel: ``serves_rows``, or ``FEW_ROWS`` rows of a
    weight of at least ``FEW_ROWS_WEIGHTS`` values."""
    return serves_rows(rows) or (rows in FEW_ROWS and K * N >= FEW_ROWS_WEIGHTS)


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
#: and for more than 64 rows (several 64-row tiles, one K group): at 128 rows 16384 x 4096 took 76.4 us at four splits
#: (two blocks a multiprocessor) against 94.2 at two (one); 4096 x 16384 has enough blocks without splits either way
WAVE_MANY_ROWS = 2

#: K groups a block (4 warps) up to ``K_GROUPS_ROWS`` rows: two groups of warps share a block's K range and add
#: their sums in shared memory, so a multiprocessor holds more warps without more K splits. Measured on an H100
#: (``bench/kernels.py --only gemvq``, fastest splits of each): 4096 x 4096 at 32 rows 14.8 us against 18.6 with one
#: group, at 64 rows 20.5 against 25.3; 16384 x 4096 at 32 rows 33.1 against 39.5; at 8 and 16 rows 2-6% ahead; at 128
#: rows one group is ahead on the large shapes (4096 x 16384: 66.6 against 82.3 us). Four groups (up to 32 rows) were
#: no faster than two. Where the device lacks the shared memory (``blocks_per_sm`` 0) one group serves.
K_GROUPS = 2
K_GROUPS_ROWS = range(MIN_ROWS, 65)
#: rows at which ``dispatch.mm4_stack`` gives a stack (r, k, v) to this kernel: three 4096 x 4096 at 64 rows took
#: 41.3 us in one launch against 53.0 for the Triton stack kernel and 62.7 for three launches, at 128 rows 67.4
#: against 74.1 and 96.2 (one K group there; with two it was 83.2)
STACK_ROWS = range(MIN_ROWS, 257)

_OCCUPANCY: dict[tuple, int] = {}


def blocks_per_sm(device, dtype: torch.dtype, rows: int, warps: int, k_groups: int = 1, u8: bool = False) -> int:
    """Blocks of the kernel (``u8``: its uint8 form) for ``rows`` rows of ``dtype``, ``warps`` and ``k_groups`` that
    one multiprocessor of ``device`` holds at once (the op's occupancy query, cached per device, dtype, row tile,
    warps, groups and form): 0 where the device cannot run that instance (its shared memory); 2 where the op is not
    built."""
    if not built():
        return 2
    d = torch.device(device)
    index = d.index if d.index is not None else torch.cuda.current_device()
    key = (index, dtype, row_tile(rows), warps, k_groups, u8)
    if key not in _OCCUPANCY:
        n = torch.ops.rwkv_chat.gemmq_i4_occupancy(index, dtype == torch.bfloat16, rows, warps, k_groups, u8)
        _OCCUPANCY[key] = max(0, int(n))
    return _OCCUPANCY[key]


def k_groups_for(rows: int, device, warps: int = 4, dtype: torch.dtype = torch.float16, u8: bool = False) -> int:
    """K groups of the launch rule: ``K_GROUPS`` for ``K_GROUPS_ROWS`` rows with 4 warps where the device runs it,
    else 1."""
    kg = K_GROUPS if warps == 4 and rows in K_GROUPS_ROWS else 1
    return kg if kg == 1 or blocks_per_sm(device, dtype, rows, warps, kg, u8) > 0 else 1


def gemmq_tiles(rows: int, K: int, N: int, device, warps: int = 4, dtype: torch.dtype = torch.float16,
                k_groups: int = 1, stack: int = 1, u8: bool = False) -> tuple[int, int]:
    """(warps per block, K splits) for ``stack`` products of ``rows`` x K @ K x N in one launch: blocks of ``warps`` x
    32 outputs, ``row_tile(rows)`` rows and ``k_groups`` groups of warps, as many K splits as keep the blocks within
    one wave of ``WAVE[row_tile(rows)] // k_groups`` (``WAVE_MANY_ROWS`` above 64 rows) blocks a multiprocessor (the
    groups of a block count as blocks; at least one, at most ``blocks_per_sm``), at least one split."""
    tile = row_tile(rows)
    blocks = stack * -(-N // (32 * warps)) * -(-rows // tile)
    wave = WAVE_MANY_ROWS if rows > 64 else WAVE[tile]
    per_sm = min(max(1, wave // k_groups), max(1, blocks_per_sm(device, dtype, rows, warps, k_groups, u8)))
    resident = per_sm * _sms(device)
    splits = max(1, min(K // UNIT, resident // max(blocks, 1)))
    return warps, splits


def _launch(x: torch.Tensor, weights: tuple, group: int | None, N: int, splits, warps, k_groups,
            relu2: bool = False) -> torch.Tensor:
    """One launch for x [M, K] (or a stack [G, M, K]) and the weight tensors (int4: qweight, qzeros, scales of the
    same rank; ``group`` None: the uint8 form's w, mx, rx, my, ry) -> [(G,) M, N]."""
    *g, M, K = x.shape
    G = g[0] if g else 1
    u8 = group is None
    if k_groups is None:
        k_groups = k_groups_for(M, x.device, warps, x.dtype, u8)
    w, s = gemmq_tiles(M, K, N, x.device, warps, x.dtype, k_groups, G, u8)
    s = splits or s
    counters = _gemv._counters(x.device) if s > 1 else None
    if counters is None:
        s = 1
    y = torch.empty(*g, M, N, dtype=x.dtype, device=x.device)
    work = torch.empty(s, G, M, N, dtype=torch.float32, device=x.device) if s > 1 else y
    tail = (s, w, k_groups, relu2, work, counters if counters is not None else y, y)
    if u8:
        torch.ops.rwkv_chat.gemmq_u8_cuda(x, *weights, *tail)
    else:
        torch.ops.rwkv_chat.gemmq_i4_cuda(x, *weights, group, *tail)
    return y


def gemmq_i4(x: torch.Tensor, q: Int4Weight, splits: int | None = None, warps: int = 4,
             k_groups: int | None = None, relu2: bool = False) -> torch.Tensor:
    """``x @ q.dequantize()`` on the tensor cores: x [M, K] fp16/bf16 contiguous on q's CUDA device, ``q`` as
    ``gemmq_i4_ok`` asks -> [M, N] in x's dtype; with ``relu2``, ``torch.relu(x).square()`` (in x's dtype, the RWKV
    channel-mix value's input) in place of x, taken as x is staged. ``splits`` / ``warps`` / ``k_groups`` (1, 2, or 4
    up to 32 rows; 4 warps for more than one) override the launch rule (``gemmq_tiles``, ``k_groups_for``) for
    measuring; two K groups of 64-row tiles take about 135 KiB of shared memory a block, four of 32-row tiles about
    201 KiB (the op raises where the device has less).
    Raises RuntimeError (the op's checks) for inputs outside that contract; callers check first."""
    return _launch(x, (q.storage, q.qzeros, q.scales), q.group_size, q.shape[1], splits, warps, k_groups, relu2)


def stack_tensors(qs: list[Int4Weight]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(qweight [G, Np, K/8], qzeros [G, K/group, Np/8], scales [G, K/group, Np]) viewing G >= 2 int4 weights that lie
    one after another in memory (``formats.i4.stack_i4``) and that ``gemmq_i4_ok`` accepts, else None."""
    if len(qs) < 2 or not all(isinstance(q, Int4Weight) and gemmq_i4_ok(q) for q in qs):
        return None
    strides = _gemv.i4_stack_strides(qs)
    if strides is None:
        return None
    out = []
    for n, d in zip(("storage", "qzeros", "scales"), strides):    # storage: qweight's memory
        t0 = getattr(qs[0], n)
        base = t0.untyped_storage().data_ptr()      # one allocation (neighbours in an allocator segment are not)
        if d != t0.numel() or any(getattr(q, n).untyped_storage().data_ptr() != base for q in qs[1:]):
            return None
        out.append(torch.as_strided(t0, (len(qs), *t0.shape), (d, *t0.stride())))
    return tuple(out)


def gemmq_i4_stack(x: torch.Tensor, qs: list[Int4Weight], splits: int | None = None,
                   k_groups: int | None = None) -> torch.Tensor | None:
    """``x[g] @ qs[g].dequantize()`` for G int4 weights of one stack in one launch: x [G, M, K] fp16/bf16 contiguous
    on their CUDA device -> [G, M, N] in x's dtype; None where ``stack_tensors`` does not view them as one stack."""
    t = stack_tensors(qs)
    if t is None or x.dim() != 3 or x.shape[0] != len(qs) or not x.is_contiguous():
        return None
    return _launch(x, t, qs[0].group_size, qs[0].shape[1], splits, 4, k_groups)


#: whether ``dispatch.mm8`` gives fp16 decode batches (``serves_rows``) of i8 weights to the uint8 form
#: (``gemmq_u8``): checked by ``tests/gpu/verify_kernels.py --family gemvq``; per product 1.0-1.6x the Triton i8
#: kernel at 8-128 rows (``bench/kernels.py --only gemvq``, H100); a switch for benchmarks (``bench/formats.py
#: --i8-gemm``), as ``ENABLED`` is for the int4 form
U8_ENABLED = True
#: whether the fused RWKV-7 backend stacks an fp16 i8 layer's r, k, v for ``gemmq_u8_stack`` (``dispatch.mm8_stack``,
#: one launch at decode batches; probed at load): checked by ``tests/gpu/verify_kernels.py --family gemvq``
#: (``case_gemmq_u8_stack``); 7.2B i8 decode at batch 16 / 64 / 128 1.26x / 0.94x / 0.74x fp16 against 1.16x / 0.86x /
#: 0.69x unstacked (``bench/formats.py --i8-gemm``, H100); a switch for benchmarks
U8_STACK_ENABLED = True


def gemmq_u8_ok(q: Int8Weight, x: torch.Tensor) -> bool:
    """Whether the uint8 form reads the i8 weight ``q`` (``formats.i8``, the reference's scheme) with activations
    ``x``: fp16 x on q's device, K wide, and a weight ``u8_weight_ok`` accepts: the binding's checks."""
    return (x.dtype == torch.float16 and x.shape[-1] == q.shape[0] and x.device == q.storage.device
            and u8_weight_ok(q))


def u8_weight_ok(q: Int8Weight) -> bool:
    """The weight's part of ``gemmq_u8_ok``: on CUDA, held output-major, K (its input size) a multiple of 128, the
    matrix contiguous and 16-byte aligned, the four scale vectors contiguous fp16 (my, ry 16-byte aligned)."""
    K, N = q.shape
    st = q.storage
    return (st.is_cuda and q.output_major and K % UNIT == 0 and st.is_contiguous() and st.data_ptr() % 16 == 0
            and all(t.dtype == torch.float16 and t.is_contiguous() for t in (q.mx, q.rx, q.my, q.ry))
            and q.mx.numel() == q.rx.numel() == N and q.my.numel() == q.ry.numel() == K
            and q.my.data_ptr() % 16 == 0 and q.ry.data_ptr() % 16 == 0)


def stack_u8_tensors(qs: list[Int8Weight]) -> tuple[torch.Tensor, ...] | None:
    """(w [G, N, K], mx [G, N], rx [G, N], my [G, K, 1], ry [G, K, 1]) viewing G >= 2 i8 weights of one shape that lie
    one after another in memory (``formats.i8.stack_i8``), output-major, K a multiple of 128, fp16 scales, the bytes
    and my / ry 16-byte aligned (``u8_weight_ok``), else None."""
    if len(qs) < 2 or not all(isinstance(q, Int8Weight) for q in qs):
        return None
    q0 = qs[0]
    if not all(q.shape == q0.shape and u8_weight_ok(q) for q in qs):
        return None
    out = []
    for i, t0 in enumerate((q0.storage, q0.mx, q0.rx, q0.my, q0.ry)):
        parts = [(q.storage, q.mx, q.rx, q.my, q.ry)[i] for q in qs]
        step = t0.numel() * t0.element_size()
        base = t0.untyped_storage().data_ptr()
        if any(t.stride() != t0.stride() or t.shape != t0.shape or t.data_ptr() - t0.data_ptr() != g * step
               or t.untyped_storage().data_ptr() != base for g, t in enumerate(parts)):
            return None         # not back to back: the products go one by one
        out.append(torch.as_strided(t0, (len(qs), *t0.shape), (t0.numel(), *t0.stride())))
    return tuple(out)


def gemmq_u8_stack(x: torch.Tensor, qs: list[Int8Weight], splits: int | None = None,
                   k_groups: int | None = None) -> torch.Tensor | None:
    """``x[g] @ qs[g].dequantize()`` for G i8 weights of one stack in one launch (the uint8 form): x [G, M, K] fp16
    contiguous on their CUDA device -> [G, M, N] fp16; None where ``stack_u8_tensors`` does not view them as one
    stack or x is not that."""
    t = stack_u8_tensors(qs)
    if (t is None or x.dim() != 3 or x.shape[0] != len(qs) or not x.is_contiguous() or x.dtype != torch.float16
            or x.device != t[0].device):
        return None
    return _launch(x, t, None, qs[0].shape[1], splits, 4, k_groups)


def gemmq_u8(x: torch.Tensor, q: Int8Weight, splits: int | None = None, warps: int = 4,
             k_groups: int | None = None, relu2: bool = False) -> torch.Tensor:
    """``x @ q.dequantize()`` for an i8 weight on the tensor cores: x [M, K] fp16 contiguous on q's CUDA device, ``q``
    as ``gemmq_u8_ok`` asks -> [M, N] fp16. The reference's ``(w + 0.5) ry rx + my + mx`` factored: ``((x ry) @
    (w + 0.5)) rx + x @ my + sum(x) mx``, x ry rounded to fp16 as it is staged (w + 0.5 is exact in fp16), float32
    sums; within half-precision rounding of ``i8.mm8_torch``, not bit-equal to it. ``relu2``, ``splits``, ``warps``,
    ``k_groups`` as for ``gemmq_i4`` but 1 or 2 (four would exceed every device's shared memory in this form).
    Raises RuntimeError (the op's checks) outside that contract."""
    K = q.shape[0]
    weights = (q.storage, q.mx.reshape(-1), q.rx.reshape(-1), q.my.reshape(K), q.ry.reshape(K))
    return _launch(x, weights, None, q.shape[1], splits, warps, k_groups, relu2)
