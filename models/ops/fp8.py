"""FP8 (e4m3) quantization, GEMM and Linear: ``quantize_fp8``, ``fp8_gemm``, ``FP8Linear``.

True e4m3 (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, largest finite value 448, no inf),
never a uint8 linear code. Scales are float32 and multiply: ``x ≈ float(q) * scale``.

* ``quantize_fp8(x, scale=None, granularity="row")`` -> ``(q, scale)``: per row (per token for activations,
  per output channel for an [out, in] weight) or per tensor; ``scale = amax / 448``.
* ``fp8_gemm(a, b, a_scale=None, b_scale=None, output_dtype=torch.float16)``: ``(a_scale · a) @ (b_scale · b)``
  on the fp8 tensor cores (``torch._scaled_mm``: CUDA compute capability >= 8.9; also CPU), float32
  accumulation. Float inputs are quantized here (a per row, b per column).
* ``FP8Linear(in_features, out_features, bias=False)``: an ``nn.Module`` holding an e4m3 weight [out, in] with
  per-output-channel scales; up to ``gemv.GEMV_ROWS`` rows on CUDA a weight-only fp8 GEMV, more rows
  ``fp8_gemm`` with the activations quantized per token.

Errors (each with ``tensor``, ``expected``, ``actual``): ``UnsupportedDtypeError`` (dtypes), ``ShapeMismatchError``
(shapes; K and N must be multiples of 16 for the tensor cores), ``DeviceError`` (tensors on different devices, a
GPU below compute capability 8.9), ``NumericalOverflowError`` (non-finite inputs, or values beyond ±448 after a
given scale: never silently saturated).
"""

from __future__ import annotations

import math

import torch

from rwkv_chat.models.errors import DeviceError, NumericalOverflowError, ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats.f8 import E4M3_MAX, MIN_CAPABILITY, Float8Weight, quantize_f8
from rwkv_chat.models.ops._checks import FLOAT_DTYPES, check_dtype
from rwkv_chat.models.ops._checks import dtype_name as _name
from rwkv_chat.models.ops._triton import reason as triton_reason

FP8 = torch.float8_e4m3fn
OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FP16_ROWWISE_OK: dict[str, bool] = {}


def _check_device_fp8(t: torch.Tensor, name: str) -> None:
    if t.device.type == "cuda":
        cap = torch.cuda.get_device_capability(t.device)
        if cap < MIN_CAPABILITY:
            raise DeviceError(f"{name} is on {t.device} (compute capability {cap[0]}.{cap[1]}); fp8 needs >= "
                              f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}", tensor=name, expected=">= 8.9",
                              actual=f"{cap[0]}.{cap[1]}")
    elif t.device.type != "cpu":
        raise DeviceError(f"{name} is on {t.device}; fp8 runs on CUDA (>= 8.9) or the CPU", tensor=name,
                          expected="cuda | cpu", actual=str(t.device))


def _finite(t: torch.Tensor, name: str) -> None:
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise NumericalOverflowError(f"{name} holds {bad} non-finite value(s) of {t.numel()}", tensor=name,
                                     expected="finite", actual=f"{bad} non-finite of {t.numel()}")


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None, granularity: str = "row"):
    """Quantize a float tensor to e4m3.

    Args:
        x: float16/bfloat16/float32 [..., K] (at least 1-D).
        scale: float32 scale(s) to use (broadcastable to x: a scalar, or [..., 1] per row); default computed:
            ``amax / 448`` per row (``granularity="row"``) or over the tensor (``"tensor"``), 1 where amax is 0.
        granularity: "row" or "tensor" (only when ``scale`` is None).
    Returns:
        ``(q, scale)``: q float8_e4m3fn of x's shape (contiguous); scale float32 [..., 1] (row) or [] (tensor).
    Raises:
        UnsupportedDtypeError: x not float16/bfloat16/float32, scale not float32.
        ShapeMismatchError: x 0-D, a scale that does not broadcast to x, an unknown granularity.
        NumericalOverflowError: x not finite, a given scale not positive and finite, or |x / scale| > 448.
        DeviceError: x on a device without fp8 (CUDA below 8.9, mps, ...), a scale on another device.
    """
    check_dtype(x, "x", FLOAT_DTYPES)
    if x.dim() == 0:
        raise ShapeMismatchError("x must have at least one dimension", tensor="x", expected="[..., K]", actual=())
    if scale is None and granularity not in ("row", "tensor"):
        raise ShapeMismatchError(f"granularity must be 'row' or 'tensor', got {granularity!r}",
                                 tensor="granularity", expected="row | tensor", actual=granularity)
    if scale is not None:
        check_dtype(scale, "scale", (torch.float32,))
        try:
            torch.broadcast_shapes(scale.shape, x.shape)
        except RuntimeError:
            raise ShapeMismatchError(f"scale {tuple(scale.shape)} does not broadcast to x {tuple(x.shape)}",
                                     tensor="scale", expected=f"broadcastable to {tuple(x.shape)}",
                                     actual=tuple(scale.shape)) from None
        if scale.device != x.device:
            raise DeviceError(f"scale is on {scale.device}, x on {x.device}", tensor="scale",
                              expected=str(x.device), actual=str(scale.device))
    _check_device_fp8(x, "x")
    _finite(x, "x")
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(-1, keepdim=True) if granularity == "row" else xf.abs().amax()
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    else:
        if not bool(((scale > 0) & torch.isfinite(scale)).all()):
            raise NumericalOverflowError("scale must be positive and finite", tensor="scale",
                                         expected="> 0, finite", actual="non-positive or non-finite")
        peak = float((xf / scale).abs().max()) if xf.numel() else 0.0
        if peak > E4M3_MAX:
            raise NumericalOverflowError(f"x / scale reaches {peak:.4g}, beyond e4m3's largest value {E4M3_MAX:g}",
                                         tensor="x", expected=f"|x / scale| <= {E4M3_MAX:g}", actual=peak)
    q = (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8).contiguous()
    return q, scale.float()


def _operand(t, s, name: str, per_dim: int):
    """(fp8 tensor, float32 scale) of one GEMM operand; a float tensor is quantized along ``per_dim``."""
    if t.dtype == FP8:
        if s is None:
            s = torch.ones((), dtype=torch.float32, device=t.device)
        check_dtype(s, f"{name}_scale", (torch.float32,))
        return t, s
    check_dtype(t, name, (FP8,) + FLOAT_DTYPES)
    if s is not None:
        raise UnsupportedDtypeError(f"{name}_scale is given for a {_name(t.dtype)} {name}; a scale belongs to an "
                                    f"fp8 {name}", tensor=f"{name}_scale", expected="None", actual="tensor")
    _finite(t, name)
    tf = t.float()
    amax = tf.abs().amax(per_dim, keepdim=True)
    s = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (tf / s).clamp(-E4M3_MAX, E4M3_MAX).to(FP8), s


def _scaled_mm(a8, b8, sa, sb, out_dtype):
    """``torch._scaled_mm`` (a8 row-major [M, K], b8 column-major [K, N]) with tensor-wise or row-wise float32
    scales. Where a build refuses row-wise scales for this output dtype (some take bfloat16 only), a float16
    result is the bfloat16 product rounded again, a float32 one the product with unit scales scaled after."""
    rowwise = sa.numel() > 1 or sb.numel() > 1
    sa = sa.reshape(-1, 1) if rowwise else sa.reshape(())
    sb = sb.reshape(1, -1) if rowwise else sb.reshape(())
    if rowwise:
        sa = sa.expand(a8.shape[0], 1).contiguous()
        sb = sb.expand(1, b8.shape[1]).contiguous()
    key = f"{a8.device.type}-{out_dtype}"
    if not rowwise or _FP16_ROWWISE_OK.get(key, True):
        try:
            return torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=out_dtype)
        except RuntimeError:
            if not rowwise or out_dtype == torch.bfloat16:
                raise
            _FP16_ROWWISE_OK[key] = False
    if out_dtype == torch.float16:      # row-wise scales with a bfloat16 output only: one rounding more
        return torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16).to(out_dtype)
    one = torch.ones((), dtype=torch.float32, device=a8.device)
    y = torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * sa * sb).to(out_dtype)


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor | None = None,
             b_scale: torch.Tensor | None = None, output_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``(a_scale · a) @ (b_scale · b)`` on the fp8 tensor cores, float32 accumulation.

    Args:
        a: [M, K] float8_e4m3fn (or float16/bfloat16/float32: quantized per row here).
        b: [K, N] float8_e4m3fn (or float: quantized per column here); any strides (made column-major).
        a_scale: float32 scalar or [M, 1] (fp8 ``a`` only; default 1). b_scale: float32 scalar or [1, N] / [N].
        output_dtype: float16 (default), bfloat16 or float32.
    Returns: [M, N] in ``output_dtype``.
    Raises:
        UnsupportedDtypeError, ShapeMismatchError (not 2-D, K mismatch, K or N not a multiple of 16, scale
        shapes), DeviceError (different devices, CUDA below 8.9), NumericalOverflowError (non-finite float
        inputs).
    """
    check_dtype(a, "a", (FP8,) + FLOAT_DTYPES)
    check_dtype(b, "b", (FP8,) + FLOAT_DTYPES)
    if output_dtype not in OUTPUT_DTYPES:
        raise UnsupportedDtypeError(f"output_dtype {output_dtype} is not supported", tensor="output_dtype",
                                    expected=" | ".join(_name(d) for d in OUTPUT_DTYPES), actual=_name(output_dtype))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ShapeMismatchError(f"a {tuple(a.shape)} @ b {tuple(b.shape)} do not match", tensor="b",
                                 expected=(a.shape[-1], None), actual=tuple(b.shape))
    K, N = b.shape
    if K % 16 or N % 16:
        raise ShapeMismatchError(f"fp8 tensor cores need K and N multiples of 16, got K={K}, N={N}", tensor="b",
                                 expected="K % 16 == 0, N % 16 == 0", actual=(K, N))
    for name, s, want in (("a_scale", a_scale, (a.shape[0], 1)), ("b_scale", b_scale, (1, N))):
        if s is not None and isinstance(s, torch.Tensor) and s.numel() not in (1, math.prod(want)):
            raise ShapeMismatchError(f"{name} has shape {tuple(s.shape)}; expected a scalar or {want}", tensor=name,
                                     expected=want, actual=tuple(s.shape))
    if b.device != a.device:
        raise DeviceError(f"b is on {b.device}, a on {a.device}", tensor="b", expected=str(a.device),
                          actual=str(b.device))
    _check_device_fp8(a, "a")
    a8, sa = _operand(a, a_scale, "a", -1)
    b8, sb = _operand(b, b_scale, "b", 0)
    for name, s in (("a_scale", sa), ("b_scale", sb)):
        if s.device != a.device:
            raise DeviceError(f"{name} is on {s.device}, a on {a.device}", tensor=name, expected=str(a.device),
                              actual=str(s.device))
    a8 = a8.contiguous()
    b8 = b8 if b8.t().is_contiguous() else b8.t().contiguous().t()
    return _scaled_mm(a8, b8, sa.float(), sb.float(), output_dtype)


def fp8_linear(x: torch.Tensor, q: Float8Weight) -> torch.Tensor:
    """``x @ q.dequantize()`` with the activations quantized per token and the fp8 GEMM (no input checks: the
    dispatch product ``kernels.mmf8`` and ``FP8Linear`` check first). x [..., K] -> [..., N] in x's dtype."""
    K, N = q.shape
    x2 = x.reshape(-1, K)
    if x2.is_cuda and triton_reason() is None:     # one launch per call instead of five torch ops
        from rwkv_chat.models.ops.gemv import fp8_rows

        a8, sa = fp8_rows(x2 if x2.stride(-1) == 1 else x2.contiguous())
    else:
        xf = x2.float()
        amax = xf.abs().amax(-1, keepdim=True)
        sa = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        a8 = (xf / sa).clamp(-E4M3_MAX, E4M3_MAX).to(FP8)
    y = _scaled_mm(a8, q.w8.t(), sa, q.scale, x.dtype if x.dtype in OUTPUT_DTYPES else torch.float32)
    return y.reshape(*x.shape[:-1], N)


class FP8Linear(torch.nn.Module):
    """``y = x @ W.t() + bias`` with W an e4m3 [out_features, in_features] matrix and per-output-channel scales.

    Args:
        in_features, out_features: multiples of 16 (fp8 tensor cores).
        bias: learnable-shaped float32 bias [out_features] (initialised to zeros) when True.
        device: where the weight lives (default CPU). The weight starts as ``nn.Linear``'s initialisation
            quantized; ``from_linear`` or ``load_weight`` replace it.
    Buffers: ``weight`` float8_e4m3fn [out, in], ``weight_scale`` float32 [out]; parameter ``bias`` or None.
    ``module.to(device)`` moves them; ``module.half()`` would cast the e4m3 weight too (forward then refuses it).
    Raises (construction): ShapeMismatchError for sizes that are not positive multiples of 16.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        for name, n in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(n, int) or n <= 0 or n % 16:
                raise ShapeMismatchError(f"{name} must be a positive multiple of 16, got {n!r}", tensor=name,
                                         expected="multiple of 16", actual=n)
        self.in_features, self.out_features = in_features, out_features
        w = torch.empty(out_features, in_features, device=device)
        torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        q = quantize_f8(w.t())
        self.register_buffer("weight", q.w8)
        self.register_buffer("weight_scale", q.scale)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "FP8Linear":
        """An FP8Linear holding ``linear``'s weight (quantized per output channel) and bias."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        m.load_weight(linear.weight.detach())
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach().float())
        return m

    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight [out_features, in_features] into this module."""
        check_dtype(weight, "weight", FLOAT_DTYPES)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ShapeMismatchError(f"weight has shape {tuple(weight.shape)}", tensor="weight",
                                     expected=(self.out_features, self.in_features), actual=tuple(weight.shape))
        q = quantize_f8(weight.t())
        self.weight, self.weight_scale = q.w8, q.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] float16/bfloat16/float32 -> [..., out_features] in x's dtype.

        Raises: UnsupportedDtypeError, ShapeMismatchError, DeviceError (see the module docstring)."""
        check_dtype(x, "x", FLOAT_DTYPES)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeMismatchError(f"x has shape {tuple(x.shape)}", tensor="x", expected=(..., self.in_features),
                                     actual=tuple(x.shape))
        if x.device != self.weight.device:
            raise DeviceError(f"x is on {x.device}, the weight on {self.weight.device}", tensor="x",
                              expected=str(self.weight.device), actual=str(x.device))
        _check_device_fp8(x, "x")
        if self.weight.dtype != FP8:
            raise UnsupportedDtypeError(f"the weight was cast to {_name(self.weight.dtype)} (e.g. by module.half()); "
                                        "FP8Linear keeps it in float8_e4m3fn: call load_weight again",
                                        tensor="weight", expected="float8_e4m3fn", actual=_name(self.weight.dtype))
        from rwkv_chat.models.kernels.dispatch import mmf8

        y = mmf8(x, Float8Weight(self.weight, self.weight_scale))
        return y if self.bias is None else y + self.bias.to(y.dtype)
