"""Which module implements which RWKV generation."""

from __future__ import annotations

from types import ModuleType


def module_for(version: str) -> ModuleType:
    """The generation module for a version string ("4", "5", "5.1", "5.2", "6", "7")."""
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
