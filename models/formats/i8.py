"""The ``i8`` weight format: the reference's uint8 quantization and the matmul that consumes it.

``i8`` (ChatRWKV ``rwkv/model.py``, pip 0.8.32): a float weight ``W`` [N, M] (input × output)
is shifted by its row minima ``my`` [N, 1] and column minima ``mx`` [M], scaled by its column
maxima ``rx`` [M] and row maxima ``ry`` [N, 1], and stored as ``floor(W' · 256)`` clipped to
uint8. The product is ``x @ ((w + 0.5) · ry · rx + my + mx)`` with ``rx``, ``ry`` pre-divided by 16
(so ``(w + 0.5)/256 · rx·16 · ry·16`` in the reference's terms). Per-element error is at most
``rx·ry/256``-ish of the row/column range.

Layouts: the uint8 matrix is stored input-major [N, M] (the reference's; CPU kernels) or output-major
[M, N] (CUDA: the GEMV reads each output's N bytes contiguously); ``Int8Weight.output_major`` says
which, and ``Int8Weight.w`` is the logical [N, M] matrix in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rwkv_chat.models.errors import ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats.packed import PackedFormat


def prefers_output_major(device: torch.device | str | None) -> bool:
    """The layout the compiled mm8 kernels of a device read: output-major on CUDA, input-major elsewhere."""
    return device is not None and torch.device(device).type == "cuda"


@dataclass
class Int8Weight:
    """A weight quantized with the reference's min/max row+column uint8 scheme.

    ``w`` is always the logical uint8 [N, M] (input × output) matrix; ``output_major`` says how its
    bytes lie in memory:

    * ``False`` (input-major, the reference layout; CPU kernels): ``w`` is contiguous [N, M].
    * ``True`` (output-major; the CUDA GEMV, each output's N weights contiguous): ``w`` is the
      transposed view ``stored.t()`` of a contiguous [M, N] tensor, like nn.Linear's weight.

    ``storage`` gives the contiguous tensor itself. Values, ``shape``, ``dequantize`` and ``nbytes``
    do not depend on the layout. ``to(device)`` converts to the layout the target device's kernels
    read (``prefers_output_major``) unless ``output_major`` is given.

    Attributes:
        w: uint8 [N, M] (input × output), laid out as ``output_major`` says.
        mx, rx: activation dtype [M] (column offset and column scale / 16).
        my, ry: activation dtype [N, 1] (row offset and row scale / 16).
        output_major: the layout flag above.
    Raises (on construction):
        ShapeMismatchError: ``output_major`` and ``w`` is not the transposed view of a contiguous tensor.
    """

    w: torch.Tensor
    mx: torch.Tensor
    rx: torch.Tensor
    my: torch.Tensor
    ry: torch.Tensor
    output_major: bool = False

    def __post_init__(self):
        if self.output_major and isinstance(self.w, torch.Tensor) and not (
                self.w.dim() == 2 and self.w.t().is_contiguous()):
            raise ShapeMismatchError(f"an output-major i8 weight needs w = (contiguous [M, N]).t(), got shape "
                                     f"{tuple(self.w.shape)} strides {self.w.stride()}")

    @property
    def shape(self) -> torch.Size:
        """[N, M] (input × output) in either layout."""
        return self.w.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def storage(self) -> torch.Tensor:
        """The uint8 tensor as stored: [M, N] if ``output_major`` else [N, M] (contiguous when built here)."""
        return self.w.t() if self.output_major else self.w

    def _scales(self, fn) -> tuple:
        return tuple(fn(t) for t in (self.mx, self.rx, self.my, self.ry))

    def with_layout(self, output_major: bool) -> "Int8Weight":
        """The same weight in the given layout on its device (``self`` where it already is)."""
        if output_major == self.output_major:
            return self
        w = self.w.t().contiguous().t() if output_major else self.w.contiguous()
        return Int8Weight(w, self.mx, self.rx, self.my, self.ry, output_major)

    def to(self, device=None, non_blocking: bool = False, output_major: bool | None = None) -> "Int8Weight":
        """This weight on ``device`` (default: its own), in the layout ``output_major`` (default: the one
        ``prefers_output_major(device)`` names). The bytes move once; the layout changes on the CUDA side
        of the move (a transpose there is fast)."""
        target = torch.device(device) if device is not None else self.device
        layout = prefers_output_major(target) if output_major is None else output_major
        q = self.with_layout(layout) if self.device.type == "cuda" else self
        if target != q.device:
            stored = q.storage.to(device=target, non_blocking=non_blocking)
            q = Int8Weight(stored.t() if q.output_major else stored,
                           *q._scales(lambda t: t.to(device=target, non_blocking=non_blocking)), q.output_major)
        return q.with_layout(layout)

    def contiguous(self) -> "Int8Weight":
        """Every tensor contiguous in its layout (``w`` stays a transposed view when output-major)."""
        stored = self.storage.contiguous()
        return Int8Weight(stored.t() if self.output_major else stored, *self._scales(lambda t: t.contiguous()),
                          self.output_major)

    def pin_memory(self) -> "Int8Weight":
        """Page-locked copies (CPU), same layout."""
        stored = self.storage.contiguous().pin_memory()
        return Int8Weight(stored.t() if self.output_major else stored, *self._scales(lambda t: t.pin_memory()),
                          self.output_major)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float matrix [N, M] this weight stands for, in ``dtype`` (default: its activation dtype).

        ``(w + 0.5) · ry · rx + my + mx`` elementwise (the reference's i8 formula); for an output-major
        weight the result may be a transposed view of a contiguous [M, N] tensor (same values).
        """
        dtype = dtype or self.mx.dtype
        return ((self.w.to(dtype) + 0.5) * self.ry.to(dtype) * self.rx.to(dtype)
                + self.my.to(dtype) + self.mx.to(dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.mx, self.rx, self.my, self.ry))


def quantize_i8(weight: torch.Tensor, atype: torch.dtype, output_major: bool | None = None) -> Int8Weight:
    """Quantize a float weight [N, M] (input × output) exactly as the reference does.

    Args:
        weight: floating tensor [N, M] on any device.
        atype: the activation dtype the scales are stored in (fp16, bf16 or fp32).
        output_major: the layout of the result (see ``Int8Weight``); default: the one the weight's
            device reads (``prefers_output_major``: output-major on CUDA).
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
    if output_major is None:
        output_major = prefers_output_major(weight.device)
    q = q.t().contiguous().t() if output_major else q.contiguous()
    return Int8Weight(q, mx.to(atype).contiguous(), (rx / 16).to(atype).contiguous(),
                      my.to(atype).contiguous(), (ry / 16).to(atype).contiguous(), output_major)


def stack_i8(parts: list[Int8Weight]) -> list[Int8Weight] | None:
    """The same weights as views of one stack (per tensor: one [G, ...] allocation on their device, each part's
    bytes and scale vectors its g-th slice, the layout kept), so that one launch can multiply each by its own x
    (``kernels.gemmq.gemmq_u8_stack``: an RWKV-7 layer's r, k, v at decode batches); None where the parts differ in
    shape, layout, scale dtype or device, or are fewer than two. The parts' own tensors are not changed."""
    if len(parts) < 2:
        return None
    first = parts[0]
    if any(q.shape != first.shape or q.output_major != first.output_major
           or any(a.shape != b.shape or a.dtype != b.dtype
                  for a, b in zip(q._scales(lambda t: t), first._scales(lambda t: t)))
           or q.device != first.device for q in parts):
        return None
    stored = torch.stack([q.storage.contiguous() for q in parts])
    scales = [torch.stack([t.contiguous() for t in ts]) for ts in zip(*(q._scales(lambda t: t) for q in parts))]
    return [Int8Weight(stored[i].t() if first.output_major else stored[i], *(s[i] for s in scales),
                       first.output_major) for i in range(len(parts))]


def mm8_torch(x: torch.Tensor, q: Int8Weight) -> torch.Tensor:
    """``x @ dequantize(q)`` in pure torch, either layout. x: [..., N] -> [..., M], dtype of x."""
    return x @ q.dequantize(x.dtype)


class I8Format(PackedFormat):
    """The ``WeightFormat`` of the reference's uint8 scheme (strategy suffix ``i8``); ``matmul``: ``mm8_torch``
    (x [..., N] -> [..., M]); ``nbytes``: the uint8 matrix and its four scale vectors."""

    suffix = "i8"
    packed_type = Int8Weight
    #: the compiled product (``rwkv_chat.models.kernels.mm8``) where built: CPU and CUDA
    kernel = "mm8"
    torch_product = staticmethod(mm8_torch)

    def pack(self, weight: torch.Tensor, atype: torch.dtype, device: torch.device, stream: bool = False) -> Int8Weight:
        """``quantize_i8(weight, atype)`` (weight [N, M] input × output, float, any device) placed on ``device`` in
        the layout its kernels read (``prefers_output_major``), or, with ``stream``, kept in CPU memory (pinned
        where CUDA is available) in the layout of ``device``, for the layer's device to copy at use.

        Raises:
            ShapeMismatchError, UnsupportedDtypeError: see ``quantize_i8``.
        """
        q = quantize_i8(weight, atype)
        if stream:
            q = q.with_layout(prefers_output_major(device))
            return q.contiguous().pin_memory() if torch.cuda.is_available() else q.contiguous()
        return q.to(device).contiguous()


FORMAT = I8Format()
