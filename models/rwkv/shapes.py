"""Random-weight RWKV-7 checkpoints of the official model shapes, built in memory (for speed work).

Speed depends on shapes, not on trained values, so ``rwkv-chat bench --shape 1.5B`` runs on a checkpoint
dict built here with the keys and shapes of BlinkDL's RWKV-7 "x070" releases:

=====  =======  ======  =====  =========================================================
name   n_layer  n_embd  vocab  low-rank dims (decay w, in-context rate a, value v, gate g)
=====  =======  ======  =====  =========================================================
0.1B   12       768     65536  64, 64, 32, 128
0.4B   24       1024    65536  64, 64, 32, 160
1.5B   24       2048    65536  96, 96, 64, 256
2.9B   32       2560    65536  96, 96, 64, 320
7.2B   32       4096    65536  128, 128, 96, 480
=====  =======  ======  =====  =========================================================

Head size 64, channel-mix width 4·C; the low-rank dims follow RWKV-LM ``train_temp/src/model.py``
(``max(32, round(f(C) / 32) · 32)`` with f = 1.8√C for w and a, 1.3√C for v, 0.6·C^0.8 for g).
Values are scaled so that activations stay in the fp16 range (matrices ~ U(±√(3/fan_in)), output
projections smaller), which keeps timings representative (no NaN/Inf fast paths).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rwkv_chat.models.errors import ShapeMismatchError

#: name -> (n_layer, n_embd)
SHAPES: dict[str, tuple[int, int]] = {
    "0.1B": (12, 768),
    "0.4B": (24, 1024),
    "1.5B": (24, 2048),
    "2.9B": (32, 2560),
    "7.2B": (32, 4096),
}
VOCAB = 65536
HEAD_SIZE = 64


def lora_dims(n_embd: int) -> dict[str, int]:
    """The low-rank widths of one RWKV-7 layer: {"w", "a", "v", "g"} -> int (RWKV-LM's formulas)."""
    r = lambda f: max(32, int(round(f / 32)) * 32)  # noqa: E731
    C = n_embd
    return {"w": r(1.8 * C ** 0.5), "a": r(1.8 * C ** 0.5), "v": r(1.3 * C ** 0.5), "g": r(0.6 * C ** 0.8)}


def parameter_count(name: str, vocab: int = VOCAB) -> int:
    """Number of parameters of the named shape (embedding and head included)."""
    return sum(t.numel() for t in _layout(name, vocab).values())


def _layout(name: str, vocab: int) -> dict[str, tuple[int, ...]]:
    if name not in SHAPES:
        raise ShapeMismatchError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    L, C = SHAPES[name]
    H, d = C // HEAD_SIZE, lora_dims(C)
    out: dict[str, tuple[int, ...]] = {"emb.weight": (vocab, C), "blocks.0.ln0.weight": (C,),
                                       "blocks.0.ln0.bias": (C,)}
    for i in range(L):
        b = f"blocks.{i}."
        for n in ("ln1", "ln2"):
            out[b + n + ".weight"] = (C,)
            out[b + n + ".bias"] = (C,)
        for m in "rwkvag":
            out[b + f"att.x_{m}"] = (1, 1, C)
        out.update({b + "att.w0": (1, 1, C), b + "att.w1": (C, d["w"]), b + "att.w2": (d["w"], C),
                    b + "att.a0": (1, 1, C), b + "att.a1": (C, d["a"]), b + "att.a2": (d["a"], C),
                    b + "att.g1": (C, d["g"]), b + "att.g2": (d["g"], C),
                    b + "att.k_k": (1, 1, C), b + "att.k_a": (1, 1, C), b + "att.r_k": (H, HEAD_SIZE),
                    b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,)})
        if i > 0:
            out.update({b + "att.v0": (1, 1, C), b + "att.v1": (C, d["v"]), b + "att.v2": (d["v"], C)})
        for m in ("receptance", "key", "value", "output"):
            out[b + f"att.{m}.weight"] = (C, C)
        out.update({b + "ffn.x_k": (1, 1, C), b + "ffn.key.weight": (4 * C, C),
                    b + "ffn.value.weight": (C, 4 * C)})
    out.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (vocab, C)})
    return {k: torch.Size(v) for k, v in out.items()}


def random_checkpoint(name: str, dtype: torch.dtype = torch.float16, device: str | torch.device = "cpu",
                      seed: int = 0, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """A checkpoint dict (BlinkDL RWKV-7 keys) of random weights with the named official shape.

    Args:
        name: one of ``SHAPES`` ("0.1B", "0.4B", "1.5B", "2.9B", "7.2B").
        dtype: the stored dtype (fp16 like the releases; fp32 for CPU runs).
        device: where to build the tensors (build on the GPU for the large shapes: it is much faster).
        seed: the generator seed; the same seed gives the same weights on the same device.
        vocab: vocabulary size (65536 for the World tokenizer).
    Returns:
        dict key -> tensor, ready for ``RWKV(model=dict, ...)`` or ``save_pth``.
    Raises:
        ShapeMismatchError: an unknown shape name.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in _layout(name, vocab).items():
        out[key] = _init(key, shape, gen, device).to(dtype)
    return out


def _uniform(shape, lo, hi, gen, device) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=torch.float32).uniform_(lo, hi, generator=gen)


def _init(key: str, shape: torch.Size, gen, device) -> torch.Tensor:
    leaf = key.split(".", 2)[-1] if key.startswith("blocks.") else key
    if leaf.endswith(("ln0.weight", "ln1.weight", "ln2.weight", "ln_x.weight")) or leaf == "ln_out.weight":
        return _uniform(shape, 0.8, 1.2, gen, device)
    if leaf.endswith(".bias"):
        return _uniform(shape, -0.1, 0.1, gen, device)
    if leaf.startswith(("att.x_", "ffn.x_")):
        return _uniform(shape, 0.0, 1.0, gen, device)
    if leaf in ("att.w0", "att.a0", "att.v0"):
        return _uniform(shape, -2.0, 2.0, gen, device)
    if leaf == "att.k_k":
        return _uniform(shape, 0.5, 1.0, gen, device)
    if leaf == "att.k_a":
        return _uniform(shape, 0.8, 1.2, gen, device)
    if leaf == "att.r_k":
        return _uniform(shape, -0.3, 0.3, gen, device)
    if leaf == "emb.weight":
        return _uniform(shape, -1.0, 1.0, gen, device)
    # matrices: [out, in] (or [in, out] for the low-rank *1/*2 factors)
    fan_in = shape[1] if leaf.endswith(".weight") else shape[0]
    scale = math.sqrt(3.0 / fan_in)
    if leaf in ("att.output.weight", "ffn.value.weight"):
        scale *= 0.5
    return _uniform(shape, -scale, scale, gen, device)


def save_pth(w: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a checkpoint dict as a BlinkDL ``.pth`` (CPU tensors) for tools that read files, e.g. the
    reference ``rwkv`` package. Returns the path written."""
    path = Path(path)
    torch.save({k: t.detach().cpu().contiguous() for k, t in w.items()}, path)
    return path
