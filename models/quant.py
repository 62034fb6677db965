"""Weight quantization: the reference's ``i8`` scheme and the matmul that consumes it.

``i8`` (ChatRWKV ``rwkv/model.py``, pip 0.8.32): a float weight ``W`` [N, M] (input × output)
is shifted by its row minima ``my`` [N, 1] and column minima ``mx`` [M], scaled by its column
maxima ``rx`` [M] and row maxima ``ry`` [N, 1], and stored as ``floor(W' · 256)`` clipped to
uint8. The product is ``x @ ((w + 0.5) · ry · rx + my + mx)`` with ``rx``, ``ry`` pre-divided by 16
(so ``(w + 0.5)/256 · rx·16 · ry·16`` in the reference's terms). Per-element error is at most
``rx·ry/256``-ish of the row/column range, see ``Int8Weight.max_abs_error``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShapeMismatchError, UnsupportedDtypeError


@dataclass
class Int8Weight:
    """A weight quantized with the reference's min/max row+column uint8 scheme.

    Attributes:
        w: uint8 [N, M] (input × output).
        mx, rx: activation dtype [M] (column offset and column scale / 16).
        my, ry: activation dtype [N, 1] (row offset and row scale / 16).
    """

    w: torch.Tensor
    mx: torch.Tensor
    rx: torch.Tensor
    my: torch.Tensor
    ry: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return self.w.device

    def to(self, device=None, non_blocking: bool = False) -> "Int8Weight":
        return Int8Weight(*(t.to(device=device, non_blocking=non_blocking)
                            for t in (self.w, self.mx, self.rx, self.my, self.ry)))

    def contiguous(self) -> "Int8Weight":
        return Int8Weight(*(t.contiguous() for t in (self.w, self.mx, self.rx, self.my, self.ry)))

    def pin_memory(self) -> "Int8Weight":
        return Int8Weight(*(t.pin_memory() for t in (self.w, self.mx, self.rx, self.my, self.ry)))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float matrix [N, M] this weight stands for, in ``dtype`` (default: its activation dtype)."""
        dtype = dtype or self.mx.dtype
        return ((self.w.to(dtype) + 0.5) * self.ry.to(dtype) * self.rx.to(dtype)
                + self.my.to(dtype) + self.mx.to(dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.mx, self.rx, self.my, self.ry))


def quantize_i8(weight: torch.Tensor, atype: torch.dtype) -> Int8Weight:
    """Quantize a float weight [N, M] (input × output) exactly as the reference does.

    Args:
        weight: floating tensor [N, M] on any device.
        atype: the activation dtype the scales are stored in (fp16, bf16 or fp32).
    Returns:
        An ``Int8Weight`` on the weight's device.
    Raises:
        ShapeMismatchError: the weight is not 2-D.
        UnsupportedDtypeError: the weight is not floating point.
    """
    if weight.dim() != 2:
        raise ShapeMismatchError(f"i8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise UnsupportedDtypeError(f"i8 quantization needs a float weight, got {weight.dtype}")
    w = weight.float()
    # The reference subtracts along the longer axis first; the order changes the rounding.
    if w.shape[0] > w.shape[1]:
        my = torch.amin(w, dim=1).unsqueeze(1)
        w = w - my
        mx = torch.amin(w, dim=0)
        w = w - mx
    else:
        mx = torch.amin(w, dim=0)
        w = w - mx
        my = torch.amin(w, dim=1).unsqueeze(1)
        w = w - my
    # A constant column/row has range 0: scale it by 1 instead of 0 (the reference divides by 0 -> NaN).
    rx = torch.amax(w, dim=0)
    rx = torch.where(rx > 0, rx, torch.ones_like(rx))
    w = w / rx
    ry = torch.amax(w, dim=1).unsqueeze(1)
    ry = torch.where(ry > 0, ry, torch.ones_like(ry))
    w = w / ry
    q = torch.clip(torch.floor(w * 256), min=0, max=255).to(torch.uint8)
    return Int8Weight(q.contiguous(), mx.to(atype).contiguous(), (rx / 16).to(atype).contiguous(),
                      my.to(atype).contiguous(), (ry / 16).to(atype).contiguous())


def mm8_torch(x: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """``x @ dequantize(q)`` in pure torch. x: [..., N] -> [..., M], dtype of x."""
    return x @ q.dequantize(x.dtype)


# Rebound to the compiled mm8 kernels by ``rwkv_chat.models.kernels`` where they are built.
mm8 = mm8_torch


def matmul(x: torch.Tensor, w, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ w`` for a float weight [N, M] or an ``Int8Weight``; x: [..., N] -> [..., M].

    The result is cast to ``output_dtype`` (default: x's dtype).
    """
    if isinstance(w, Int8Weight):
        y = mm8(x, w)
    else:
        y = x @ w
    return y if output_dtype is None or y.dtype == output_dtype else y.to(output_dtype)
