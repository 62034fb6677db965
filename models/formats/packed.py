"""What the packed weight formats (``i8``, ``i4``, ``f8``) share: the ``WeightFormat`` methods that only
differ by the format's pure-torch product, and where a packed weight is put (``place``)."""

from __future__ import annotations

from typing import Any, Callable

import torch


def place(q: Any, device: torch.device, stream: bool) -> Any:
    """A packed weight ``q`` contiguous on ``device``, or, with ``stream``, contiguous in CPU memory (pinned where
    CUDA is available, for the layer's device to copy at use)."""
    if stream:
        q = q.to("cpu").contiguous()
        return q.pin_memory() if torch.cuda.is_available() else q
    return q.to(device).contiguous()


class PackedFormat:
    """Base of a packed ``WeightFormat``: ``torch_product(x, q)`` (the format's pure-torch ``x @ dequantize``,
    x [..., K] -> [..., N] in x's dtype) gives ``matmul``; ``nbytes`` is the packed weight's own count;
    every device runs the format unless a subclass's ``check_device`` says otherwise."""

    torch_product: Callable[[torch.Tensor, Any], torch.Tensor]

    def check_device(self, device: torch.device) -> str | None:
        """Why ``device`` cannot run this format, or None (every device runs the torch product)."""
        return None

    def matmul(self, x: torch.Tensor, q: Any, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``torch_product(x, q)``: x [..., K] -> [..., N] in ``output_dtype`` (default: x's dtype)."""
        y = type(self).torch_product(x, q)
        return y if output_dtype is None or y.dtype == output_dtype else y.to(output_dtype)

    def nbytes(self, q: Any) -> int:
        """Bytes of the packed weight's tensors (``q.nbytes()``)."""
        return q.nbytes()
