"""Checkpoint headers: tensor names, shapes and dtypes without reading the weights (the dry-run plan).

``.safetensors``: the JSON header at the start of the file. ``.pth`` (a zip of a pickle and raw storages):
``torch.load(map_location="meta", weights_only=True)``, which builds ``meta`` tensors and reads no storage.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from rwkv_chat.models.errors import CheckpointError

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_META = torch.device("meta")


def safetensors_header(p: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as meta tensors, from its JSON header. Raises CheckpointError."""
    try:
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            head = json.loads(f.read(n))
        return {k: torch.empty(v["shape"], dtype=_ST_DTYPES[v["dtype"]], device=_META)
                for k, v in head.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"cannot read the safetensors header of {p}: {e}") from None


def read_header(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors as ``meta`` tensors (names, shapes, dtypes; no data read): ``.safetensors``
    from its JSON header, ``.pth`` through ``torch.load(map_location="meta", weights_only=True)``.

    Raises:
        CheckpointError: a missing, empty, unreadable or non-tensor file.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}" if not p.exists() else f"checkpoint is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {p}")
    if p.suffix == ".safetensors":
        return safetensors_header(p)
    last = None
    for mmap in (True, False):
        try:
            w = torch.load(str(p), map_location="meta", weights_only=True, mmap=mmap)
            break
        except Exception as e:  # the unpickler's errors on arbitrary bytes
            last = e
    else:
        raise CheckpointError(f"cannot read checkpoint {p}: {str(last).splitlines()[0] if last else '?'}")
    if not isinstance(w, dict) or not w or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                   for k, t in w.items()):
        raise CheckpointError(f"{p} does not hold a mapping of weight names to tensors")
    return w
