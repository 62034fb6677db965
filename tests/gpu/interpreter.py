"""What every ``interpret_*.py`` script shares: Triton's interpreter switched on before Triton is imported (the
kernels then run in numpy on CPU tensors), the repository importable, the relative error the scripts report, and
the ops' CUDA checks bypassed (the interpreter takes CPU tensors). Import it first::

    import interpreter  # noqa: F401  (sets TRITON_INTERPRET before anything imports triton)
"""

import importlib
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"      # Triton's own switch, read at its import: the kernels run in numpy
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b's norm floored at 1e-30)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bypass_device_checks() -> None:
    """The ops' wrappers take CPU tensors: their CUDA check passes and their kernel modules import directly."""
    from rwkv_chat.models.ops import _checks, _triton

    _checks.check_cuda = lambda tensors: None
    _triton.kernels = lambda module, op: importlib.import_module(module)
