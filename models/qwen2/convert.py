"""Converting a float Qwen2 / Qwen3 folder into a pre-quantized 4-bit GPTQ folder (``rwkv-chat convert``).

``convert(src, out, strategy)`` writes ``out`` as a Hugging Face folder that ``Qwen2`` (and GPTQ tools) load
without quantizing again:

* every Linear of the layers (q/k/v/o, gate/up/down) as ``<name>.qweight``, ``.qzeros``, ``.scales``, ``.g_idx``
  in the GPTQ layout of ``rwkv_chat.models.formats.i4`` (AutoGPTQ "v1" zeros), quantized by ``quantize_i4``
  (round to nearest, per-group MSE clipping) with one group size for the whole model: 128, or the largest
  divisor of every Linear's input width below it (a GPTQ config has one ``group_size``);
* ``lm_head`` (where untied), the embedding, norms and biases as in the source (the ``i4`` format keeps the
  head in the activation dtype);
* ``config.json`` with ``quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": G,
  "desc_act": false, "sym": false, "checkpoint_format": "gptq"}``, and every other file of the source folder
  (tokenizer, generation config) copied.

The strategy must have only ``i4`` stages (the folder is a GPTQ checkpoint; ``i8`` and ``f8`` quantize at load).
The tensors are written as one ``model.safetensors`` (held in memory while writing: about a quarter of the
source's float16 matrices plus its other tensors).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch

from rwkv_chat.models.errors import CheckpointError, StrategyError
from rwkv_chat.models.formats.i4 import group_size_for, quantize_i4
from rwkv_chat.models.formats.serialize import write_checkpoint
from rwkv_chat.models.qwen2.checkpoint import INDEX, open_checkpoint
from rwkv_chat.models.qwen2.config import read_config
from rwkv_chat.models.strategy import parse_strategy


def convert(src: str | Path, out: str | Path, strategy: str,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the GPTQ folder ``out`` from the float folder ``src`` (module docstring).

    Returns: ``{"out", "family": "qwen2", "version", "strategy", "packed": {"i4": count}, "bytes", "group_size"}``.
    Raises:
        CheckpointError: an unreadable or already quantized source, ``out`` a file (or named like one: .safetensors,
            .pth, .bin), an existing non-empty folder, a folder whose parent does not exist, or the
            source, widths that are not multiples of 8.
        StrategyError: a malformed strategy, or a stage that is not ``i4``.
    """
    src, out = Path(src), Path(out)
    stages = parse_strategy(strategy)
    bad = [str(s) for s in stages if s.quant != "i4"]
    if bad:
        raise StrategyError(f"a Qwen2 folder converts to a 4-bit GPTQ folder, so every stage must be i4; "
                            f"{bad[0]!r} is not (e.g. 'cuda fp16i4'; i8 and f8 quantize at load)")
    cfg = read_config(src)
    if cfg.quant_method is not None:
        raise CheckpointError(f"{src}: already quantized ({cfg.quant_method}); convert the float checkpoint")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"output {out} is the source itself")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} is a file: a Qwen2 folder converts to a GPTQ folder; name a new or "
                              "empty folder")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output {out} exists and is not an empty folder")
    if not out.exists() and out.suffix in (".safetensors", ".pth", ".bin"):
        raise CheckpointError(f"output {out}: a Qwen2 folder converts to a GPTQ folder, not a {out.suffix} file; name "
                              "a new or empty folder")
    if not out.resolve().parent.is_dir():
        raise CheckpointError(f"output {out}: the folder {out.resolve().parent} does not exist")
    ck = open_checkpoint(src, cfg)
    widths = (cfg.hidden_size, cfg.q_dim, cfg.intermediate_size)
    outs = (cfg.q_dim, cfg.kv_dim, cfg.hidden_size, cfg.intermediate_size)
    if any(w % 8 for w in widths + outs):
        raise CheckpointError(f"{src}: GPTQ packing needs widths that are multiples of 8, got {widths + outs}")
    group = group_size_for(math.gcd(*widths))
    keys = sorted(ck.files)
    tensors: dict[str, torch.Tensor] = {}
    count = 0
    for n, key in enumerate(keys):
        t = ck.get(key)
        if key.startswith("model.layers.") and key.endswith("_proj.weight"):
            q = quantize_i4(t.t(), group)                       # [in, out]
            stem = key[: -len(".weight")]
            tensors.update({f"{stem}.qweight": q.qweight, f"{stem}.qzeros": q.qzeros, f"{stem}.scales": q.scales,
                            f"{stem}.g_idx": (torch.arange(t.shape[1]) // group).to(torch.int32)})
            count += 1
        else:
            tensors[key] = t.contiguous()
        if progress is not None:
            progress(n + 1, len(keys))
    ck.close()
    out.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (INDEX, "config.json"):
            shutil.copy2(f, out / f.name)
    data = json.loads((src / "config.json").read_text(encoding="utf-8"))
    data["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                   "sym": False, "checkpoint_format": "gptq"}
    write_checkpoint(tensors, out / "model.safetensors", {"format": "pt", "quantized_by": "rwkv-chat convert",
                                                          "strategy": " -> ".join(str(s) for s in stages)})
    (out / "config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return {"out": str(out), "family": "qwen2", "version": cfg.version, "strategy": " -> ".join(map(str, stages)),
            "packed": {"i4": count}, "bytes": size, "group_size": group}
