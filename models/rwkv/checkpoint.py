"""Reading BlinkDL checkpoints: safe loading, version detection, validation, fingerprint.

Checkpoints are BlinkDL ``.pth`` files (read with ``torch.load(weights_only=True, mmap=True)``, so
a pickle payload is refused, never executed) or ``.safetensors`` files with the same keys.
Version rules follow ChatRWKV ``rwkv/model.py`` (pip 0.8.32) plus RWKV-7 (``att.r_k``/``att.x_r``)
and its DeepEmbed variant (``ffn.s_emb``): 4; 5 (``ln_x``); 5.1 (``gate``); 5.2 (2-D ``time_decay``);
6 (``time_maa_*``); 7.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkv_chat.models.errors import CheckpointError
from rwkv_chat.models.header import check_torch_file, rwkv_version, safetensors_json

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class ModelSpec:
    """Dimensions and flavour of a checkpoint.

    Attributes:
        version: "4", "5", "5.1", "5.2", "6" or "7".
        n_layer, n_embd (C), n_att (attention width), n_ffn (channel-mix hidden width), vocab_size.
        n_head, head_size: heads of the matrix-state generations (v5+); 0 for v4.
        time_state: the checkpoint carries a tuned initial state (``att.time_state``).
        deep_embed: RWKV-7 DeepEmbed (``ffn.s_emb``).
    """

    version: str
    n_layer: int
    n_embd: int
    n_att: int
    n_ffn: int
    vocab_size: int
    n_head: int
    head_size: int
    time_state: bool = False
    deep_embed: bool = False

    @property
    def major(self) -> int:
        return int(float(self.version))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors on the CPU without executing any code from the file.

    Returns:
        dict key -> tensor (``.pth`` tensors are memory-mapped where the file allows).
    Raises:
        CheckpointError: missing, unreadable, truncated or corrupt file; a pickle payload that is not
            plain tensors; a file that is not a mapping of names to tensors.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_file():
        raise CheckpointError(f"checkpoint is not a file: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint is empty: {p}")
    if p.suffix == ".safetensors":
        safetensors_json(p)                 # a truncated or corrupt header named as the planner names it
        try:
            from safetensors.torch import load_file

            w = load_file(str(p), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(f"cannot read safetensors checkpoint {p}: {e}") from e
    else:
        w = _read_pth(p)
    if not isinstance(w, dict) or not w:
        raise CheckpointError(f"{p} does not hold a mapping of weight names to tensors")
    bad = [k for k, v in w.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p} holds entries that are not named tensors: {bad[:5]}")
    if "_strategy" in w:
        raise CheckpointError(f"{p} was converted for one strategy by the rwkv package's convert_model; "
                              "load the original checkpoint instead")
    return w


def _read_pth(p: Path) -> dict:
    check_torch_file(p)
    last: Exception | None = None
    for mmap in (True, False):  # legacy (non-zip) files cannot be memory-mapped
        try:
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{p} contains pickled objects other than tensors; refused to load "
                                  f"it (weights_only=True): {str(e).splitlines()[0]}") from e
        except Exception as e:  # any other failure of the unpickler on arbitrary bytes: corrupt
            last = e
    msg = str(last).splitlines()[0] if last else "unknown error"
    raise CheckpointError(f"cannot read checkpoint {p} (truncated or corrupt?): {msg}") from last


def detect_version(w: dict[str, torch.Tensor]) -> str:
    """The RWKV generation of a checkpoint from its keys (see the module docstring)."""
    return rwkv_version({k: v.shape for k, v in w.items()})


def _need(w, key: str) -> torch.Tensor:
    if key not in w:
        raise CheckpointError(f"missing key {key!r}")
    return w[key]


def inspect(w: dict[str, torch.Tensor]) -> ModelSpec:
    """Detect the version and dimensions, and check that every key a block needs is present.

    Raises:
        CheckpointError: unknown keys, missing keys, or inconsistent shapes.
    """
    version = detect_version(w)
    emb = _need(w, "emb.weight")
    if emb.dim() != 2:
        raise CheckpointError(f"'emb.weight' must be 2-D [vocab, n_embd], got {tuple(emb.shape)}")
    vocab, C = emb.shape
    layers = {int(m.group(1)) for k in w if (m := _BLOCK_KEY.match(k))}
    if not layers:
        raise CheckpointError("no 'blocks.N.' keys: not an RWKV checkpoint")
    n_layer = max(layers) + 1
    if layers != set(range(n_layer)):
        raise CheckpointError(f"blocks are not numbered 0..{n_layer - 1}: missing {sorted(set(range(n_layer)) - layers)}")
    n_att = _need(w, "blocks.0.att.key.weight").shape[0]
    n_ffn = _need(w, "blocks.0.ffn.key.weight").shape[0]
    n_head = head_size = 0
    if version == "7":
        rk = _need(w, "blocks.0.att.r_k")
        n_head, head_size = (rk.shape[0], rk.shape[1]) if rk.dim() == 2 else (1, rk.numel())
    elif version in ("5", "5.1", "5.2"):
        n_head = _need(w, "blocks.0.att.time_decay").shape[0]
    elif version == "6":
        n_head = _need(w, "blocks.0.att.time_faaaa").shape[0]
    if n_head:
        head_size = head_size or n_att // n_head
        if n_head * head_size != n_att:
            raise CheckpointError(f"{n_head} heads of size {head_size} do not make the attention width {n_att}")
    spec = ModelSpec(version=version, n_layer=n_layer, n_embd=C, n_att=n_att, n_ffn=n_ffn,
                     vocab_size=vocab, n_head=n_head, head_size=head_size,
                     time_state=any(k.endswith("att.time_state") for k in w),
                     deep_embed=any(".ffn.s_emb" in k for k in w))
    from rwkv_chat.models.rwkv.generations import module_for

    gen = module_for(version)
    expected: dict[str, tuple | None] = {"emb.weight": (vocab, C), "ln_out.weight": (C,), "ln_out.bias": (C,),
                                         "head.weight": (vocab, C), "blocks.0.ln0.weight": (C,),
                                         "blocks.0.ln0.bias": (C,)}
    for i in range(n_layer):
        for name, shape in gen.layer_keys(spec, i).items():
            expected["|".join(f"blocks.{i}.{n}" for n in name.split("|"))] = shape
    present: set[str] = set()
    for key, shape in expected.items():
        if "|" in key:  # alternatives, e.g. "blocks.3.att.time_first|blocks.3.att.time_faaaa"
            options = key.split("|")
            key = next((k for k in options if k in w), options[0])
        present.add(key)
        t = _need(w, key)
        if shape is not None and t.numel() != _numel(shape):
            raise CheckpointError(f"{key!r} has shape {tuple(t.shape)}, expected {shape} "
                                  f"(n_embd={C}, n_att={n_att}, n_ffn={n_ffn}, vocab={vocab})")
    unknown = [k for k in w if k not in present and not _optional(k)]
    if unknown:
        raise CheckpointError(f"unknown keys for an RWKV-{version} checkpoint: {unknown[:6]}")
    return spec


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _optional(key: str) -> bool:
    return key.endswith(("att.time_state", ".ffn.s_emb.weight", ".ffn.s_emb_x.weight", ".ffn.s0", ".ffn.s1",
                         ".ffn.s2", "att.v0", "att.v1", "att.v2"))


def check_finite(w: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming the first tensor holding NaN or Inf (placeholders on the "meta" device of
    pre-quantized weights are skipped: ``rwkv/convert.py``)."""
    for k, t in w.items():
        if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{k!r} contains NaN or Inf values")


def fingerprint(w: dict[str, torch.Tensor], spec: ModelSpec) -> str:
    """A short hex id of the weights: sha256 over key names, shapes and a sample of the values.

    The same weights in ``.pth`` or ``.safetensors`` give the same fingerprint; it is what a saved state
    records to refuse being resumed on another model.
    """
    h = hashlib.sha256(f"rwkv-{spec.version}".encode())
    for k in sorted(w):
        h.update(f"{k}:{tuple(w[k].shape)};".encode())
    for k in ("emb.weight", "head.weight", "ln_out.weight", f"blocks.{spec.n_layer - 1}.ffn.value.weight"):
        t = w[k].reshape(-1)
        h.update(t[:4096].float().numpy().tobytes())
        h.update(t[-4096:].float().numpy().tobytes())
    return h.hexdigest()[:16]
