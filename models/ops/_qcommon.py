"""Small helpers shared by the quantized operators (``gemv``, ``fp8``, ``gptq``): typed input checks and lazy
Triton access.

Every check raises the typed errors of ``rwkv_chat.models.errors`` with ``tensor`` (the argument's name),
``expected`` and ``actual``. Triton is never imported at module import: ``triton_kernels(module, op)`` imports
a kernel module only after checking that CUDA and Triton are there, and raises ``DeviceError`` otherwise.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

from rwkv_chat.models.errors import DeviceError, ShapeMismatchError, UnsupportedDtypeError

HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _name(d) -> str:
    return str(d).replace("torch.", "")


def check_dtype(t, name: str, allowed=FLOAT_DTYPES) -> None:
    """UnsupportedDtypeError unless ``t`` is a tensor of one of ``allowed``."""
    if not isinstance(t, torch.Tensor):
        raise UnsupportedDtypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}", tensor=name,
                                    expected="torch.Tensor", actual=type(t).__name__)
    if t.dtype not in allowed:
        expected = " | ".join(_name(d) for d in allowed)
        raise UnsupportedDtypeError(f"{name} has dtype {_name(t.dtype)}; supported: {expected}", tensor=name,
                                    expected=expected, actual=_name(t.dtype))


def check_shape(t: torch.Tensor, name: str, expected) -> None:
    """ShapeMismatchError unless ``t`` has ``len(expected)`` dims of the expected sizes (None: any)."""
    actual = tuple(t.shape)
    if len(actual) != len(expected) or any(e is not None and e != a for e, a in zip(expected, actual)):
        shown = tuple("*" if e is None else e for e in expected)
        raise ShapeMismatchError(f"{name} has shape {actual}; expected {shown}", tensor=name,
                                 expected=tuple(expected), actual=actual)


def check_cuda(tensors: dict) -> torch.device:
    """The one CUDA device of every tensor (name -> tensor), else DeviceError naming the first one off it."""
    device = None
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise DeviceError(f"{name} is on {t.device}; this Triton op runs on CUDA only (elsewhere use the "
                              "plain torch path)", tensor=name, expected="cuda", actual=str(t.device))
        if device is None:
            device = t.device
        elif t.device != device:
            raise DeviceError(f"{name} is on {t.device}; every input must be on {device}", tensor=name,
                              expected=str(device), actual=str(t.device))
    return device


@functools.lru_cache(maxsize=1)
def triton_reason() -> str | None:
    """Why the Triton ops cannot run here, or None (decided once per process)."""
    if not torch.cuda.is_available():
        return f"no CUDA device is available (torch {torch.__version__}); the Triton ops run on CUDA only"
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError as e:
        return f"Triton cannot be imported ({e}); torch's CUDA wheels bring it"
    return None


def triton_kernels(module: str, op: str) -> ModuleType:
    """The kernel module ``module`` (absolute name), or DeviceError naming ``op`` when Triton cannot run."""
    why = triton_reason()
    if why is not None:
        raise DeviceError(f"{op}: {why}", expected="CUDA + triton", actual=why.split(";")[0])
    return importlib.import_module(module)
