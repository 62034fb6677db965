"""Input validation shared by the fused operators of ``rwkv_chat.models.ops``.

Every op validates its tensors before it launches anything, in this order, so that the error a caller
sees names the first real problem:

1. what the tensors are: ``check_dtype`` / ``check_same_dtype`` (``UnsupportedDtypeError``),
   ``check_shape`` / ``check_dim`` (``ShapeMismatchError``) — these also run on CPU tensors, so a bad
   call is reported as such even on a machine without CUDA;
2. where they are: ``check_cuda`` (``DeviceError``: not on CUDA, or not all on one device);
3. only where asked (an op's ``check_finite=True``): ``check_finite`` (``NumericalOverflowError``), which
   synchronises with the device, so no op calls it by default.

Each error carries ``tensor`` (the argument's name), ``expected`` and ``actual``: shapes as tuples (a
``None`` in an expected shape means "any size"), dtypes and devices as strings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rwkv_chat.models.errors import DeviceError, NumericalOverflowError, ShapeMismatchError, UnsupportedDtypeError

#: the dtypes of the activation ops (fp32 accumulation inside)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the dtypes of the tensor-core GEMMs
HALF_DTYPES = (torch.float16, torch.bfloat16)


def dtype_name(d: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: how the errors name a dtype."""
    return str(d).replace("torch.", "")


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return " | ".join(dtype_name(d) for d in dtypes)


def check_dtype(t, name: str, allowed: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    """Raise ``UnsupportedDtypeError(tensor=name, expected="float16 | ...", actual=...)`` unless ``t`` is a
    ``torch.Tensor`` whose dtype is in ``allowed`` (a non-tensor reports its Python type as ``actual``)."""
    if not isinstance(t, torch.Tensor):
        raise UnsupportedDtypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}",
                                    tensor=name, expected="torch.Tensor", actual=type(t).__name__)
    if t.dtype not in allowed:
        expected, actual = _names(allowed), str(t.dtype).replace("torch.", "")
        raise UnsupportedDtypeError(f"{name} has dtype {actual}; supported: {expected}",
                                    tensor=name, expected=expected, actual=actual)


def check_same_dtype(tensors: dict[str, torch.Tensor], reference: str) -> None:
    """Raise ``UnsupportedDtypeError`` naming the first tensor of ``tensors`` (name -> tensor) whose dtype
    differs from that of ``tensors[reference]``; ``expected`` is the reference's dtype."""
    want = tensors[reference].dtype
    for name, t in tensors.items():
        if t.dtype != want:
            expected, actual = str(want).replace("torch.", ""), str(t.dtype).replace("torch.", "")
            raise UnsupportedDtypeError(f"{name} has dtype {actual}; it must match {reference} ({expected})",
                                        tensor=name, expected=expected, actual=actual)


def check_shape(t: torch.Tensor, name: str, expected: Sequence[int | None]) -> None:
    """Raise ``ShapeMismatchError(tensor=name, expected=tuple(expected), actual=tuple(t.shape))`` unless ``t``
    has ``len(expected)`` dims and each size equals the expected one (``None`` matches any size)."""
    actual = tuple(t.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ShapeMismatchError(f"{name} has shape {actual}; expected {shown}",
                                 tensor=name, expected=tuple(expected), actual=actual)


def check_dim(t: torch.Tensor, name: str, ndims: Sequence[int]) -> None:
    """Raise ``ShapeMismatchError`` unless ``t.dim()`` is one of ``ndims`` (a tuple or a range); ``expected``
    is the text ``"N-D"`` (``"N-D | M-D"``, ``"N-D to M-D"``), ``actual`` the shape."""
    if t.dim() not in ndims:
        if isinstance(ndims, range):
            expected = f"{ndims.start}-D to {ndims.stop - 1}-D"
        else:
            expected = " | ".join(f"{n}-D" for n in ndims)
        raise ShapeMismatchError(f"{name} has shape {tuple(t.shape)}; expected a {expected} tensor",
                                 tensor=name, expected=expected, actual=tuple(t.shape))


def check_cuda(tensors: dict[str, torch.Tensor]) -> torch.device:
    """The one CUDA device every tensor of ``tensors`` (name -> tensor; a ``None`` value, an optional input
    left out, is skipped) is on.

    Raises ``DeviceError(tensor=name, expected="cuda", actual="cpu")`` for the first tensor not on CUDA
    (the message says what runs there instead: the plain torch path), or ``DeviceError(expected=<first
    tensor's device>)`` for one on another CUDA device.
    """
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise DeviceError(f"{name} is on {t.device}; this Triton op runs on CUDA only "
                              "(on other devices use the plain torch path of the model)",
                              tensor=name, expected="cuda", actual=str(t.device))
        if device is None:
            device = t.device
        elif t.device != device:
            raise DeviceError(f"{name} is on {t.device}; every input must be on {device}",
                              tensor=name, expected=str(device), actual=str(t.device))
    return device


def check_finite(t: torch.Tensor, name: str, dtype_hint: str = "") -> None:
    """Raise ``NumericalOverflowError(tensor=name, expected="finite", actual="N non-finite of M")`` if ``t``
    holds inf or NaN. Synchronises with the device (one reduction and a host read): call it only where a
    caller asked for the check."""
    bad = int((~torch.isfinite(t)).sum().item())
    if bad:
        hint = f" (beyond the range of {dtype_hint}?)" if dtype_hint else ""
        raise NumericalOverflowError(f"{name} holds {bad} non-finite value(s) of {t.numel()}{hint}",
                                     tensor=name, expected="finite", actual=f"{bad} non-finite of {t.numel()}")
