"""Packed weights as named tensors (for safetensors files) and back, and their exact rescaling.

A packed weight of key ``K`` is stored as tensors ``K.<part>``:

* ``i4``: ``K.qweight`` int32 [Kp/8, Np] (the GPTQ layout, also for a weight held output-major), ``K.qzeros``
  int32, ``K.scales`` float16, optional ``K.g_idx``; the logical shape and group size in the file's metadata;
* ``i8``: ``K.w`` uint8 [N, M] (input-major), ``K.mx``, ``K.rx``, ``K.my``, ``K.ry``;
* ``f8``: ``K.w8`` e4m3fn [N, K] stored as its bytes (uint8 view), ``K.scale`` float32 [N].

``parts(packed) -> (suffix, {part: tensor}, info)`` and ``assemble(suffix, parts, info)`` invert each other
bit for bit. ``rescaled(packed, factor)`` divides the weight a packed matrix stands for by ``factor`` (a power of
two: exact), as quantizing the divided float matrix would give (the fp16 residual rescale of RWKV v4–v6).
``write_checkpoint(tensors, out, metadata)`` writes such tensors as a ``.safetensors`` or ``.pth`` file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rwkv_chat.models.errors import CheckpointError
from rwkv_chat.models.formats.f8 import Float8Weight
from rwkv_chat.models.formats.i4 import Int4Weight
from rwkv_chat.models.formats.i8 import Int8Weight

PARTS = {"i4": ("qweight", "qzeros", "scales", "g_idx"), "i8": ("w", "mx", "rx", "my", "ry"), "f8": ("w8", "scale")}


def parts(packed) -> tuple[str, dict[str, torch.Tensor], dict]:
    """``(format suffix, {part: CPU contiguous tensor}, info)`` of a packed weight (info: JSON-able)."""
    if isinstance(packed, Int4Weight):          # the GPTQ layout whatever the layout in memory
        p = {"qweight": packed.qweight, "qzeros": packed.qzeros, "scales": packed.scales}
        if packed.g_idx is not None:
            p["g_idx"] = packed.g_idx
        info = {"shape": list(packed.shape), "group_size": packed.group_size}
        suffix = "i4"
    elif isinstance(packed, Int8Weight):
        q = packed.with_layout(False) if packed.device.type != "cuda" else packed.to("cpu", output_major=False)
        p = {"w": q.w, "mx": q.mx, "rx": q.rx, "my": q.my, "ry": q.ry}
        info, suffix = {}, "i8"
    elif isinstance(packed, Float8Weight):
        p = {"w8": packed.w8.view(torch.uint8), "scale": packed.scale}
        info, suffix = {}, "f8"
    else:
        raise TypeError(f"{type(packed).__name__} is not a packed weight")
    return suffix, {k: v.detach().to("cpu").contiguous() for k, v in p.items()}, info


def assemble(suffix: str, p: dict[str, torch.Tensor], info: dict):
    """The packed weight of format ``suffix`` from its parts (see ``parts``).

    Raises: CheckpointError for a missing part or an unknown format.
    """
    need = [n for n in PARTS.get(suffix, ()) if n != "g_idx"]
    if suffix not in PARTS or any(n not in p for n in need):
        raise CheckpointError(f"packed weight of format {suffix!r} lacks parts {[n for n in need if n not in p]}")
    if suffix == "i4":
        return Int4Weight(p["qweight"], p["qzeros"], p["scales"], p.get("g_idx"), int(info["group_size"]),
                          tuple(info["shape"]))
    if suffix == "i8":
        return Int8Weight(p["w"], p["mx"], p["rx"], p["my"], p["ry"], False)
    return Float8Weight(p["w8"].view(torch.float8_e4m3fn), p["scale"])


def rescaled(packed, factor: float):
    """``packed`` standing for its matrix divided by ``factor`` (exact for powers of two)."""
    if factor == 1:
        return packed
    if isinstance(packed, torch.Tensor):
        return packed / factor
    if isinstance(packed, Int4Weight):
        return Int4Weight(packed.qweight, packed.qzeros, packed.scales / factor, packed.g_idx, packed.group_size,
                          packed.shape, packed.output_major)
    if isinstance(packed, Int8Weight):    # (w + ½)·ry·rx + my + mx: rx, my and mx carry the factor
        return Int8Weight(packed.w, packed.mx / factor, packed.rx / factor, packed.my / factor, packed.ry,
                          packed.output_major)
    if isinstance(packed, Float8Weight):
        return Float8Weight(packed.w8, packed.scale / factor)
    raise TypeError(f"{type(packed).__name__} is not a packed weight")


def write_checkpoint(tensors: dict[str, torch.Tensor], out: str | Path, metadata: dict | None = None) -> None:
    """Write ``tensors`` to ``out``: ``.safetensors`` (``metadata`` as its string metadata) or else ``torch.save``;
    through ``out.part``, renamed when complete, with the permissions a new file gets here (the umask's: the
    safetensors writer alone leaves 0600). Raises OSError."""
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    else:
        torch.save(tensors, str(tmp))
    os.chmod(tmp, 0o666 & ~_umask())
    tmp.replace(out)


def _umask() -> int:
    """The process's umask, read without changing it where the system shows it (Linux: /proc/self/status), else
    set and restored at once."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
