"""What every backend offers the model and its batched decoder.

A backend is chosen per model at load (``rwkv_chat.models.backends.choose``) and stored on it
(``model.backend``). It carries the ops the generations' blocks call (``Ops``: ``ctx.ops.wkv7(...)``,
``ctx.ops.matmul(...)``) and may replace, behind the model, a block for some layers and inputs
(``sequence_block``), a whole forward (``forward``) or a whole one-token decode step (``decode_step``). The
layer loop itself always stays in the model (``RWKV.run_layers``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Ops:
    """The operators a block calls (``ctx.ops``); contracts of the pure-torch forms:

    Attributes:
        wkv4: ``wkv.wkv4_torch``: (w, u float32 [C]; k, v [B, T, C]; aa, bb, pp float32 [B, C]) ->
            (y [B, T, C], aa, bb, pp).
        wkv5: ``wkv.wkv5_torch`` (RWKV-5.x, and RWKV-6 with a per-token decay): (r, k, v [B, T, H, N], w, u,
            s float32 [B, H, N, N]) -> (y [B, T, H, N], s).
        wkv7: ``wkv.wkv7_torch``: (r, w, k, v, a, b [B, T, H, N], s float32 [B, H, N, N]) -> (y float32, s).
        matmul: ``formats.matmul_with``'s product: (x [..., N], packed weight [N, M] of any format,
            output_dtype=None) -> [..., M] in output_dtype (default: x's dtype).
    """

    wkv4: Callable
    wkv5: Callable
    wkv7: Callable
    matmul: Callable


class Backend:
    """The base of every backend: the generations' blocks on ``ops``, nothing replaced.

    Attributes:
        name: short name shown in ``model.plan`` and by ``rwkv-chat doctor`` ("eager", "torch", "fused-cuda",
            "fused-cpu").
        detail: one line saying what serves the model.
        ops: the ``Ops`` the blocks call.
        decodes: ``decode_step`` serves the batched decoder's one-token steps.
        decode_on_device: that step runs on a CUDA device, to be captured in the decoder's CUDA graphs (else
            it is a host call, run outside graphs).
        captures_prefill: the model keeps CUDA graphs of its prefill per prompt shape
            (``models/rwkv/prefill_graph.py``).
    """

    name = "eager"
    detail = ""
    decodes = False
    decode_on_device = False
    captures_prefill = False

    def __init__(self, ops: Ops):
        self.ops = ops

    def sequence_block(self, layer: int, x: torch.Tensor, params: dict) -> Callable | None:
        """A block (the generations' contract: ``block(x, layer_state, params, ctx) -> (x, layer_state)``)
        replacing the generation's own for ``layer`` on the input ``x`` [B, T, C] with T > 1 (already on the
        layer's device and dtype), or None: the generation's block serves it."""
        return None

    def forward(self, model, ids: torch.Tensor, state, full_output: bool):
        """The whole forward of ``model`` for ids int64 [B, T] from ``state`` (a State of batch B):
        ``(logits float32 [B, T or 1, vocab], new State)``, or None: the model's layer loop serves it."""
        return None

    def decode_step(self, model, ids: torch.Tensor, state: list[torch.Tensor], **options) -> torch.Tensor:
        """One token per row through the whole model (only where ``decodes``).

        Args:
            model: the model this backend was chosen for.
            ids: int64 [b, 1] token ids on the model's first device.
            state: the flat list of per-layer state tensors (layer-major, in the generation's ``STATE_NAMES``
                order), views of the decoder's slots [b, ...], updated in place.
            options: backend-specific choices (see the backend).
        Returns:
            logits float32 [b, vocab].
        """
        raise NotImplementedError(f"the {self.name} backend has no decode step")

    def __str__(self) -> str:
        return f"{self.name} ({self.detail})" if self.detail else self.name
