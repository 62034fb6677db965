"""Reading a Hugging Face Qwen2 / Qwen3 checkpoint folder: one or sharded ``*.safetensors`` (+ index).

``open_checkpoint(folder, config)`` reads every shard's header (no tensor data), checks that each shard is whole
(the header's data offsets fit the file), that every weight the config implies is present with its shape and a
float dtype, that no unknown key is there, and computes the fingerprint. Tensors are then read one at a time
(``Checkpoint.get``) through ``safetensors.safe_open`` (memory-mapped), so loading never holds the whole file in
memory twice.

Keys (``transformers`` ``modeling_qwen2.py`` / ``modeling_qwen3.py``), nn.Linear weights [out, in]::

    model.embed_tokens.weight                     [V, C]
    model.layers.{i}.input_layernorm.weight       [C]
    model.layers.{i}.self_attn.q_proj.weight      [H*D, C]   (+ .bias [H*D] with q/k/v bias)
    model.layers.{i}.self_attn.k_proj.weight      [K*D, C]   (+ .bias [K*D])
    model.layers.{i}.self_attn.v_proj.weight      [K*D, C]   (+ .bias [K*D])
    model.layers.{i}.self_attn.o_proj.weight      [C, H*D]   (+ .bias [C]: Qwen3 with attention_bias)
    model.layers.{i}.self_attn.q_norm.weight      [D]        (Qwen3)
    model.layers.{i}.self_attn.k_norm.weight      [D]        (Qwen3)
    model.layers.{i}.post_attention_layernorm.weight [C]
    model.layers.{i}.mlp.gate_proj.weight         [F, C]
    model.layers.{i}.mlp.up_proj.weight           [F, C]
    model.layers.{i}.mlp.down_proj.weight         [C, F]
    model.norm.weight                             [C]
    lm_head.weight                                [V, C]     (absent when tie_word_embeddings)

A GPTQ folder (``quantization_config``: ``quant_method`` "gptq", ``bits`` 4, ``group_size`` G, ``desc_act``,
``sym``; checked by ``rwkv_chat.models.formats.i4.gptq_group_size``) stores each Linear ``X.weight`` [N, K] of the
layers (and ``lm_head`` where the quantizer took it; else ``lm_head.weight`` stays float) as::

    X.qweight int32 [K/8, N]    X.qzeros int32 [K/G, N/8]    X.scales float [K/G, N]    X.g_idx int32 [K] (optional)

beside the same biases and float tensors (``gptq_keys``); the layout is the one ``formats.i4`` documents.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rwkv_chat.models.errors import CheckpointError
from rwkv_chat.models.header import safetensors_json
from rwkv_chat.models.qwen2.config import QwenConfig

INDEX = "model.safetensors.index.json"
INT_DTYPES = {"I32": torch.int32}
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)        # buffers some older exports saved
_SAMPLE = 1 << 16                                    # bytes of each shard's data hashed into the fingerprint


def expected_shapes(cfg: QwenConfig) -> dict[str, tuple[int, ...]]:
    """Every weight key of the checkpoint with its shape (``lm_head.weight`` only for untied embeddings)."""
    C, F, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    out = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, C)
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
                    p + "self_attn.q_proj.weight": (cfg.q_dim, C), p + "self_attn.k_proj.weight": (cfg.kv_dim, C),
                    p + "self_attn.v_proj.weight": (cfg.kv_dim, C), p + "self_attn.o_proj.weight": (C, cfg.q_dim),
                    p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C),
                    p + "mlp.down_proj.weight": (C, F)})
        if cfg.qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (cfg.q_dim,), p + "self_attn.k_proj.bias": (cfg.kv_dim,),
                        p + "self_attn.v_proj.bias": (cfg.kv_dim,)})
            if cfg.qk_norm:                                   # Qwen3's attention_bias covers o_proj too
                out[p + "self_attn.o_proj.bias"] = (C,)
        if cfg.qk_norm:
            out.update({p + "self_attn.q_norm.weight": (D,), p + "self_attn.k_norm.weight": (D,)})
    return out


def gptq_keys(cfg: QwenConfig, group: int | None, head_quantized: bool):
    """The keys of a GPTQ folder (module docstring): ``(want, kinds, optional)``: key -> shape, key -> "float" or
    "int", and the optional keys (``g_idx``) -> shape. ``group``: the config's group size (None: one group).

    Raises: CheckpointError: a group size that does not divide a Linear's input width, a width not a multiple of 8.
    """
    want, kinds, optional = {}, {}, {}
    for key, shape in expected_shapes(cfg).items():
        linear = key.endswith("_proj.weight") or (key == "lm_head.weight" and head_quantized)
        if not linear:
            want[key], kinds[key] = shape, "float"
            continue
        n, k = shape
        g = group or k
        if k % 8 or k % g:
            raise CheckpointError(f"{cfg.quant_method} checkpoint: {key!r} [{n}, {k}] does not fit GPTQ packing with "
                                  f"group_size {group} (input width must be a multiple of 8 and of the group)")
        stem = key[: -len(".weight")]
        want.update({f"{stem}.qweight": (k // 8, n), f"{stem}.qzeros": (k // g, -(-n // 8)),
                     f"{stem}.scales": (k // g, n)})
        kinds.update({f"{stem}.qweight": "int", f"{stem}.qzeros": "int", f"{stem}.scales": "float"})
        optional[f"{stem}.g_idx"] = (k,)
        kinds[f"{stem}.g_idx"] = "int"
    return want, kinds, optional


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size.

    Raises:
        CheckpointError: unreadable, not safetensors, or truncated (a tensor's data reaches past the end of the
            file); the message names the file (and the tensor).
    """
    header, n = safetensors_json(path)          # raises for a tensor past the end of the file, naming it
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise CheckpointError(f"{path}: tensor {key!r} has no valid data_offsets")
    header["__data_start__"] = 8 + n
    return header


class Checkpoint:
    """The validated weights of a Qwen checkpoint folder (headers read; tensors read on ``get``).

    Attributes:
        folder: the folder. files: key -> shard path. fingerprint: 16 hex digits identifying the weights (sha256 of
        every key, dtype and shape and of the first and last 64 KiB of each shard's data).
    """

    def __init__(self, folder: Path, cfg: QwenConfig):
        self.folder, self.cfg = folder, cfg
        shards = self._shards()
        self.files: dict[str, Path] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        h = hashlib.sha256(f"qwen{cfg.version}".encode())
        headers = {}
        for shard in shards:
            headers[shard] = header = read_header(shard)
            for key, info in header.items():
                if key.startswith("__"):
                    continue
                if key in self.files:
                    raise CheckpointError(f"{shard}: key {key!r} is also in {self.files[key]}")
                self.files[key] = shard
        #: GPTQ folders: the ``quantization_config`` and whether ``lm_head`` is quantized; None for float weights
        self.gptq: dict | None = None
        self.head_quantized = False
        if cfg.quant_method == "gptq":
            self.head_quantized = "lm_head.qweight" in self.files
            self.gptq = dict(cfg.quantization_config or {})
            want, kinds, optional = gptq_keys(cfg, _gptq_group(folder, cfg), self.head_quantized)
            want.update({k: s for k, s in optional.items() if k in self.files})
        else:
            want = expected_shapes(cfg)
            kinds = dict.fromkeys(want, "float")
        for key, shape in want.items():
            if key not in self.files:
                raise CheckpointError(f"{self.folder}: key {key!r} is missing (config.json implies it)")
            info = headers[self.files[key]][key]
            if tuple(info.get("shape", ())) != shape:
                raise CheckpointError(f"{self.files[key]}: key {key!r} has shape {tuple(info.get('shape', ()))}, "
                                      f"config.json implies {shape}")
            allowed = FLOAT_DTYPES if kinds[key] == "float" else INT_DTYPES
            if info.get("dtype") not in allowed:
                raise CheckpointError(f"{self.files[key]}: key {key!r} has dtype {info.get('dtype')!r}; "
                                      f"expected one of {', '.join(allowed)}")
            self.dtypes[key] = allowed[info["dtype"]]
        extra = sorted(k for k in self.files if k not in want and not k.endswith(_IGNORED_SUFFIXES)
                       and not (k == "lm_head.weight" and cfg.tie_word_embeddings))
        if extra:
            raise CheckpointError(f"{self.files[extra[0]]}: unexpected key {extra[0]!r} "
                                  f"({len(extra)} unknown key(s)) for {cfg.version and 'Qwen' + cfg.version}")
        for key in sorted(want):
            info = headers[self.files[key]][key]
            h.update(f"{key}:{info['dtype']}:{info['shape']};".encode())
        for shard in shards:
            start = headers[shard]["__data_start__"]
            size = shard.stat().st_size
            with open(shard, "rb") as f:
                f.seek(start)
                h.update(f.read(_SAMPLE))
                f.seek(max(start, size - _SAMPLE))
                h.update(f.read(_SAMPLE))
        self.fingerprint = h.hexdigest()[:16]
        self._open: dict[Path, object] = {}

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                names = sorted(set(data["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: key 'weight_map' cannot be read: {e}") from None
            shards = [self.folder / n for n in names]
            for s in shards:
                if not s.is_file():
                    raise CheckpointError(f"{index}: names shard {s.name!r}, which is missing")
            return shards
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            if self.cfg.quant_method:
                raise CheckpointError(f"{self.folder}: no *.safetensors weights")
            raise CheckpointError(f"{self.folder}: no *.safetensors weights (a .bin-only checkpoint is not "
                                  "served; convert it to safetensors)")
        return shards

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (CPU, its stored dtype). Raises CheckpointError naming the file and key."""
        from safetensors import safe_open

        path = self.files.get(key)
        if path is None:
            raise CheckpointError(f"{self.folder}: key {key!r} is missing")
        try:
            f = self._open.get(path)
            if f is None:
                f = self._open[path] = safe_open(str(path), framework="pt", device="cpu")
            return f.get_tensor(key)
        except Exception as e:  # safetensors' own errors
            raise CheckpointError(f"{path}: cannot read key {key!r}: {e}") from None

    def close(self) -> None:
        """Drop the open shard handles (the memory maps)."""
        self._open.clear()


def open_checkpoint(folder: str | Path, cfg: QwenConfig) -> Checkpoint:
    """Validate the weights of ``folder`` against ``cfg`` (see the module docstring).

    Raises:
        CheckpointError: a pre-quantized folder whose weight format is not served (4-bit GPTQ is), a missing,
            truncated or unreadable shard, a missing or unknown key, a wrong shape or dtype; the message names the
            file and key.
    """
    folder = Path(folder)
    if cfg.quant_method not in (None, "gptq"):
        from rwkv_chat.models import formats

        fmt = {"fp8": "f8"}.get(cfg.quant_method)
        served = fmt is not None and fmt in formats.FORMATS
        raise CheckpointError(
            f"{folder / 'config.json'}: key 'quantization_config' says quant_method {cfg.quant_method!r}: "
            + ("reading pre-quantized weights is not served yet; load the float checkpoint with the "
               f"strategy suffix {fmt!r} instead" if served else
               "pre-quantized checkpoints are not served; load the float checkpoint (quantize with the strategy "
               "suffix i8)"))
    return Checkpoint(folder, cfg)


def _gptq_group(folder: Path, cfg: QwenConfig) -> int | None:
    """The group size of a GPTQ folder's ``quantization_config`` (None: one group per column). Raises
    CheckpointError naming config.json and the field that is not served."""
    from rwkv_chat.models.errors import UnsupportedDtypeError
    from rwkv_chat.models.formats.i4 import gptq_group_size

    try:
        return gptq_group_size(cfg.quantization_config or {})
    except UnsupportedDtypeError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
