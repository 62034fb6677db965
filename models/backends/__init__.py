"""Backends: what serves a model's blocks or whole steps, chosen per model at load.

``choose(model, kernels)`` picks one when ``RWKV`` loads; it is stored on the model (``model.backend``), named
in ``model.plan``'s printout, and never changes anything outside that model:

* ``fused-cpu`` (``fused_cpu.py``): every layer on the CPU in fp32 with fp32 / i8 / i4 / f8 weights: the whole model in
  one compiled C++ call per forward of up to ``fused_cpu.SEQ_TOKENS`` tokens and per decode step;
* ``fused-cuda`` (``fused_cuda.py``): RWKV-7 with layers on CUDA: fused layer kernels for prefill blocks and,
  all on one device, for the decode step;
* ``eager`` (``eager.py``): the generations' blocks on torch ops with the compiled per-op kernels, or
  ``torch`` (``kernels=False``): pure torch.

The fused backends keep the eager ops for whatever they do not serve.
"""

from __future__ import annotations

import torch

from rwkv_chat.models.backends.base import Backend, Ops
from rwkv_chat.models.backends.eager import Eager, eager_ops

__all__ = ["Backend", "Ops", "Eager", "FusedCpuBackend", "choose", "eager_ops"]


class FusedCpuBackend(Backend):
    """The whole model in one compiled C++ call (``fused_cpu.FusedCpu``) per forward of up to
    ``fused_cpu.SEQ_TOKENS`` tokens per row and per decode step; longer prompts (and states not in the fused
    layout) go through the eager blocks on ``ops``.

    Args:
        ops: the eager ops (compiled kernels).
        fused: the model's weights packed for the fused call.
    """

    name = "fused-cpu"
    decodes = True

    def __init__(self, ops: Ops, fused):
        super().__init__(ops)
        self.fused = fused
        from rwkv_chat.models.backends.fused_cpu import SEQ_TOKENS

        self.detail = f"one compiled C++ call per step, up to {SEQ_TOKENS} tokens; eager blocks beyond"

    def forward(self, model, ids: torch.Tensor, state, full_output: bool):
        """``fused.run`` where the fused call serves ``ids.shape[1]`` tokens (None: the layer loop)."""
        if self.fused.serves(ids.shape[1]):
            return self.fused.run(model, ids, state, full_output)
        return None

    def decode_step(self, model, ids: torch.Tensor, state: list[torch.Tensor], **options) -> torch.Tensor:
        """See ``Backend.decode_step``: the fused call with the slots' state updated in place (fp32 CPU)."""
        return self.fused(ids, state, state)[0][:, 0]


def choose(model, kernels: bool) -> Backend:
    """The backend serving ``model`` (an ``RWKV`` with its weights placed and, with ``kernels``, the compiled
    kernels of its devices built: ``model.kernels``).

    The fused CUDA backend (RWKV-7, the fused kernels built, a layer on CUDA) prepares its tensors here; the
    fused CPU backend packs the model where ``fused_cpu.reason(model)`` allows; ``model.fused_cpu_reason``
    says why it does not (None when it does). Never raises for a backend that cannot serve: the eager one
    does.
    """
    from rwkv_chat.models.backends import fused_cpu, fused_cuda

    ops = eager_ops(kernels)
    chosen: Backend | None = fused_cuda.FusedCuda.attach(model, ops) if kernels else None
    packed = fused_cpu.attach(model)
    if chosen is None and packed is not None:
        chosen = FusedCpuBackend(ops, packed)
    return chosen if chosen is not None else Eager(kernels, ops)
