"""What a model is, read from its files' headers without loading it (no torch, no weights read).

:func:`describe` answers family, generation, layers, width, vocabulary and parameter count of

- an RWKV checkpoint file: ``.safetensors`` (the 8-byte length and the JSON header: names, dtypes, shapes) or
  a BlinkDL ``.pth`` (a torch zip archive: its ``data.pkl`` is unpickled with stand-ins for torch's tensor
  rebuild functions, so only key names and shapes come out and no code of the file runs);
- a Hugging Face folder with ``config.json`` (the Qwen2 family and its kin): ``model_type``,
  ``num_hidden_layers``, ``hidden_size``, ``vocab_size`` from the config, parameters from the safetensors
  headers of the folder.

The RWKV generation follows the engine's key rules (ChatRWKV ``rwkv/model.py``, pip 0.8.32, plus RWKV-7):
4; 5 (``ln_x``); 5.1 (``gate``); 5.2 (2-D ``time_decay``); 6 (``time_maa_*``); 7 (``att.r_k`` / ``att.x_r``).
The files are read by the engine's torch-free :class:`rwkv_chat.models.Header` (one header reader for the
planner, the loaders and this module). Raises :class:`HeaderError` for a file that is none of these or cannot
be read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from math import prod
from pathlib import Path

from rwkv_chat.models import CheckpointError, Header

#: bytes of a safetensors JSON header read at most (the engine's bound)
MAX_HEADER = Header.MAX_HEADER


class HeaderError(ValueError):
    """A model file or folder whose header cannot be read (not a checkpoint, truncated, unknown layout)."""


@dataclass(frozen=True)
class ModelFacts:
    """What :func:`describe` found. ``version``: the RWKV generation ("4" … "7") or the HF ``model_type``
    ("qwen2"); ``params``: parameter count; ``format``: "pth", "safetensors" or "hf" (a folder)."""

    family: str          # "rwkv" or the HF model_type family ("qwen2", ...)
    version: str
    n_layer: int
    n_embd: int
    vocab_size: int
    params: int
    format: str

    @property
    def size(self) -> str:
        """Parameters in words: ``834K``, ``1.5B``."""
        return human_count(self.params)


def human_count(n: int) -> str:
    """``834K``, ``1.5M``, ``1.5B`` (3 significant digits at most, trailing zeros cut)."""
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            v = n / div
            text = f"{v:.1f}" if v < 100 else f"{v:.0f}"
            return (text[:-2] if text.endswith(".0") else text) + unit
    return str(n)


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a ``.safetensors`` file (its JSON header only). Raises HeaderError."""
    return _read(Header.safetensors, path).shapes


def pth_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a torch ``.pth`` zip checkpoint (its ``data.pkl`` only). Raises HeaderError."""
    return _read(Header.pth, path).shapes


def rwkv_version(shapes: dict[str, list[int]]) -> str:
    """The RWKV generation of a checkpoint from its key names and shapes (the engine's rules)."""
    return Header(shapes, "").rwkv_version


def _read(reader, path: Path) -> Header:
    try:
        return reader(path)
    except CheckpointError as e:
        raise HeaderError(str(e)) from e


def _rwkv_facts(shapes: dict[str, list[int]], fmt: str, path: Path) -> ModelFacts:
    emb = shapes.get("emb.weight")
    if not emb or len(emb) != 2 or not any(k.startswith("blocks.") for k in shapes):
        raise HeaderError(f"{path}: not an RWKV checkpoint (no emb.weight / blocks.* keys)")
    n_layer = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit())
    return ModelFacts(family="rwkv", version=rwkv_version(shapes), n_layer=n_layer, n_embd=emb[1],
                      vocab_size=emb[0], params=sum(prod(s) for s in shapes.values()), format=fmt)


def _folder_facts(folder: Path) -> ModelFacts:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{folder}: cannot read config.json: {e}") from e
    if not isinstance(cfg, dict):
        raise HeaderError(f"{folder}: config.json is not a table")
    params = sum(prod(s) for f in sorted(folder.glob("*.safetensors")) for s in safetensors_shapes(f).values())
    model_type = str(cfg.get("model_type") or "unknown")
    family = "qwen2" if model_type.startswith("qwen2") else model_type
    return ModelFacts(family=family, version=model_type, n_layer=int(cfg.get("num_hidden_layers") or 0),
                      n_embd=int(cfg.get("hidden_size") or 0), vocab_size=int(cfg.get("vocab_size") or 0),
                      params=params, format="hf")


def describe(path: str | Path) -> ModelFacts:
    """The :class:`ModelFacts` of a model file (``.pth``, ``.safetensors``) or folder (``config.json``).
    Reads headers only (milliseconds; a ``.pth``'s pickle is a few KiB). Raises HeaderError."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise HeaderError(f"{p}: a model folder needs a config.json")
        return _folder_facts(p)
    if not p.is_file():
        raise HeaderError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        return _rwkv_facts(safetensors_shapes(p), "safetensors", p)
    return _rwkv_facts(pth_shapes(p), "pth", p)
