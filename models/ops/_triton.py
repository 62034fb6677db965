"""Lazy access to Triton for the fused operators of ``rwkv_chat.models.ops``.

Triton is not a dependency of the package: torch's CUDA wheels bring it, CPU wheels do not. So no module
of ``models/ops`` imports ``triton`` at import time. Each op keeps its ``@triton.jit`` kernels in a private
module (``_<op>_kernels.py``, which imports triton at its top) and reaches it through ``kernels(name)``
after its inputs were validated; the kernels compile at their first launch on CUDA (Triton caches them
under its own cache dir).

    from rwkv_chat.models.ops import _triton
    k = _triton.kernels("rwkv_chat.models.ops._rmsnorm_rope_kernels", op="fused_rmsnorm_rope")
    k.rmsnorm_rope_kernel[grid](...)

Errors: ``DeviceError`` when Triton cannot run here (not installed, or no CUDA device), with what would
work instead in the message.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from types import ModuleType

import torch

from rwkv_chat.models.errors import DeviceError


def available() -> bool:
    """True when Triton imports and a CUDA device is visible (the ops can run)."""
    return _why_not() is None


def reason() -> str | None:
    """Why the Triton ops cannot run here (no CUDA device, or triton not importable), or None when they can."""
    return _why_not()


@functools.lru_cache(maxsize=1)
def _why_not() -> str | None:        # decided once per process: hot paths ask it on every call
    if not torch.cuda.is_available():
        return ("no CUDA device is available (torch " + torch.__version__ + "); the Triton ops run on CUDA "
                "only, use the plain torch path of the model on this machine")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return (f"Triton cannot be imported ({e}); install torch's CUDA wheel, which brings the matching "
                "triton, or use the plain torch path of the model")
    return None


def require(op: str) -> ModuleType:
    """The ``triton`` module, or ``DeviceError(tensor=None, expected="CUDA + triton", actual=<what is
    missing>)`` naming ``op`` (the public op's name) when Triton cannot run here."""
    why = _why_not()
    if why is not None:
        raise DeviceError(f"{op}: {why}", expected="CUDA + triton", actual=why.split(";")[0])
    import triton
    return triton


def kernels(module: str, op: str) -> ModuleType:
    """Import and return the kernel module ``module`` (absolute name) after ``require(op)``."""
    require(op)
    return importlib.import_module(module)


_SMS: dict[int, int] = {}


def multiprocessors(device: torch.device) -> int:
    """The multiprocessor count of a CUDA device (asked once per device): grids are sized to fill them."""
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def on(device: torch.device):
    """The context that makes ``device`` current for Triton launches (which take the current device and stream, not
    the tensors'): ``torch.cuda.device(device)`` on CUDA, nothing elsewhere (the interpreter's CPU tensors)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (>= 1): Triton block sizes must be powers of two."""
    return 1 << max(0, (int(n) - 1).bit_length())
