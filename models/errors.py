"""Typed errors of the RWKV engine.

Every user-facing failure of ``rwkv_chat.models`` raises one of these, never ``assert``.
They subclass the builtin exception a caller would naturally catch (``ValueError`` for bad
arguments, ``RuntimeError`` for environment problems), so code written against the ``rwkv``
pip package, which raises plain ``ValueError``/``AssertionError``, keeps working when it
catches ``ValueError``.
"""

from __future__ import annotations


class RWKVError(Exception):
    """Base class of every engine error.

    Errors about one tensor (the fused operators of ``rwkv_chat.models.ops``, weight formats) carry what was
    expected and what was found: ``tensor`` (its name), ``expected`` and ``actual`` (shapes, dtypes, devices or
    values, as given), all None when not about one tensor.
    """

    def __init__(self, message: str = "", *, tensor: str | None = None, expected=None, actual=None):
        super().__init__(message)
        self.tensor, self.expected, self.actual = tensor, expected, actual


class StrategyError(RWKVError, ValueError):
    """A strategy string is malformed or asks for something impossible.

    The message quotes the offending part of the strategy.
    """


class CheckpointError(RWKVError, ValueError):
    """A checkpoint file is missing, truncated, corrupt, unsafe, or has unknown/missing keys,
    wrong shapes, or non-finite weights."""


class DeviceError(RWKVError, RuntimeError):
    """A device named in a strategy (or a tensor's device) is unavailable or wrong for the op."""


class ShapeMismatchError(RWKVError, ValueError):
    """A tensor (input, weight or state) has a shape other than the one required."""


class UnsupportedDtypeError(RWKVError, TypeError):
    """A tensor or strategy asks for a dtype the op does not support."""


class NumericalOverflowError(RWKVError, ArithmeticError):
    """A result (or an input that must be finite) holds inf or NaN, e.g. a value beyond the range of fp16 or
    fp8 e4m3 (448) after scaling."""


class TokenError(RWKVError, ValueError):
    """Tokens are empty, not integers, or outside the model's vocabulary."""


class StateError(RWKVError, ValueError):
    """A recurrent state does not belong to this model (fingerprint, version or shapes differ),
    or a state file is corrupt."""


class ContextLimitError(StateError):
    """A conversation would grow past the model's context limit (``model.context_limit`` tokens; a transformer's
    KV cache). Attributes ``limit`` and ``needed`` (tokens)."""

    def __init__(self, message: str = "", *, limit: int = 0, needed: int = 0):
        super().__init__(message, expected=limit, actual=needed)
        self.limit, self.needed = limit, needed


class TokenizerError(RWKVError, ValueError):
    """A tokenizer cannot be found, loaded, or does not fit the model's vocabulary."""
