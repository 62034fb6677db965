"""Converting RWKV checkpoints: ``.pth`` <-> ``.safetensors``, and pre-quantized files for a strategy.

``convert(src, out, strategy=None)``:

* without a strategy, the same tensors in the other container (``.pth`` read safely, written with
  ``torch.save``; ``.safetensors`` with ``safetensors.torch.save_file``);
* with a strategy (e.g. ``"cuda fp16i4"``), a ``.safetensors`` file in which every matrix of a stage with a
  weight format (``i8``, ``i4``, ``f8``) is stored packed (``formats.serialize``: ``<key>.qweight`` ...) exactly
  as that format packs it at load (the head of an ``i4`` stage stays float, ``strategy.HEAD_IN_ACTIVATION``),
  and every other tensor as in the source. Its metadata names it
  (``format = "rwkv-chat-quantized"``) and records the strategy, the packed keys with their formats, the RWKV
  version and the source's fingerprint (so states move between the source and the converted file).

Loading such a file (``read_packed``, used by ``RWKV``) does not quantize again: the packed weights are placed
as stored (rescaled exactly where an fp16 strategy halves the residual stream), and a stage asking for
another format than the file holds is a ``StrategyError``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from rwkv_chat.models import formats
from rwkv_chat.models.errors import CheckpointError, DeviceError, StrategyError
from rwkv_chat.models.formats import serialize
from rwkv_chat.models.rwkv import checkpoint as loader
from rwkv_chat.models.rwkv.generations import module_for
from rwkv_chat.models.strategy import plan_layers, torch_device

MAGIC = "rwkv-chat-quantized"
CONTAINERS = (".pth", ".safetensors")


def _matrix_kind(key: str, t: torch.Tensor, spec, gen) -> tuple[int, torch.Tensor] | None:
    """(layer index, the matrix [in, out]) when ``key`` is a matrix a weight format packs, else None."""
    if key == "head.weight":
        return spec.n_layer, t.t()
    if not key.startswith("blocks.") or ".ln0." in key or key.endswith("ffn.s_emb_x.weight"):
        return None
    i = int(key.split(".")[1])
    _, tt, kind = gen.convert(key.split(".", 2)[2], t, spec)
    return (i, tt) if kind == "matrix" else None


def convert(src: str | Path, out: str | Path, strategy: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Write ``src`` to ``out`` (see the module docstring).

    Args:
        src: a ``.pth`` or ``.safetensors`` RWKV checkpoint. out: the file to write (``.pth`` or ``.safetensors``;
            ``.safetensors`` when a strategy quantizes).
        strategy: None (container conversion only) or a strategy whose stages name weight formats.
        progress: called as ``progress(done, total)`` per tensor.
    Returns:
        ``{"out", "version", "strategy", "packed": {format: count}, "bytes"}``.
    Raises:
        CheckpointError: unreadable source, a source ``convert`` already packed, an unsupported output suffix,
            ``out`` equal to ``src`` or in a folder that does not exist.
        StrategyError: a malformed strategy.
    """
    src, out = Path(src), Path(out)
    if out.suffix not in CONTAINERS:
        raise CheckpointError(f"output {out} must end in .pth or .safetensors")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"output {out} is the source itself")
    if not out.resolve().parent.is_dir():
        raise CheckpointError(f"output {out}: the folder {out.resolve().parent} does not exist")
    if (done := converted_metadata(src)) is not None:
        raise CheckpointError(f"{src} was already converted (for {done.get('strategy')!r}) by rwkv-chat convert; "
                              "convert the original checkpoint")
    w = loader.read_checkpoint(src)
    spec = loader.inspect(w)
    loader.check_finite(w)
    fp = loader.fingerprint(w, spec)
    counts: dict[str, int] = {}
    if strategy is None:
        tensors = {k: t.contiguous() for k, t in w.items()}
        serialize.write_checkpoint(tensors, out, {"fingerprint": fp})
        return {"out": str(out), "version": spec.version, "strategy": None, "packed": counts,
                "bytes": out.stat().st_size}
    if out.suffix != ".safetensors":
        raise CheckpointError(f"a quantized checkpoint is written as .safetensors, not {out.suffix}")
    plan = plan_layers(strategy, spec.n_layer)
    gen = module_for(spec.version)
    tensors, packed_keys = {}, {}
    for n, (key, t) in enumerate(w.items()):
        found = _matrix_kind(key, t, spec, gen)
        place = plan.layers[found[0]] if found else None
        stage = plan.stages[place.stage] if found else None
        if found is None or place.quant is None:       # the head of an i4 stage stays float (HEAD_IN_ACTIVATION)
            tensors[key] = t.contiguous()
        else:
            try:
                dev = torch_device(stage.device)
            except DeviceError:
                dev = torch.device("cpu")           # quantize here; the file loads on the stage's device later
            packed = formats.get(place.quant).pack(found[1], stage.dtype, dev if dev.type == "cuda" else
                                                   torch.device("cpu"))
            suffix, parts, info = serialize.parts(packed)
            tensors.update({f"{key}.{p}": v for p, v in parts.items()})
            packed_keys[key] = {"format": suffix, **info}
            counts[suffix] = counts.get(suffix, 0) + 1
        if progress is not None:
            progress(n + 1, len(w))
    meta = {"format": MAGIC, "strategy": plan.strategy, "rwkv_version": spec.version, "fingerprint": fp,
            "packed": json.dumps(packed_keys)}
    serialize.write_checkpoint(tensors, out, meta)
    return {"out": str(out), "version": spec.version, "strategy": plan.strategy, "packed": counts,
            "bytes": out.stat().st_size}


def converted_metadata(path: str | Path) -> dict | None:
    """The metadata of a file ``convert`` wrote with a strategy (its ``format`` is ours), else None (any other
    file, or one that cannot be read: the reader reports that)."""
    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata()
    except Exception:       # noqa: BLE001 - read_checkpoint reports the file's problem
        return None
    return meta if meta and meta.get("format") == MAGIC else None


def read_packed(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict | None]:
    """A checkpoint with its packed weights apart: ``(w, packed, meta)``.

    For a file written by ``convert`` with a strategy: ``w`` holds every plain tensor and, for each packed key,
    a placeholder on the "meta" device with the key's checkpoint shape (for validation); ``packed`` maps those
    keys to the packed weights (CPU); ``meta`` is the file's metadata (``strategy``, ``fingerprint``,
    ``packed`` decoded). For any other checkpoint: ``(read_checkpoint(path), {}, None)``.

    Raises: CheckpointError (unreadable file, inconsistent packed parts).
    """
    p = Path(path)
    meta = converted_metadata(p)
    if meta is None:
        return loader.read_checkpoint(p), {}, None
    raw = loader.read_checkpoint(p)
    keys = packed_table(p, meta)
    w, packed = unpack(keys, raw)
    w.update(raw)
    return w, packed, {**meta, "packed": keys}


def unpack(keys: dict[str, dict], tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """The packed weights of ``keys`` (``packed_table``) assembled from their parts, taken out of ``tensors``:
    ``(placeholders, packed)``, a placeholder on the "meta" device with each key's checkpoint shape [out, in] and
    the packed weight of each key. Raises CheckpointError (inconsistent parts)."""
    placeholders, packed = {}, {}
    for key, info in keys.items():
        names = [n for n in serialize.PARTS.get(info.get("format"), ()) if f"{key}.{n}" in tensors]
        q = packed[key] = serialize.assemble(info.get("format"), {n: tensors.pop(f"{key}.{n}") for n in names}, info)
        k_in, n_out = q.shape
        placeholders[key] = torch.empty(n_out, k_in, device="meta")
    return placeholders, packed


def packed_table(path: Path, meta: dict) -> dict[str, dict]:
    """The packed-weight table of a converted file's metadata: key -> its format and shape info. Raises
    CheckpointError when it is missing, not JSON or not a table of weights."""
    try:
        keys = json.loads(meta["packed"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable packed-weight table in its metadata ({e})") from None
    if not isinstance(keys, dict) or not all(isinstance(v, dict) for v in keys.values()):
        raise CheckpointError(f"{path}: the packed-weight table in its metadata is not a table of weights")
    return keys


def adopt(packed, key: str, stage, atype: torch.dtype, device: torch.device, stream: bool, meta: dict):
    """A pre-quantized weight placed for its stage: on ``device`` (or pinned CPU memory with ``stream``), i8
    scales in ``atype``.

    Raises: StrategyError when the stage asks for another format than the file holds.
    """
    suffix = formats.format_of(packed).suffix
    if suffix != (stage.quant or ""):
        raise StrategyError(f"{key!r} is stored as {suffix} weights (converted for {meta.get('strategy')!r}); stage "
                            f"{str(stage)!r} asks for {stage.quant or 'plain float'} weights: use a strategy whose "
                            f"stages use {suffix}, or convert the original checkpoint again")
    if suffix == "i8":
        packed = serialize.assemble("i8", {n: getattr(packed, n) if n == "w" else getattr(packed, n).to(atype)
                                           for n in serialize.PARTS["i8"]}, {})
    if stream:
        if suffix in ("i8", "i4"):        # held in the layout the device's kernels read
            from rwkv_chat.models.formats.i8 import prefers_output_major

            packed = packed.with_layout(prefers_output_major(device))
        q = packed.contiguous()
        return q.pin_memory() if torch.cuda.is_available() else q
    return packed.to(device).contiguous()
