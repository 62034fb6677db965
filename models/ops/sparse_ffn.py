"""The channel-mix value product of RWKV decode steps, skipping the zero rows of relu(k)² (Triton, CUDA).

RWKV's channel-mix computes ``h = relu(x @ Wk) ** 2`` and ``y = h @ Wv`` (``Wv``: the checkpoint's
``ffn.value.weight`` as the [F, C] matrix of ``x @ W``, F = 4·C). h has many exact zeros (about half of its
entries on random weights, more on trained ones), and at a decode step of a few rows the product's time is the
bytes of Wv read. Stored input-major ([F, C] contiguous), the row f of Wv is only needed where some h[m, f] is
not zero: ``ffn_value`` reads just those rows (BlinkDL's Albatross engine does the same for RWKV-7), so the
bytes read drop with the zeros. Skipping exact zeros does not change the sum: ``skip_zeros=False`` runs the
same kernel reading every row, and both give the same bits (tested in ``tests/gpu/interpret_sparse_ffn.py`` and
``tests/gpu/verify_fused.py``).

    y = ffn_value(h, w_input_major)                  # h [M <= 4, F] fp16/bf16, w [F, C] contiguous, same dtype
    y = ffn_value(h, w, skip_zeros=False)            # dense: every row read, same bits
    ffn_value_reference(h, w)                        # torch form (float32 product, rounded to h's dtype)
    zero_row_fraction(h)                             # share of rows skipped (synchronises: reporting only)

Split over F across programs (about ``WAVES`` per multiprocessor); the partials are added in split
order by the last program of each column block, so results never depend on timing. CUDA-graph capturable: no
host synchronisation, allocations of fixed size per shape; the split counters (shared with ``ops.gemv``) are
made at first use outside capture. Errors: ``UnsupportedDtypeError``, ``ShapeMismatchError``, ``DeviceError``
(not on CUDA, no Triton).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.ops import gemv
from rwkv_chat.models.ops._checks import HALF_DTYPES, check_cuda, check_dtype, check_same_dtype, dtype_name
from rwkv_chat.models.ops._triton import kernels as triton_kernels

#: the most rows of h one call takes (decode batches served by the fused RWKV-7 step's GEMVs)
MAX_ROWS = 4
#: the tile [BLOCK_F, BLOCK_C] of W one program step reads, and the warps per program
BLOCK_F, BLOCK_C, NUM_WARPS = 16, 128, 4
#: programs per multiprocessor the split over F aims at (more bytes in flight; more partial sums to add)
WAVES = 4


def _kernels():
    return triton_kernels("rwkv_chat.models.ops._sparse_ffn_kernels", "ffn_value")


def check(h: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.device:
    """Validate ``ffn_value``'s inputs (dtypes, shapes, layout, then devices); returns the CUDA device.

    Raises: UnsupportedDtypeError (h or w not fp16/bf16, w's dtype not h's, out_dtype not h's or float32),
    ShapeMismatchError (h not [M <= 4, F], w not [F, C], w not contiguous), DeviceError.
    """
    check_dtype(h, "h", HALF_DTYPES)
    check_dtype(w, "w", HALF_DTYPES)
    check_same_dtype({"h": h, "w": w}, "h")
    if out_dtype is not None and out_dtype not in (h.dtype, torch.float32):
        raise UnsupportedDtypeError(f"out_dtype {dtype_name(out_dtype)} is neither h's dtype nor float32",
                                    tensor="out_dtype", expected=f"{dtype_name(h.dtype)} | float32",
                                    actual=dtype_name(out_dtype))
    if h.dim() != 2 or not 1 <= h.shape[0] <= MAX_ROWS:
        raise ShapeMismatchError(f"h has shape {tuple(h.shape)}; expected [M <= {MAX_ROWS}, F]", tensor="h",
                                 expected=(f"1..{MAX_ROWS}", None), actual=tuple(h.shape))
    if w.dim() != 2 or w.shape[0] != h.shape[1]:
        raise ShapeMismatchError(f"w has shape {tuple(w.shape)}; expected [{h.shape[1]}, C] (h is "
                                 f"{tuple(h.shape)})", tensor="w", expected=(h.shape[1], None), actual=tuple(w.shape))
    if not w.is_contiguous():
        raise ShapeMismatchError(f"w [{w.shape[0]}, {w.shape[1]}] must be contiguous (input-major: row f holds the "
                                 f"C weights of input f); got strides {w.stride()}", tensor="w",
                                 expected="contiguous [F, C]", actual=f"strides {w.stride()}")
    return check_cuda({"h": h, "w": w})


def split(F: int, C: int, sms: int, block_f: int = BLOCK_F, block_c: int = BLOCK_C,
          waves: int = WAVES) -> tuple[int, int]:
    """(splits of F, rows of F per split, a multiple of block_f): about ``waves`` programs per multiprocessor
    (``sms`` of them) over the ceil(C / block_c) column blocks."""
    blocks_c = -(-C // block_c)
    want = max(1, min(-(-waves * sms // blocks_c), -(-F // block_f)))
    per = -(-F // want)
    per = -(-per // block_f) * block_f
    return -(-F // per), per


def ffn_value(h: torch.Tensor, w: torch.Tensor, skip_zeros: bool = True, out_dtype: torch.dtype | None = None,
              block_f: int = BLOCK_F, block_c: int = BLOCK_C, num_warps: int = NUM_WARPS,
              waves: int = WAVES) -> torch.Tensor:
    """``h @ w`` for h [M, F] (1 <= M <= 4) and input-major w [F, C] (contiguous), fp16 or bf16 (one dtype), on
    CUDA, float32 accumulation -> [M, C] in ``out_dtype`` (default h's dtype; float32 allowed).

    With ``skip_zeros`` the rows f of w where h[:, f] == 0 for every m are not read (exact zeros only); with
    False every row is read by the same kernel. The two give identical bits for finite w (0 · w adds an exact
    zero; products of two halves are exact in float32). ``block_f``, ``block_c`` (powers of two),
    ``num_warps`` and ``waves`` (programs per multiprocessor) pick the tile and the split (benchmarks compare
    them).

    Raises: UnsupportedDtypeError, ShapeMismatchError, DeviceError (not on CUDA, or Triton missing).
    """
    device = check(h, w, out_dtype)
    k = _kernels()
    if h.stride(1) != 1:
        h = h.contiguous()
    M, F = h.shape
    C = w.shape[1]
    splits, per = split(F, C, gemv._sms(device), block_f, block_c, waves)
    grid_c = -(-C // block_c)
    counters = gemv._counters(device) if splits > 1 and grid_c <= gemv._MAX_TILES else None
    if counters is None:
        splits, per = 1, F
    y = torch.empty(M, C, dtype=out_dtype or h.dtype, device=device)
    ws = torch.empty(splits, M, C, dtype=torch.float32, device=device) if splits > 1 else y
    k.sparse_rows_kernel[(grid_c, splits)](h, w, y, ws, counters if counters is not None else y, M, F, C, h.stride(0),
                                           y.stride(0), per, splits, 1 if skip_zeros else 0, ROWS=M,
                                           SPLIT=splits > 1, BLOCK_F=block_f, BLOCK_C=block_c, num_warps=num_warps)
    return y


def ffn_value_reference(h: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The torch form of ``ffn_value``: ``(h.float() @ w.float())`` rounded to ``out_dtype`` (default h's dtype);
    any device, any layout of w [F, C]. Raises what ``check`` raises for dtypes and shapes (not for layout or
    device)."""
    check_dtype(h, "h", HALF_DTYPES)
    check_dtype(w, "w", HALF_DTYPES)
    check_same_dtype({"h": h, "w": w}, "h")
    if h.dim() != 2 or w.dim() != 2 or w.shape[0] != h.shape[1]:
        raise ShapeMismatchError(f"h {tuple(h.shape)} and w {tuple(w.shape)} do not chain as [M, F] @ [F, C]",
                                 tensor="w", expected=(h.shape[-1], None), actual=tuple(w.shape))
    return (h.float() @ w.float()).to(out_dtype or h.dtype)


def zero_rows(h: torch.Tensor) -> torch.Tensor:
    """bool [F]: the rows f with h[m, f] == 0 for every m of h [M, F] (the rows ``ffn_value`` skips)."""
    return (h == 0).all(dim=0)


def zero_row_fraction(h: torch.Tensor) -> float:
    """The share of rows of w that ``ffn_value(h, w)`` skips, in [0, 1]. Reads the result on the host
    (synchronises with the device): for benchmarks and checks, never inside a decode step."""
    return float(zero_rows(h).float().mean().item())
