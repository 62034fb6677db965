"""``config.json`` of a Hugging Face Qwen2 / Qwen3 checkpoint folder, read and validated.

Architectures served: ``Qwen2ForCausalLM`` (Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen: q/k/v bias, no q/k norm)
and ``Qwen3ForCausalLM`` (the same block with a per-head RMSNorm on q and k before RoPE, ``attention_bias``
usually false, an explicit ``head_dim``). Keys follow ``transformers`` (``configuration_qwen2.py``,
``configuration_qwen3.py``): ``rope_theta`` at the top level (older files) or in ``rope_parameters`` (transformers
5). Only the default RoPE is served; scaled RoPE (``rope_scaling`` / ``rope_type`` other than "default") and
sliding-window attention are refused with a ``CheckpointError`` naming the file and key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rwkv_chat.models.errors import CheckpointError

#: architectures -> family version ("2": Qwen2ForCausalLM, "3": Qwen3ForCausalLM with q/k norm)
ARCHITECTURES = {"Qwen2ForCausalLM": "2", "Qwen3ForCausalLM": "3"}


@dataclass(frozen=True)
class QwenConfig:
    """The dimensions and constants of one checkpoint.

    Attributes:
        version: "2" (Qwen2ForCausalLM) or "3" (Qwen3ForCausalLM).
        vocab_size, hidden_size (C), intermediate_size (F), n_layer, n_head (H), n_kv_head (K, H % K == 0),
        head_dim (D; hidden_size // n_head unless given): sizes.
        rope_theta: RoPE base. rms_norm_eps: RMSNorm epsilon. max_position_embeddings: trained context (tokens).
        tie_word_embeddings: the head is the embedding matrix (``lm_head.weight`` absent).
        qkv_bias: q/k/v projections have biases (Qwen2: always; Qwen3: ``attention_bias``).
        qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3).
        quant_method: ``quantization_config.quant_method`` ("gptq", ...) or None for float weights.
        quantization_config: the whole ``quantization_config`` object (a dict) or None.
        torch_dtype: the dtype the checkpoint declares ("bfloat16", ...), informational.
    """

    version: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    quant_method: str | None = None
    torch_dtype: str | None = None
    quantization_config: dict | None = field(default=None, compare=False, hash=False)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim


def is_qwen_folder(path: Path) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` names a served architecture (no errors raised)."""
    try:
        data = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    archs = data.get("architectures") if isinstance(data, dict) else None
    return isinstance(archs, list) and any(a in ARCHITECTURES for a in archs)


def check_not_a_folder_file(path: Path) -> None:
    """Raise CheckpointError when ``path`` is a file (not a ``.pth``) of a Qwen folder: the folder is what loads."""
    if path.is_file() and path.suffix != ".pth" and is_qwen_folder(path.parent):
        raise CheckpointError(f"{path} is a file of the Hugging Face folder {path.parent}: load the folder")


def read_config(folder: str | Path) -> QwenConfig:
    """Read and validate ``folder/config.json``.

    Raises:
        CheckpointError: the file is missing or not JSON, the architecture is not Qwen2/Qwen3, a key is missing or
            of the wrong type or value, or a feature is not served (scaled RoPE, sliding window); the message
            names the file and the key.
    """
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (a Hugging Face model folder has a config.json)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    archs = data.get("architectures")
    version = next((ARCHITECTURES[a] for a in archs or () if a in ARCHITECTURES), None) \
        if isinstance(archs, list) else None
    if version is None:
        raise CheckpointError(f"{path}: key 'architectures' is {archs!r}; served: {', '.join(ARCHITECTURES)}")

    def get(key, kind, default=None, required=True):
        if key not in data or data[key] is None:
            if required and default is None:
                raise CheckpointError(f"{path}: key {key!r} is missing")
            return default
        v = data[key]
        ok = isinstance(v, kind) and not (kind is not bool and isinstance(v, bool))
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            raise CheckpointError(f"{path}: key {key!r} is {v!r}, expected {kind.__name__}")
        if kind in (int, float) and v <= 0:
            raise CheckpointError(f"{path}: key {key!r} is {v!r}, expected a positive number")
        return v

    vocab, hidden = get("vocab_size", int), get("hidden_size", int)
    n_layer, n_head = get("num_hidden_layers", int), get("num_attention_heads", int)
    n_kv = get("num_key_value_heads", int, n_head)
    head_dim = get("head_dim", int, None, required=False) or hidden // n_head
    if n_head % n_kv:
        raise CheckpointError(f"{path}: key 'num_key_value_heads' is {n_kv}, which does not divide "
                              f"num_attention_heads {n_head}")
    if "head_dim" not in data and hidden % n_head:
        raise CheckpointError(f"{path}: key 'hidden_size' {hidden} is not a multiple of num_attention_heads {n_head}")
    if head_dim % 2:
        raise CheckpointError(f"{path}: key 'head_dim' is {head_dim}: RoPE needs an even head size")
    act = data.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{path}: key 'hidden_act' is {act!r}; only 'silu' is served")
    rope = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(scaling, dict):
        raise CheckpointError(f"{path}: key 'rope_parameters' / 'rope_scaling' is not an object")
    for key, d in (("rope_parameters", rope), ("rope_scaling", scaling)):
        kind = d.get("rope_type", d.get("type", "default"))
        if kind != "default":
            raise CheckpointError(f"{path}: key {key!r} asks for RoPE type {kind!r}; only the default RoPE is served")
    theta = rope.get("rope_theta", data.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise CheckpointError(f"{path}: key 'rope_theta' is {theta!r}, expected a positive number")
    if data.get("use_sliding_window"):
        raise CheckpointError(f"{path}: key 'use_sliding_window' is true; sliding-window attention is not served")
    quant = data.get("quantization_config")
    quant_method = quant.get("quant_method") if isinstance(quant, dict) else None
    bias = True if version == "2" else get("attention_bias", bool, False, required=False)
    return QwenConfig(
        version=version, vocab_size=vocab, hidden_size=hidden, intermediate_size=get("intermediate_size", int),
        n_layer=n_layer, n_head=n_head, n_kv_head=n_kv, head_dim=head_dim, rope_theta=float(theta),
        rms_norm_eps=get("rms_norm_eps", float, 1e-6), max_position_embeddings=get("max_position_embeddings", int),
        tie_word_embeddings=get("tie_word_embeddings", bool, False, required=False), qkv_bias=bool(bias),
        qk_norm=version == "3", quant_method=quant_method,
        quantization_config=dict(quant) if isinstance(quant, dict) else None,
        torch_dtype=data.get("torch_dtype") or data.get("dtype"))
