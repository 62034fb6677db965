"""Checkpoint headers: tensor names, shapes and dtypes without reading the weights.

The one home of header reading, for the dry-run planner, the loaders and the daemon's model facts:

- torch-free (this module imports no torch; the daemon reaches it as ``rwkv_chat.models.Header``):
  :func:`safetensors_json` (the 8-byte length and the JSON header of a ``.safetensors`` file),
  :func:`pth_shapes` (the ``data.pkl`` of a torch ``.pth`` zip unpickled with stand-ins for torch's tensor
  rebuild functions: key names and shapes come out, no code of the file runs), :func:`rwkv_version` and
  :class:`Header`;
- with torch (imported on call): :func:`read_header` / :func:`safetensors_header`, the tensors as ``meta``
  tensors (``.pth`` through ``torch.load(map_location="meta", weights_only=True)``, which reads no storage).

The RWKV generation follows ChatRWKV ``rwkv/model.py`` (pip 0.8.32) plus RWKV-7: 4; 5 (``ln_x``); 5.1
(``gate``); 5.2 (2-D ``time_decay``); 6 (``time_maa_*``); 7 (``att.r_k`` / ``att.x_r``).
Errors: :class:`~rwkv_chat.models.errors.CheckpointError`, its message naming the file.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from rwkv_chat.models.errors import CheckpointError

#: bytes of a safetensors JSON header read at most (real headers of 7B models are under 1 MiB)
MAX_HEADER = 100 << 20


def safetensors_json(path: Path) -> tuple[dict, int]:
    """``(header, n)``: the JSON header of a ``.safetensors`` file (a dict, ``__metadata__`` included) and its
    length ``n`` in bytes (the data starts at byte ``8 + n``).

    Raises:
        CheckpointError: unreadable; shorter than 8 bytes ("truncated"); a header length under 2, over
            ``MAX_HEADER`` or past the end of the file ("not a safetensors file or truncated"); not JSON; not a
            JSON object; a tensor whose data would end past the end of the file ("truncated", naming it).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if not 2 <= n <= min(size - 8, MAX_HEADER):
                raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {n} bytes)")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: cannot read the safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not an object")
    data = size - 8 - n
    for key, info in header.items():
        offs = info.get("data_offsets") if key != "__metadata__" and isinstance(info, dict) else None
        if isinstance(offs, list) and len(offs) == 2 and isinstance(offs[1], int) and offs[1] > data:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} needs bytes up to {offs[1]:,} of the data, "
                                  f"the file holds {data:,}")
    return header, n


class _Tensor:
    """Stand-in for a tensor in a ``.pth`` pickle: its shape only."""

    def __init__(self, shape):
        self.shape = list(shape)


def _rebuild_tensor(storage, offset, size, *rest):
    return _Tensor(size)


def _rebuild_parameter(data, *rest):
    return data


class _Unpickler(pickle.Unpickler):
    """Unpickles a torch state dict into name -> :class:`_Tensor`; any other global is refused."""

    ALLOWED = {("collections", "OrderedDict"): OrderedDict,
               ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
               ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
               ("torch._utils", "_rebuild_parameter"): _rebuild_parameter}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return name                       # the storage's dtype, by name
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a checkpoint")

    def persistent_load(self, pid):
        return pid


def pth_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a torch ``.pth`` zip checkpoint (its ``data.pkl`` only; no code of the file
    runs: any global but torch's tensor rebuild functions is refused). Raises CheckpointError."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise CheckpointError(f"{path}: no data.pkl in the archive (not a torch checkpoint)")
            data = z.read(names[0])
        obj = _Unpickler(io.BytesIO(data)).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, TypeError, ValueError,
            AttributeError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint's keys: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the checkpoint is not a state dict")
    return {k: v.shape for k, v in obj.items() if isinstance(v, _Tensor)}


def rwkv_version(shapes: Mapping[str, Sequence[int]]) -> str:
    """The RWKV generation ("4" … "7") of a checkpoint from its key names and shapes (name -> shape: a list,
    tuple or ``torch.Size``), by the rules of the module docstring."""
    keys = shapes.keys()
    if any(k.endswith("att.r_k") or k.endswith("att.x_r") for k in keys):
        return "7"
    if any("time_maa" in k for k in keys):
        return "6"
    if any(".ln_x." in k for k in keys):
        if any("gate.weight" in k for k in keys):
            td = shapes.get("blocks.0.att.time_decay", ())
            return "5.2" if len(td) > 1 and td[1] > 1 else "5.1"
        return "5"
    return "4"


@dataclass(frozen=True)
class Header:
    """A checkpoint file's tensor names and shapes, read from its header alone (no torch, no weights).

    ``shapes``: name -> shape (list of ints); ``format``: "safetensors" or "pth".
    """

    shapes: dict[str, list[int]]
    format: str
    #: bytes of a safetensors JSON header read at most
    MAX_HEADER: ClassVar[int] = MAX_HEADER

    @classmethod
    def read(cls, path: str | Path) -> Header:
        """:meth:`safetensors` for a ``.safetensors`` file, else :meth:`pth`. Raises CheckpointError."""
        p = Path(path)
        return cls.safetensors(p) if p.suffix == ".safetensors" else cls.pth(p)

    @classmethod
    def safetensors(cls, path: str | Path) -> Header:
        """The header of a ``.safetensors`` file (:func:`safetensors_shapes`). Raises CheckpointError."""
        return cls(safetensors_shapes(Path(path)), "safetensors")

    @classmethod
    def pth(cls, path: str | Path) -> Header:
        """The header of a torch ``.pth`` zip (:func:`pth_shapes`). Raises CheckpointError."""
        return cls(pth_shapes(Path(path)), "pth")

    @property
    def rwkv_version(self) -> str:
        """:func:`rwkv_version` of these shapes."""
        return rwkv_version(self.shapes)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a ``.safetensors`` file (its JSON header only). Raises CheckpointError."""
    header, _ = safetensors_json(path)
    return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def safetensors_header(p: Path) -> dict:
    """The tensors of a safetensors file as meta tensors (name -> ``torch.Tensor`` on ``meta``), from its JSON
    header. Raises CheckpointError (also for a dtype torch does not know)."""
    import torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
    head, _ = safetensors_json(p)
    try:
        return {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta")
                for k, v in head.items() if k != "__metadata__"}
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot read the safetensors header of {p}: {e}") from None


#: how a torch.save file starts: a zip archive (the default since torch 1.6) or a pickle of protocol 2+
PTH_MAGIC = (b"PK\x03\x04", b"\x80")


def check_torch_file(p: Path) -> None:
    """Raise CheckpointError unless the file ``p`` starts as a ``torch.save`` file does (``PTH_MAGIC``): a JSON
    or text file given as a checkpoint is named as no checkpoint, before an unpickler reads it."""
    try:
        with open(p, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {p}: {e}") from None
    if not head.startswith(PTH_MAGIC):
        raise CheckpointError(f"{p} is not a checkpoint: neither a torch.save file (.pth) nor .safetensors")


def read_header(path: str | Path) -> dict:
    """A checkpoint's tensors as ``meta`` tensors (name -> ``torch.Tensor``: names, shapes, dtypes; no data
    read): ``.safetensors`` from its JSON header, ``.pth`` through ``torch.load(map_location="meta",
    weights_only=True)``.

    Raises:
        CheckpointError: a missing, empty, unreadable or non-tensor file.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}" if not p.exists() else f"checkpoint is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {p}")
    if p.suffix == ".safetensors":
        return safetensors_header(p)
    check_torch_file(p)
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
