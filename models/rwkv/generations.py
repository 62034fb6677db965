"""The RWKV generations: which module implements which version, and the contract every one follows.

A generation module (``v4``, ``v5`` for 5/5.1/5.2, ``v6``, ``v7``) defines:

* ``STATE_NAMES``: the names of one layer's state tensors, in order; ``FP32_STATE``: those kept in float32;
* ``layer_keys(spec, i)``: the checkpoint keys of block i and their shapes (validation);
* ``convert(name, tensor, spec) -> (name, tensor, kind)``: one block tensor brought to the layout the block
  reads; kind "matrix" (a weight [in, out], stored in the stage's weight format), "fp32" or "act";
* ``zero_state(spec, batch, device, atype, params)``: one layer's initial state;
* ``block(x, layer_state, params, ctx) -> (x, layer_state)``: one layer.

The block contract: ``x`` is the residual stream [B, T, C] in the layer's activation dtype and on its device,
in and out (one token, a sequence and a batch are the same call); ``layer_state`` is the tuple of this
layer's state tensors [B, ...] (``STATE_NAMES`` order), and a new tuple is returned (the given tensors are
not modified); ``params`` maps the layer's converted tensor names (without ``blocks.N.``) to tensors or
packed weights; ``ctx`` is a ``Context``. A block computes products with ``ctx.ops.matmul`` and the WKV
recurrences with ``ctx.ops.wkv4/wkv5/wkv7``, never through module globals; its time-mix and channel-mix
helpers are internal to the module.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from rwkv_chat.models.backends.base import Ops
    from rwkv_chat.models.rwkv.checkpoint import ModelSpec


@dataclass
class Context:
    """What a layer's block receives beside its own input, state and parameters (one per forward).

    Attributes:
        spec: the model's dimensions.
        ops: the model's operators (``ops.wkv4/wkv5/wkv7/matmul``, chosen by its backend).
        layer: the index of the layer being run (set by the layer loop).
        v_first: RWKV-7: the first layer's value [B, T, C], set by layer 0 and read by the later layers.
        tokens: int64 [B, T] token ids, for the layers that read them (RWKV-7 DeepEmbed).
    """

    spec: ModelSpec
    ops: Ops
    layer: int = 0
    v_first: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def module_for(version: str) -> ModuleType:
    """The generation module for a version string ("4", "5", "5.1", "5.2", "6", "7").

    Raises:
        CheckpointError: an unknown version.
    """
    if version == "4":
        from rwkv_chat.models.rwkv import v4 as m
    elif version in ("5", "5.1", "5.2"):
        from rwkv_chat.models.rwkv import v5 as m
    elif version == "6":
        from rwkv_chat.models.rwkv import v6 as m
    elif version == "7":
        from rwkv_chat.models.rwkv import v7 as m
    else:
        from rwkv_chat.models.errors import CheckpointError

        raise CheckpointError(f"unknown RWKV version {version!r}")
    return m
