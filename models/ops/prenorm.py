"""``norm_gemv``: a decode step's projection of a few rows with the norm before it, in one launch.

    y, h = norm_gemv(x, weight, norm="rms", norm_weight=ln_w, eps=1e-6, residual=res, bias=b)

computes ``h = x + residual`` (x alone without a residual), ``y = norm(h) @ weight.T (+ bias)`` for
``weight`` [N, K] in nn.Linear's layout, or with ``swiglu=True`` and the packed gate|up matrix [2F, K]
(``weight[:F]`` gate, ``weight[F:]`` up) ``y = silu(norm(h) @ gate.T) * (norm(h) @ up.T)`` [M, F] — the
pre-norm projections of a transformer decoder layer (Qwen2: input RMSNorm + packed q|k|v with bias, post-attention
RMSNorm + SwiGLU gate|up; ``norm=None`` for the plain o and down products). A GEMV: the time is the weight bytes
over the memory bandwidth, the norm is recomputed by every program from the (<= 4) rows, so it costs no launch.

Norms: "rms" (``h * rsqrt(mean(h²) + eps) * norm_weight``, float32 statistics, one rounding: ``ops.rmsnorm``),
"layer" (LayerNorm with ``norm_bias``, biased variance, Welford/Chan in float32), None. Accumulation in float32;
y rounds once to x's dtype.

``norm_gemv_reference`` is the same computation in torch (any device): the golden reference of the tests.
Errors: ``UnsupportedDtypeError``, ``ShapeMismatchError`` (these also on CPU tensors), ``DeviceError`` (not on
CUDA, or no Triton).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_chat.models.errors import ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.ops._checks import HALF_DTYPES, check_cuda, check_dtype, check_same_dtype, check_shape
from rwkv_chat.models.ops._triton import kernels as triton_kernels, next_pow2
from rwkv_chat.models.ops._triton import multiprocessors as _sms

#: the most activation rows one launch serves (a decode batch; more rows are a GEMM's work)
MAX_ROWS = 4
NORMS = {None: 0, "rms": 1, "layer": 2}
#: elements of the float32 accumulator tile per program (rows × BLOCK_N × BLOCK_K): 32 registers a thread at
#: 4 warps, twice that with SwiGLU
_TILE = 4096



def pick_blocks(rows: int, n: int, k: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for ``rows`` rows and N outputs of K inputs on a device of ``sms`` multiprocessors:
    chunks of up to 512 inputs (16-byte loads, a contiguous 1 KiB of a half-precision weight row), the
    accumulator tile within ``_TILE`` elements, and outputs per program halved until at least two programs per
    multiprocessor stream weights (a matrix of few outputs still fills the device)."""
    r_pad = next_pow2(rows)
    block_k = min(512, max(16, next_pow2(k)))
    block_n = max(1, _TILE // (r_pad * block_k))
    while block_n > 1 and -(-n // block_n) < 2 * sms:
        block_n //= 2
    return block_n, block_k


def _check(x, weight, norm, norm_weight, norm_bias, eps, residual, bias, swiglu):
    if norm not in NORMS:
        raise UnsupportedDtypeError(f"norm must be one of {', '.join(repr(n) for n in NORMS)}, got {norm!r}",
                                    tensor="norm", expected="None | 'rms' | 'layer'", actual=repr(norm))
    check_dtype(x, "x", HALF_DTYPES)
    check_dtype(weight, "weight", HALF_DTYPES)
    check_same_dtype({"x": x, "weight": weight}, "x")
    if x.dim() < 1 or x.numel() == 0:
        raise ShapeMismatchError(f"x has shape {tuple(x.shape)}; expected [..., K] with 1..{MAX_ROWS} rows",
                                 tensor="x", expected=f"(<= {MAX_ROWS} rows, K)", actual=tuple(x.shape))
    K = x.shape[-1]
    rows = x.numel() // K
    if rows > MAX_ROWS:
        raise ShapeMismatchError(f"x has {rows} rows; norm_gemv serves 1..{MAX_ROWS} (use a GEMM for more)",
                                 tensor="x", expected=f"<= {MAX_ROWS} rows", actual=tuple(x.shape))
    check_shape(weight, "weight", (None, K))
    if swiglu and weight.shape[0] % 2:
        raise ShapeMismatchError(f"weight has shape {tuple(weight.shape)}; SwiGLU takes the packed gate|up [2F, K]",
                                 tensor="weight", expected="(2F, K)", actual=tuple(weight.shape))
    if norm is not None:
        check_dtype(norm_weight, "norm_weight", (x.dtype, torch.float32))
        check_shape(norm_weight, "norm_weight", (K,))
        if norm_bias is not None:
            check_dtype(norm_bias, "norm_bias", (x.dtype, torch.float32))
            check_shape(norm_bias, "norm_bias", (K,))
        if not (isinstance(eps, float) and eps > 0):
            raise UnsupportedDtypeError(f"eps must be a positive float, got {eps!r}", tensor="eps",
                                        expected="float > 0", actual=repr(eps))
    if residual is not None:
        check_dtype(residual, "residual", (x.dtype,))
        check_shape(residual, "residual", tuple(x.shape))
    n_out = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if bias is not None and swiglu:
        raise ShapeMismatchError("a bias goes with a plain projection, not with SwiGLU", tensor="bias",
                                 expected="None with swiglu=True", actual=tuple(bias.shape))
    if bias is not None:
        check_dtype(bias, "bias", (x.dtype, torch.float32))
        check_shape(bias, "bias", (n_out,))
    return rows, K, n_out


def norm_gemv(x: torch.Tensor, weight: torch.Tensor, *, norm: str | None = None, norm_weight: torch.Tensor | None = None,
              norm_bias: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, swiglu: bool = False,
              blocks: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + norm + GEMV (+ bias, or SwiGLU) in one Triton launch (module docstring).

    Args:
        x: [..., K] float16/bfloat16 on CUDA, 1..``MAX_ROWS`` rows.
        weight: [N, K] (nn.Linear's layout; K contiguous, any row stride), x's dtype; with ``swiglu`` [2F, K].
        norm: "rms", "layer" or None. norm_weight, norm_bias: [K] (x's dtype or float32); norm_bias for "layer".
        eps: the norm's epsilon (> 0).
        residual: None or x's shape and dtype: the norm reads ``x + residual``.
        bias: None or [N] (x's dtype or float32), added to the float32 sums.
        swiglu: ``silu(gate) * up`` of the packed gate|up weight.
        blocks: (BLOCK_N, BLOCK_K[, num_warps]) powers of two instead of ``pick_blocks`` and 4 warps (benchmark
            sweeps).
    Returns:
        ``(y, h)``: y [..., N] (or [..., F]) in x's dtype; h = x + residual (x itself without a residual), x's shape.
    Raises:
        UnsupportedDtypeError, ShapeMismatchError: an input above. DeviceError: not on CUDA, or no Triton.
    """
    rows, K, n_out = _check(x, weight, norm, norm_weight, norm_bias, eps, residual, bias, swiglu)
    check_cuda({"x": x, "weight": weight, "norm_weight": norm_weight, "norm_bias": norm_bias, "residual": residual,
                "bias": bias})
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    norm_weight, norm_bias, bias = (t.contiguous() if t is not None else None for t in (norm_weight, norm_bias, bias))
    k = triton_kernels("rwkv_chat.models.ops._prenorm_kernels", op="norm_gemv")
    xr = x.reshape(rows, K)
    xr = xr if xr.stride(-1) == 1 else xr.contiguous()
    if residual is not None:
        rr = residual.reshape(rows, K)
        rr = rr if rr.stride(-1) == 1 else rr.contiguous()
        h = torch.empty(rows, K, dtype=x.dtype, device=x.device)
    else:
        rr = h = xr
    y = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = (*(blocks or pick_blocks(rows, n_out, K, _sms(x.device))), 4)[:3]
    code = NORMS[norm]
    lw = norm_weight if code else xr
    lb = norm_bias if code == 2 and norm_bias is not None else lw
    k.norm_gemv_kernel[(-(-n_out // block_n),)](
        xr, rr, h, lw, lb, weight, bias if bias is not None else xr, y, rows, K, n_out, n_out if swiglu else 0,
        xr.stride(0), rr.stride(0), h.stride(0), weight.stride(0), y.stride(0), float(eps),
        NORM=code, HAS_RES=residual is not None, HAS_LNB=code == 2 and norm_bias is not None,
        HAS_BIAS=bias is not None, SWIGLU=bool(swiglu), R_PAD=next_pow2(rows), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps)
    shape = x.shape[:-1]
    return y.view(*shape, n_out), (h.view(x.shape) if residual is not None else x)


def norm_gemv_reference(x, weight, *, norm=None, norm_weight=None, norm_bias=None, eps=1e-6, residual=None,
                        bias=None, swiglu=False, blocks=None):
    """``norm_gemv`` in plain torch on any device (float32 inside, the norm's output rounded to x's dtype, the
    product and epilogue in float32, y rounded once); same arguments, results and input errors (no DeviceError)."""
    _check(x, weight, norm, norm_weight, norm_bias, eps, residual, bias, swiglu)
    h = x if residual is None else x + residual
    hf = h.float()
    if norm == "rms":
        hn = (hf * torch.rsqrt(hf.square().mean(-1, keepdim=True) + eps) * norm_weight.float()).to(x.dtype)
    elif norm == "layer":
        hn = F.layer_norm(hf, (x.shape[-1],), norm_weight.float(),
                          None if norm_bias is None else norm_bias.float(), eps).to(x.dtype)
    else:
        hn = h
    acc = hn.float() @ weight.float().t()
    if swiglu:
        f = acc.shape[-1] // 2
        acc = F.silu(acc[..., :f]) * acc[..., f:]
    elif bias is not None:
        acc = acc + bias.float()
    return acc.to(x.dtype), h
