"""The eager backend: the generations' own blocks (``models/rwkv/v4.py`` … ``v7.py``) on torch ops.

Its ops are the compiled per-op kernels of ``rwkv_chat.models.kernels.dispatch`` (WKV-4/5/6/7, mm8 for i8
weights, gemvq for i4 and, on CUDA, f8) when the model was loaded with ``kernels=True`` (each dispatch function
falls back to torch where its kernel is not built), else the pure-torch paths (``models/rwkv/wkv.py``, the formats' own products).
Plain float matrices are ``x @ W`` either way. Every other backend keeps these ops for what it does not
serve itself.
"""

from __future__ import annotations

from rwkv_chat.models import formats
from rwkv_chat.models.backends.base import Backend, Ops
from rwkv_chat.models.rwkv import wkv


def eager_ops(compiled: bool) -> Ops:
    """The per-model ops of the eager blocks.

    Args:
        compiled: use the compiled kernels' dispatch functions (``kernels=True``), else pure torch.
    Returns:
        ``Ops`` (``wkv4``, ``wkv5``, ``wkv7``, ``matmul``; contracts in ``models/rwkv/wkv.py`` and
        ``models/formats``).
    """
    if not compiled:
        return Ops(wkv4=wkv.wkv4_torch, wkv5=wkv.wkv5_auto, wkv7=wkv.wkv7_auto, matmul=formats.matmul_with(None))
    from rwkv_chat.models.kernels import dispatch

    kernels = {f.packed_type: getattr(dispatch, f.kernel) for f in formats.FORMATS.values() if f.kernel}
    return Ops(wkv4=dispatch.wkv4, wkv5=dispatch.wkv5, wkv7=dispatch.wkv7, matmul=formats.matmul_with(kernels))


class Eager(Backend):
    """The generations' blocks on ``eager_ops(compiled)``; nothing replaced.

    Args:
        compiled: whether the ops use the compiled per-op kernels (the model's ``kernels`` argument).
        ops: ``eager_ops(compiled)`` already made (default: made here).
    """

    def __init__(self, compiled: bool, ops: Ops | None = None):
        super().__init__(ops if ops is not None else eager_ops(compiled))
        self.compiled = compiled
        self.name = "eager" if compiled else "torch"
        self.detail = ("torch ops, compiled WKV and weight-format kernels (mm8 for i8, gemvq for i4 and f8) where built"
                       if compiled
                       else "pure torch (kernels=False)")
