"""RMSNorm and rotary position embedding (RoPE), fused, in Triton (compiled at first use on CUDA).

Formulas (Hugging Face ``Qwen2RMSNorm`` / ``apply_rotary_pos_emb``, the "rotate_half" convention of Llama,
Qwen2 and Qwen3; RMSNorm: Zhang & Sennrich 2019, RoPE: Su et al. 2021)::

    rmsnorm(x) = x / sqrt(mean(x**2, over the normalised dim) + eps) * weight
    rope(x)    = x * cos + rotate_half(x) * sin        per head of D values,
                 rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

cos and sin are the caller's tables already gathered at each token's position: ``[T, D]`` (one table for
every sequence of the batch) or ``[B, T, D]`` (per sequence: decode of conversations at different
lengths; B = 1 broadcasts), any float dtype. Values load in their dtype and everything is computed in
fp32 (Hugging Face rounds to the input dtype between the norm's two products and inside RoPE; results
agree within one rounding of the output dtype). Outputs have the dtype of ``x`` (``q``, ``k``).
Inputs: float16, bfloat16, float32; D even.

Ops: ``fused_rmsnorm_rope`` (the operator library's op: RMSNorm of the whole hidden row, then RoPE per
head), ``rmsnorm`` (residual add + RMSNorm, before Qwen2's QKV GEMM), ``rope`` (q and k in one launch,
after it), ``qk_norm_rope`` (Qwen3: per-head RMSNorm of q and k, then RoPE).

Errors (validated before anything runs, shapes and dtypes first, so they are reported on CPU too):
``UnsupportedDtypeError`` (int, fp64, a non-tensor), ``ShapeMismatchError`` (``tensor``, ``expected``,
``actual``), then ``DeviceError`` (an input not on CUDA, inputs on two devices, no Triton).
``NumericalOverflowError`` only with ``check_finite=True`` (one reduction and a host sync; off by default).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.ops import _checks, _triton

_KERNELS = "rwkv_chat.models.ops._rmsnorm_rope_kernels"
#: the longest row (hidden size) the row kernels hold in one program
MAX_ROW = 32768


def _warps(elems: int) -> int:
    return 4 if elems <= 2048 else 8 if elems <= 8192 else 16


def _cos_sin(cos, sin, lead: tuple, head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validate cos/sin against the leading dims ``lead`` = (..., T) of the input; returns (cos, sin, stride of
    the batch dim (0 when shared), stride of T) with both tables contiguous."""
    _checks.check_dtype(cos, "cos")
    _checks.check_dtype(sin, "sin")
    _checks.check_dim(cos, "cos", (2, 3))
    d = cos.shape[-1] if head_dim is None else head_dim
    if d <= 0 or d % 2:
        raise ShapeMismatchError(f"cos has shape {tuple(cos.shape)}; its last dim (head_dim) must be even",
                                 tensor="cos", expected="(..., even head_dim)", actual=tuple(cos.shape))
    t = lead[-1] if lead else 1
    if cos.dim() == 2:
        _checks.check_shape(cos, "cos", (t, d))
    else:
        b = math.prod(lead[:-1]) if len(lead) > 1 else 1
        _checks.check_shape(cos, "cos", (1 if cos.shape[0] == 1 else b, t, d))
    _checks.check_shape(sin, "sin", tuple(cos.shape))
    cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin, (cos.stride(0) if cos.dim() == 3 and cos.shape[0] > 1 else 0), cos.stride(-2)


def fused_rmsnorm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       eps: float = 1e-6, num_heads: int | None = None, check_finite: bool = False) -> torch.Tensor:
    """RMSNorm of each hidden row, then RoPE on each of its heads, in one launch.

    x: ``[..., T, H*D]`` (or ``[..., T, H, D]``, normalised over all H*D values the same way), float16 /
    bfloat16 / float32; weight: ``[H*D]`` float; cos, sin: ``[T, D]`` or ``[B, T, D]`` (B = the product of
    the dims before T, or 1) float, D even. num_heads: H (default hidden / D; must then divide).
    Returns ``rope(rmsnorm(x) * weight)`` with x's shape and dtype, fp32 inside.

    Raises UnsupportedDtypeError, ShapeMismatchError, DeviceError (see the module), and with
    ``check_finite=True`` NumericalOverflowError when the output holds inf/NaN (a host sync).
    """
    for name, t in (("x", x), ("weight", weight), ("cos", cos), ("sin", sin)):
        _checks.check_dtype(t, name)
    _checks.check_dim(x, "x", range(1, 16))
    _checks.check_dim(weight, "weight", (1,))
    _checks.check_dim(cos, "cos", (2, 3))
    d = cos.shape[-1]
    if x.dim() >= 2 and x.shape[-1] == d and weight.shape[0] == x.shape[-2] * d != d:
        heads, lead = x.shape[-2], tuple(x.shape[:-2])                       # [..., T, H, D]
    else:
        _checks.check_shape(weight, "weight", (x.shape[-1],))
        if d <= 0 or x.shape[-1] % d:
            raise ShapeMismatchError(f"x has shape {tuple(x.shape)}; its last dim is not a multiple of head_dim {d}",
                                     tensor="x", expected=f"(..., H*{d})", actual=tuple(x.shape))
        heads, lead = x.shape[-1] // d, tuple(x.shape[:-1])                  # [..., T, H*D]
    if num_heads is not None and num_heads != heads:
        raise ShapeMismatchError(f"x has {heads} heads of {d}; num_heads={num_heads}",
                                 tensor="x", expected=(*lead, num_heads * d), actual=tuple(x.shape))
    hidden = heads * d
    if hidden > MAX_ROW:
        raise ShapeMismatchError(f"hidden size {hidden} exceeds {MAX_ROW}", tensor="x",
                                 expected=f"(..., <= {MAX_ROW})", actual=tuple(x.shape))
    cos, sin, scb, sct = _cos_sin(cos, sin, lead)
    _checks.check_cuda({"x": x, "weight": weight, "cos": cos, "sin": sin})
    k = _triton.kernels(_KERNELS, op="fused_rmsnorm_rope")
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((rows.shape[0], hidden), dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        bh, bhalf = _triton.next_pow2(heads), _triton.next_pow2(d // 2)
        k.rmsnorm_rope_kernel[(rows.shape[0],)](
            rows, out, weight.contiguous(), cos, sin, lead[-1] if lead else 1, rows.stride(0), out.stride(0),
            scb, sct, heads, hidden, float(eps), HALF=d // 2, BLOCK_H=bh, BLOCK_HALF=bhalf,
            num_warps=_warps(2 * bh * bhalf))
    out = out.view(x.shape)
    if check_finite:
        _checks.check_finite(out, "output", str(x.dtype))
    return out


def _check_out(out, q, k, tensors: dict) -> None:
    """Validate ``out`` = (q_out, k_out): q's and k's shapes and dtype, last dim contiguous; adds them to tensors."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ShapeMismatchError("out must be a pair (q_out, k_out)", tensor="out", expected="(q_out, k_out)",
                                 actual=type(out).__name__)
    for name, o, like in (("q_out", out[0], q), ("k_out", out[1], k)):
        _checks.check_dtype(o, name)
        _checks.check_same_dtype({"q": q, name: o}, "q")
        _checks.check_shape(o, name, tuple(like.shape))
        if o.dim() and o.stride(-1) != 1:
            raise ShapeMismatchError(f"{name} has strides {o.stride()}; its last dim must be contiguous", tensor=name,
                                     expected="stride 1 in the last dim", actual=tuple(o.stride()))
        tensors[name] = o


def _rope_qk(q, k, q_weight, k_weight, cos, sin, eps, norm: bool, op: str, check_finite: bool, out=None):
    _checks.check_dtype(q, "q")
    _checks.check_dtype(k, "k")
    _checks.check_same_dtype({"q": q, "k": k}, "q")
    _checks.check_dim(q, "q", (3, 4))
    d = q.shape[-1]
    _checks.check_shape(k, "k", (*q.shape[:-2], None, d))
    tensors = {"q": q, "k": k}
    if norm:
        for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
            _checks.check_dtype(w, name)
            _checks.check_shape(w, name, (d,))
            tensors[name] = w
    if out is not None:
        _check_out(out, q, k, tensors)
    lead = tuple(q.shape[:-2])
    cos, sin, scb, sct = _cos_sin(cos, sin, lead, head_dim=d)
    _checks.check_cuda({**tensors, "cos": cos, "sin": sin})
    kern = _triton.kernels(_KERNELS, op=op)
    q4, k4 = (q, k) if q.dim() == 4 else (q.unsqueeze(0), k.unsqueeze(0))
    q4 = q4 if q4.stride(-1) == 1 else q4.contiguous()
    k4 = k4 if k4.stride(-1) == 1 else k4.contiguous()
    if out is None:
        qo, ko = torch.empty(q4.shape, dtype=q.dtype, device=q.device), torch.empty(k4.shape, dtype=k.dtype, device=k.device)
    else:
        qo, ko = (out[0], out[1]) if q.dim() == 4 else (out[0].unsqueeze(0), out[1].unsqueeze(0))
    n_rows = q4.shape[0] * q4.shape[1]
    if n_rows:
        bq, bk, bhalf = _triton.next_pow2(q4.shape[2]), _triton.next_pow2(k4.shape[2]), _triton.next_pow2(d // 2)
        qw = q_weight.contiguous() if norm else q4
        kw = k_weight.contiguous() if norm else k4
        kern.rope_qk_kernel[(n_rows,)](
            q4, k4, qo, ko, qw, kw, cos, sin, q4.shape[1],
            q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), scb, sct,
            q4.shape[2], k4.shape[2], float(eps), HALF=d // 2, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_HALF=bhalf,
            NORM=1 if norm else 0, num_warps=_warps(2 * max(bq, bk) * bhalf))
    qo, ko = (qo.view(q.shape), ko.view(k.shape)) if out is None else (out[0], out[1])
    if check_finite:
        _checks.check_finite(qo, "q output", str(q.dtype))
        _checks.check_finite(ko, "k output", str(k.dtype))
    return qo, ko


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, check_finite: bool = False,
         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k in one launch (Qwen2: after the QKV GEMM).

    q: ``[B, T, Hq, D]`` (or ``[T, Hq, D]``), k: ``[B, T, Hkv, D]`` (GQA: any Hkv), same float dtype,
    any strides with the last dim contiguous (views of a fused QKV output work without a copy); cos, sin:
    ``[T, D]`` or ``[B, T, D]`` float. Returns (q_rot, k_rot) of q's and k's shapes and dtype: new contiguous
    tensors, or ``out`` = (q_out, k_out) written in place — any strides with the last dim contiguous, e.g.
    k_out a [B, T, Hkv, D] view of the KV cache, or q and k themselves. Raises as the module says.
    """
    return _rope_qk(q, k, None, None, cos, sin, 0.0, False, "rope", check_finite, out)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6, check_finite: bool = False,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k over D (Qwen3's ``q_norm``/``k_norm``, weights ``[D]``), then RoPE, in one
    launch. Shapes, dtypes and ``out`` as ``rope``. Raises as the module says."""
    return _rope_qk(q, k, q_weight, k_weight, cos, sin, eps, True, "qk_norm_rope", check_finite, out)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: torch.Tensor | None = None,
            check_finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm in one launch (the pre-norm of a transformer block).

    x: ``[..., hidden]`` float16/bfloat16/float32; weight: ``[hidden]`` float; residual: None or x's shape
    and dtype. With a residual, ``h = x + residual`` (rounded to x's dtype, as a torch add would) and
    returns ``(rmsnorm(h) * weight, h)``; without, returns ``(rmsnorm(x) * weight, x)``. Outputs in x's
    dtype, fp32 inside. Raises as the module says (hidden <= MAX_ROW).
    """
    _checks.check_dtype(x, "x")
    _checks.check_dtype(weight, "weight")
    _checks.check_dim(x, "x", range(1, 16))
    hidden = x.shape[-1]
    _checks.check_shape(weight, "weight", (hidden,))
    tensors = {"x": x, "weight": weight}
    if residual is not None:
        _checks.check_dtype(residual, "residual")
        _checks.check_same_dtype({"x": x, "residual": residual}, "x")
        _checks.check_shape(residual, "residual", tuple(x.shape))
        tensors["residual"] = residual
    if hidden > MAX_ROW:
        raise ShapeMismatchError(f"hidden size {hidden} exceeds {MAX_ROW}", tensor="x",
                                 expected=f"(..., <= {MAX_ROW})", actual=tuple(x.shape))
    _checks.check_cuda(tensors)
    kern = _triton.kernels(_KERNELS, op="rmsnorm")
    rows = x.reshape(-1, hidden)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        res = residual.reshape(-1, hidden)
        res = res if res.stride(-1) == 1 else res.contiguous()
        h = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    else:
        res = h = rows
    if rows.shape[0]:
        block = _triton.next_pow2(hidden)
        kern.rmsnorm_kernel[(rows.shape[0],)](
            rows, res, weight.contiguous(), out, h, hidden, rows.stride(0), res.stride(0), out.stride(0),
            h.stride(0), float(eps), HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block))
    out = out.view(x.shape)
    if check_finite:
        _checks.check_finite(out, "output", str(x.dtype))
    return out, (h.view(x.shape) if residual is not None else x)


class FusedRMSNormRoPE(nn.Module):
    """RMSNorm (learned ``weight`` [hidden_dim], initialised to ones) followed by RoPE per head of
    ``head_dim``: ``forward(x, cos, sin)`` = ``fused_rmsnorm_rope(x, weight, cos, sin, eps, hidden_dim //
    head_dim)`` (shapes, dtypes and errors there). Construction raises ShapeMismatchError unless head_dim is
    even and divides hidden_dim."""

    def __init__(self, hidden_dim: int, head_dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if head_dim <= 0 or head_dim % 2 or hidden_dim <= 0 or hidden_dim % head_dim:
            raise ShapeMismatchError(f"head_dim {head_dim} must be even and divide hidden_dim {hidden_dim}",
                                     tensor="head_dim", expected=f"an even divisor of {hidden_dim}", actual=head_dim)
        self.hidden_dim, self.head_dim, self.eps = hidden_dim, head_dim, eps
        self.num_heads = hidden_dim // head_dim
        self.weight = nn.Parameter(torch.ones(hidden_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return fused_rmsnorm_rope(x, self.weight, cos, sin, self.eps, self.num_heads)

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, head_dim={self.head_dim}, eps={self.eps}"
