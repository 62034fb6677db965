"""Weight formats: how a layer's matrices are stored (packed at load) and multiplied.

A format is chosen per strategy stage by its suffix (``cuda fp16`` -> ``""``, ``cuda fp16i8`` -> ``"i8"``) and
implements ``WeightFormat``. ``get(suffix)`` returns it; ``matmul_with(kernels)`` builds the product a model's
blocks call (``ctx.ops.matmul``), which picks the format by the type of the packed weight. Weights are
logically [N, M] (input × output) in every format; products take x [..., N] to [..., M].

Formats: ``fp`` (plain float matrices), ``i8`` (the reference's uint8 scheme), ``i4`` (int4 in the GPTQ
layout), ``f8`` (float8 e4m3 with per-output-channel scales). ``check_plan`` refuses, at load, a stage whose
device cannot run its format (``DeviceError`` naming the stage and what would work).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from rwkv_chat.models.errors import DeviceError, StrategyError
from rwkv_chat.models.formats import f8, fp, i4, i8

#: the product ``matmul(x, packed, output_dtype=None) -> Tensor`` a block calls, for every format
Matmul = Callable[..., torch.Tensor]


@runtime_checkable
class WeightFormat(Protocol):
    """One way of storing a weight matrix.

    Attributes:
        suffix: the strategy's quantization suffix that selects it ("" for plain float matrices).
        packed_type: the type ``pack`` returns (``matmul_with`` dispatches on it).
        kernel: the name of the dispatch function of ``rwkv_chat.models.kernels`` that serves the product with
            the compiled kernels (``kernel(x, packed) -> [..., M]`` in x's dtype, falling back to torch where not
            built), or None when ``matmul`` itself is the product of every backend.
    """

    suffix: str
    packed_type: type
    kernel: str | None

    def pack(self, weight: torch.Tensor, atype: torch.dtype, device: torch.device, stream: bool = False) -> Any:
        """A float weight [N, M] (input × output) stored for activations of ``atype`` on ``device``; with
        ``stream``, kept in (pinned) CPU memory for the device to copy at use."""

    def check_device(self, device: torch.device) -> str | None:
        """Why ``device`` cannot run this format (one line naming what would), or None when it can."""

    def matmul(self, x: torch.Tensor, packed: Any, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ W`` in pure torch: x [..., N] -> [..., M] in ``output_dtype`` (default: x's dtype)."""

    def nbytes(self, packed: Any) -> int:
        """Bytes the packed weight occupies (a decode step reads them all)."""


#: strategy suffix -> format
FORMATS: dict[str, WeightFormat] = {f.suffix: f for f in (fp.FORMAT, i8.FORMAT, i4.FORMAT, f8.FORMAT)}
#: suffixes of formats to come (refused until they are implemented)
PLANNED: tuple[str, ...] = ()


def check_plan(plan, devices) -> None:
    """Refuse a placement whose devices cannot run their stage's weight format.

    Args:
        plan: a ``strategy.Plan``; devices: the torch device of every layer (``plan.layers`` order).
    Raises:
        DeviceError: naming the stage, the device and what would work (e.g. ``f8`` on a GPU below compute
            capability 8.9).
    """
    seen = set()
    for place, device in zip(plan.layers, devices):
        key = (place.stage, str(device))
        if key in seen:
            continue
        seen.add(key)
        fmt = get(plan.stages[place.stage].quant)
        check = getattr(fmt, "check_device", None)
        why = check(device) if check is not None else None
        if why:
            stage = plan.stages[place.stage]
            raise DeviceError(f"stage {str(stage)!r} of strategy {plan.strategy!r}: {why}",
                              tensor=None, expected=stage.quant, actual=str(device))


def get(suffix: str | None) -> WeightFormat:
    """The format of a strategy suffix (None or "" for plain float matrices).

    Raises:
        StrategyError: an unknown or not yet supported suffix.
    """
    fmt = FORMATS.get(suffix or "")
    if fmt is None:
        known = ", ".join(repr(s) for s in FORMATS if s)
        later = f" ({suffix!r} is planned, not implemented yet)" if suffix in PLANNED else ""
        raise StrategyError(f"unknown weight format {suffix!r}{later}; supported: plain float and {known}")
    return fmt


def format_of(packed: Any) -> WeightFormat:
    """The format whose ``pack`` made ``packed``.

    Raises:
        TypeError: not a packed weight of any registered format.
    """
    for fmt in FORMATS.values():
        if isinstance(packed, fmt.packed_type):
            return fmt
    raise TypeError(f"{type(packed).__name__} is not a packed weight of any format ({', '.join(FORMATS)})")


def nbytes(packed: Any) -> int:
    """Bytes a packed weight of any format occupies."""
    return format_of(packed).nbytes(packed)


def matmul_with(kernels: dict[type, Callable] | None = None) -> Matmul:
    """The product a model's blocks call: ``matmul(x, w, output_dtype=None)``, x [..., N] and a packed weight
    [N, M] of any format -> [..., M] in ``output_dtype`` (default: x's dtype).

    Plain float matrices are ``x @ w``; a weight of another format goes to ``kernels[type(w)]`` where given
    (a compiled product such as ``rwkv_chat.models.kernels.mm8``), else to the format's pure-torch ``matmul``.
    """
    products = {fmt.packed_type: (kernels or {}).get(fmt.packed_type, fmt.matmul)
                for fmt in FORMATS.values() if fmt.packed_type is not torch.Tensor}

    def matmul(x: torch.Tensor, w, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        y = x @ w if isinstance(w, torch.Tensor) else products[type(w)](x, w)
        return y if output_dtype is None or y.dtype == output_dtype else y.to(output_dtype)

    return matmul
