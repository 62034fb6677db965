"""Plain float weights: a matrix stored in the activation dtype (fp32, fp16, bf16), multiplied with ``x @ W``.

The strategy's stages without a quantization suffix (``cuda fp16``, ``cpu fp32``) use this format. A packed
weight is a ``torch.Tensor`` [N, M] (input × output) on its device, or pinned in CPU memory for a streamed
layer (copied to the device at use).
"""

from __future__ import annotations

import torch


class FloatFormat:
    """The ``WeightFormat`` of plain float matrices (strategy suffix ``""``)."""

    suffix = ""
    packed_type = torch.Tensor
    #: served by ``x @ W`` (torch.matmul: cuBLAS, oneDNN/MKL) in every backend
    kernel = None

    def pack(self, weight: torch.Tensor, atype: torch.dtype, device: torch.device, stream: bool = False) -> torch.Tensor:
        """``weight`` [N, M] (input × output, any float dtype and device) in ``atype``: contiguous on ``device``,
        or, with ``stream``, contiguous in CPU memory (pinned where CUDA is available) for the layer's
        device to copy at use."""
        t = weight.to(atype)
        if stream:
            return t.contiguous().pin_memory() if torch.cuda.is_available() else t.contiguous()
        return t.to(device).contiguous()

    def check_device(self, device: torch.device) -> str | None:
        """Every device runs this format (None)."""
        return None

    def matmul(self, x: torch.Tensor, w: torch.Tensor, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ w``; x [..., N] of w's dtype and device -> [..., M] in ``output_dtype`` (default: x's dtype)."""
        y = x @ w
        return y if output_dtype is None or y.dtype == output_dtype else y.to(output_dtype)

    def nbytes(self, w: torch.Tensor) -> int:
        """Bytes of the stored matrix."""
        return w.numel() * w.element_size()


FORMAT = FloatFormat()
