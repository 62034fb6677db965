"""The engine: checkpoints, strategies, one module per generation, state, tokenizers, sampling.

Public names::

    from rwkv_chat.models import RWKV, State          # drop-in for the ``rwkv`` pip package's ``RWKV``
    from rwkv_chat.models import Model, load_model    # the interface every model family implements
    from rwkv_chat.models import fitted_strategy      # a default strategy in a checkpoint's own weight format

The typed errors and ``Header`` (a checkpoint's tensor names and shapes from its header) import without
torch; ``RWKV``, ``State``, ``Model`` and ``load_model`` load the engine (and torch) on first use, so that light users of ``rwkv_chat.models.text`` (the UI, the protocol) stay light.
"""

from rwkv_chat.models.errors import (CheckpointError, ContextLimitError, DeviceError, NumericalOverflowError, RWKVError,  # noqa: F401
                                     ShapeMismatchError, StateError, StrategyError, TokenError, TokenizerError,
                                     UnsupportedDtypeError)

_LAZY = {"RWKV": "rwkv_chat.models.rwkv.model", "State": "rwkv_chat.models.state",
         "Model": "rwkv_chat.models.interface", "load_model": "rwkv_chat.models.interface",
         "Header": "rwkv_chat.models.header", "fitted_strategy": "rwkv_chat.models.plan"}

__all__ = ["RWKV", "State", "Model", "load_model", "Header", "fitted_strategy", "RWKVError", "StrategyError", "CheckpointError", "DeviceError",
           "ShapeMismatchError", "UnsupportedDtypeError", "TokenError", "StateError", "TokenizerError",
           "NumericalOverflowError", "ContextLimitError"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rwkv_chat.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
