"""The RWKV engine: checkpoints, strategies, one module per generation, state, tokenizers, sampling.

Public names (drop-in for the ``rwkv`` pip package's ``RWKV``)::

    from rwkv_chat.models import RWKV, State
"""

from rwkv_chat.models.errors import (CheckpointError, DeviceError, RWKVError, ShapeMismatchError, StateError,  # noqa: F401
                     StrategyError, TokenError, TokenizerError, UnsupportedDtypeError)
from rwkv_chat.models.rwkv.model import RWKV  # noqa: F401
from rwkv_chat.models.state import State  # noqa: F401

__all__ = ["RWKV", "State", "RWKVError", "StrategyError", "CheckpointError", "DeviceError", "ShapeMismatchError",
           "UnsupportedDtypeError", "TokenError", "StateError", "TokenizerError"]
