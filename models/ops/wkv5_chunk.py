"""Chunked WKV-5/6 for prefill (Triton, CUDA): T tokens in chunks of ``CHUNK``, the state kept on chip.

RWKV-5/5.1/5.2 (decay w [H, N], fixed per head) and RWKV-6 (w [B, T, H, N], per token), state S [K, V] per
(batch, head): ``S_t = diag(w_t) S_{t-1} + k_tᵀ v_t``, ``y_t = r_t (S_{t-1} + diag(u) k_tᵀ v_t)`` (ChatRWKV
``rwkv/cuda/rwkv5.cu`` / ``rwkv6.cu``, pip 0.8.32). The sequential kernel (``csrc/wkv5``) takes T dependent
steps per head; here each chunk's in-chunk interactions are small matrix products and only one [K, BV] state
update per chunk is sequential (``models/rwkv/chunked.py``'s ``wkv5_chunked`` for the formulas: Yang et al. 2024,
"Gated Linear Attention Transformers with Hardware-Efficient Training", whose chunked form this is; the
decays as segment sums, so every exponent is <= 0 and any decay in [0, 1) is safe).

    y, s_new = wkv5_chunk(r, k, v, w, u, s)      # same contract as models.rwkv.wkv.wkv5_torch

One program per (batch x head, block of ``BLOCK_V`` value columns): the state columns evolve independently, so
the [K, BLOCK_V] slice stays in registers over all chunks and is written once at the end. Float32 inside (no
tf32), so results match the sequential kernel to float32 rounding (checked in Triton's interpreter by
``tests/gpu/interpret_wkv5_chunk.py`` and on a GPU by ``tests/gpu/verify_kernels.py``). No host synchronisation:
CUDA-graph capturable. Head sizes: powers of two from 16 to 128 (``serves``).

Errors: ``UnsupportedDtypeError``, ``ShapeMismatchError`` (as ``kernels.checks.check_wkv5``, and a head size
this kernel does not take), ``DeviceError`` (not on CUDA, no Triton).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.kernels.checks import check_wkv5
from rwkv_chat.models.ops import _checks, _triton

_KERNELS = "rwkv_chat.models.ops._wkv5_chunk_kernels"
#: tokens per chunk, value columns per program, key channels per block of the [L, L, BK] segment sums
CHUNK, BLOCK_V, BLOCK_K = 16, 16, 16
#: head sizes the kernel takes
HEAD_SIZES = (16, 32, 64, 128)


def serves(r: torch.Tensor) -> bool:
    """True when ``wkv5_chunk`` takes r's head size (r [B, T, H, N])."""
    return r.dim() == 4 and r.shape[-1] in HEAD_SIZES


def wkv5_chunk(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor, u: torch.Tensor,
               s: torch.Tensor, *, out: tuple[torch.Tensor, torch.Tensor] | None = None, parallel: bool = False):
    """The RWKV-5/6 WKV over T tokens, chunked; same contract as ``wkv.wkv5_torch``.

    ``parallel``: three launches instead of one (``_wkv5_chunk_kernels``: every chunk's in-chunk terms at once, one
    program per batch x head x chunk; a scan over the chunks' state increments, the only sequential part; the
    outputs at once), for few heads and long sequences, where the one-launch form keeps few multiprocessors busy.
    Float32 workspace: 4 (B T H N + B H nc N (N + 1)) bytes, nc = ceil(T / CHUNK).

    Args:
        r, k, v: [B, T, H, N] float32 / float16 / bfloat16 (one dtype), N in ``HEAD_SIZES``.
        w: float32 decay factors in [0, 1]: [H, N] (RWKV-5) or [B, T, H, N] (RWKV-6).
        u: float32 [H, N], the current token's bonus.
        s: float32 [B, H, N, N] indexed [key, value] (read, not modified unless ``out`` names it).
        out: ``(y, s_new)`` to write into (s_new may be s itself).
    Returns:
        ``(y [B, T, H, N] in r's dtype, s_new float32 [B, H, N, N])``.
    Raises:
        UnsupportedDtypeError, ShapeMismatchError, DeviceError.
    """
    check_wkv5(r, k, v, w, u, s, out)
    B, T, H, N = r.shape
    if N not in HEAD_SIZES:
        raise ShapeMismatchError(f"wkv5_chunk: head size {N} is not one of {HEAD_SIZES}", tensor="r",
                                 expected=(B, T, H, HEAD_SIZES), actual=tuple(r.shape))
    _checks.check_cuda({"r": r, "k": k, "v": v, "w": w, "u": u, "s": s})
    kern = _triton.kernels(_KERNELS, op="wkv5_chunk")
    r, k, v, w, u, s = (t.contiguous() for t in (r, k, v, w, u, s))
    y, s_new = out if out is not None else (torch.empty_like(r), torch.empty_like(s))
    bv, bk, per_token = min(BLOCK_V, N), min(BLOCK_K, N), w.dim() == 4
    if B * H and T and parallel:
        nc = -(-T // CHUNK)
        yw = torch.empty(B, T, H, N, dtype=torch.float32, device=r.device)
        d = torch.empty(B * H, nc, N, N, dtype=torch.float32, device=r.device)
        g = torch.empty(B * H, nc, N, dtype=torch.float32, device=r.device)
        with _triton.on(r.device):
            kern.wkv5_prep_kernel[(nc, B * H)](r, k, v, w, u, yw, d, g, T, H, nc, PER_TOKEN=per_token, N=N,
                                               L=CHUNK, BK=bk, num_warps=4)
            kern.wkv5_scan_kernel[(B * H, N // bv)](s, d, g, s_new, nc, N=N, BV=bv, num_warps=4)
            kern.wkv5_out_kernel[(nc, B * H)](r, w, yw, d, y, T, H, nc, PER_TOKEN=per_token, N=N, L=CHUNK,
                                              num_warps=4)
    elif B * H and T:
        with _triton.on(r.device):
            kern.wkv5_chunk_kernel[(B * H, N // bv)](r, k, v, w, u, s, y, s_new, T, H, PER_TOKEN=per_token, N=N,
                                                     L=CHUNK, BV=bv, BK=bk, num_warps=4)
    elif s_new.data_ptr() != s.data_ptr():
        s_new.copy_(s)
    return y, s_new
