"""The base of every message of the rwkv-chat daemon protocol: :class:`Msg` (a msgspec struct tagged by its class
name in the field ``t``), :class:`TensorMeta` (one raw tensor frame) and :data:`SamplingSettings`.

Sampling settings travel as :data:`SamplingSettings`: fields of the engine's one sampling settings type
(``rwkv_chat.models.text.sampling.SamplerArgs``) by name, where a missing or None field falls back to the
conversation's setting, then to the config's ``[sampling]`` section, then to that type's defaults.
"""

from __future__ import annotations

from typing import Union

import msgspec


#: sampling settings by name (``temperature``, ``top_p``, ``top_k``, ``alpha_frequency``, ``alpha_presence``,
#: ``alpha_decay``, ``max_tokens``, ``seed``); None or missing = not given here
SamplingSettings = dict[str, Union[int, float, None]]


class Msg(msgspec.Struct, tag_field="t", tag=True, forbid_unknown_fields=True):
    """Base of every message."""


class TensorMeta(msgspec.Struct, forbid_unknown_fields=True):
    """Describes one raw frame carrying a tensor: name, dtype (torch name, e.g. "float32"), shape."""

    name: str
    dtype: str
    shape: list[int]
