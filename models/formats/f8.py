"""The ``f8`` weight format: float8 e4m3 (``torch.float8_e4m3fn``) weights with per-output-channel scales.

A float weight ``W`` [K, N] (input × output) is stored as ``w8`` e4m3fn [N, K] (output-major, the layout of
``nn.Linear`` and of ``torch._scaled_mm``'s column-major second operand; ``Float8Weight.w`` is the logical
[K, N] view) and ``scale`` float32 [N]: ``scale[n] = max_k |W[k, n]| / 448`` (448 = the largest finite e4m3fn
value; 1 for an all-zero column) and ``w8[n, k] = e4m3(W[k, n] / scale[n])``, rounded to nearest even (torch's
cast) after clamping to ±448. Dequantized: ``W'[k, n] = float(w8[n, k]) * scale[n]``.

Products:

* CUDA, compute capability >= 8.9 (Ada, Hopper): 1..4 rows, the compiled weight-only GEMV of ``csrc/gemvq``
  where it is built (reads ``w8`` [N, K] as stored; e4m3 converted in registers; fp16 activations: each chunk
  of 16 products summed in half precision with x scaled by a power of two, then fp32, else fp32 throughout; the
  scale applied per output), else up to ``rwkv_chat.models.ops.gemv.GEMV_ROWS`` rows a weight-only Triton GEMV (the
  same arithmetic); more rows, the fp8 tensor cores through ``torch._scaled_mm`` with the activations
  quantized per token (``rwkv_chat.models.ops.fp8``). The format's ``kernel`` is
  ``rwkv_chat.models.kernels.mmf8``.
* CPU: an emulation without fp8 arithmetic: up to ``rwkv_chat.models.kernels.dispatch.F8_CPU_ROWS`` rows the
  compiled product of ``csrc/gemvq/gemvq_cpu.cpp`` (reads ``w8`` as stored, each e4m3 byte made float32 exactly in
  registers, float32 sums, the scale applied per output; also inside the fused CPU call; the e4m3 subnormals pass
  through float32 subnormals, so a thread that flushes denormals, ``torch.set_flush_denormal(True)``, reads them
  as 0), more rows the e4m3
  values converted exactly to float32 and scaled and the product in the activation dtype (``matmul``). The plan
  calls it "f8 (emulated)".
* Other devices (CUDA below 8.9, mps, dml): refused (``check_device``; ``DeviceError`` at load naming the stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rwkv_chat.models.errors import ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats.packed import PackedFormat, place

E4M3_MAX = 448.0
#: CUDA compute capability the fp8 products need (e4m3 tensor cores and conversions: Ada sm_89, Hopper sm_90)
MIN_CAPABILITY = (8, 9)


@dataclass
class Float8Weight:
    """An e4m3fn weight with per-output-channel float32 scales.

    Attributes:
        w8: float8_e4m3fn [N, K]: contiguous (output-major, what loads and the GEMVs and ``torch._scaled_mm``
            read), or the transposed view of a contiguous [K, N] (``input_major``: each input's N weights
            contiguous, the layout the fused CUDA backend gives RWKV channel-mix value matrices so that a decode
            step can skip their rows). scale: float32 [N].
    """

    w8: torch.Tensor
    scale: torch.Tensor

    @property
    def w(self) -> torch.Tensor:
        """The logical e4m3fn [K, N] matrix (a transposed view)."""
        return self.w8.t()

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.w8.shape[1], self.w8.shape[0]))

    @property
    def input_major(self) -> bool:
        """Whether ``w8`` is held input-major (the transposed view of a contiguous [K, N])."""
        return not self.w8.is_contiguous() and self.w8.t().is_contiguous()

    def with_layout(self, input_major: bool) -> "Float8Weight":
        """The same weight held input-major or output-major on its device (``self`` where it already is)."""
        if input_major == self.input_major and (input_major or self.w8.is_contiguous()):
            return self
        w8 = self.w8.t().contiguous().t() if input_major else self.w8.contiguous()
        return Float8Weight(w8, self.scale)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn

    @property
    def device(self) -> torch.device:
        return self.w8.device

    def to(self, device=None, non_blocking: bool = False) -> "Float8Weight":
        return Float8Weight(self.w8.to(device=device, non_blocking=non_blocking),
                            self.scale.to(device=device, non_blocking=non_blocking))

    def contiguous(self) -> "Float8Weight":
        return Float8Weight(self.w8.contiguous(), self.scale.contiguous())

    def pin_memory(self) -> "Float8Weight":
        return Float8Weight(self.w8.pin_memory(), self.scale.pin_memory())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix [K, N]: ``float32(w8) * scale`` per column (exact e4m3 values), rounded once to
        ``dtype``; a transposed view of a contiguous [N, K] tensor in either layout (so products do not depend on it)."""
        return (self.w8.float().contiguous() * self.scale.unsqueeze(1)).to(dtype).t()

    def nbytes(self) -> int:
        return self.w8.numel() + self.scale.numel() * 4


def quantize_f8(weight: torch.Tensor) -> Float8Weight:
    """Quantize a float weight [K, N] (input × output) to e4m3fn with per-output-channel scales.

    Raises: ShapeMismatchError (not 2-D), UnsupportedDtypeError (not floating point).
    """
    if weight.dim() != 2:
        raise ShapeMismatchError(f"f8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}",
                                 tensor="weight", expected="[K, N]", actual=tuple(weight.shape))
    if not weight.is_floating_point():
        raise UnsupportedDtypeError(f"f8 quantization needs a float weight, got {weight.dtype}",
                                    tensor="weight", expected="floating point", actual=str(weight.dtype))
    wt = weight.float().t()                                            # [N, K]
    amax = wt.abs().amax(1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    w8 = (wt / scale.unsqueeze(1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).contiguous()
    return Float8Weight(w8, scale.contiguous())


def mmf8_torch(x: torch.Tensor, q: Float8Weight) -> torch.Tensor:
    """The exact emulation: ``x @ q.dequantize(x.dtype)``; x [..., K] -> [..., N] in x's dtype."""
    return x @ q.dequantize(x.dtype)


def capability_reason(device: torch.device) -> str | None:
    """Why ``device`` cannot run f8 weights, or None (CPU: the emulation; CUDA >= 8.9: the fp8 kernels)."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap >= MIN_CAPABILITY:
            return None
        name = torch.cuda.get_device_name(device)
        return (f"f8 needs CUDA compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Ada, Hopper); "
                f"{device} ({name}) is {cap[0]}.{cap[1]}: use i8 or i4 there (e.g. fp16i8)")
    return f"f8 runs on CUDA (compute capability >= 8.9) and, emulated, on the CPU; not on {device.type}: use i8 or i4"


class F8Format(PackedFormat):
    """The ``WeightFormat`` of e4m3 weights (strategy suffix ``f8``); ``matmul``: the exact emulation
    ``mmf8_torch``; ``nbytes``: the e4m3 matrix (one per weight) and its float32 scales."""

    suffix = "f8"
    packed_type = Float8Weight
    #: the dispatch product (``rwkv_chat.models.kernels.mmf8``): GEMV / ``_scaled_mm`` on CUDA
    kernel = "mmf8"
    torch_product = staticmethod(mmf8_torch)

    def check_device(self, device: torch.device) -> str | None:
        """See ``capability_reason``."""
        return capability_reason(device)

    def pack(self, weight: torch.Tensor, atype: torch.dtype, device: torch.device, stream: bool = False) -> Float8Weight:
        """``quantize_f8(weight)`` on ``device`` (or, with ``stream``, in CPU memory, pinned where CUDA is)."""
        src = weight.to(device) if torch.device(device).type == "cuda" and not stream else weight
        return place(quantize_f8(src), device, stream)


FORMAT = F8Format()
