"""Random-weight Qwen2 checkpoint folders of the official shapes (for speed work and golden checks on a GPU).

=====  =======  ======  ===========  =====  ======  ======
name   n_layer  hidden  heads (q/kv)  FFN    vocab   tied
=====  =======  ======  ===========  =====  ======  ======
0.5B   24       896     14 / 2        4864   151936  yes
1.5B   28       1536    12 / 2        8960   151936  yes
7B     28       3584    28 / 4        18944  152064  no
=====  =======  ======  ===========  =====  ======  ======

(Qwen2.5 ``config.json`` files: head size 128 for 1.5B/7B, 64 for 0.5B; rope_theta 1e6; rms_norm_eps 1e-6.)
``config(name)`` is the ``config.json`` (also ``transformers.Qwen2Config(**config(name))``); ``write_random`` writes
a folder that ``Qwen2`` and ``transformers.AutoModelForCausalLM`` both load. Matrices ~ U(±√(3/fan_in))·0.5,
norms around 1, biases small, so activations stay in the fp16 range.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from rwkv_chat.models.errors import ShapeMismatchError

#: name -> (n_layer, hidden, heads, kv heads, FFN, vocab, tied embeddings)
SHAPES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "0.5B": (24, 896, 14, 2, 4864, 151936, True),
    "1.5B": (28, 1536, 12, 2, 8960, 151936, True),
    "7B": (28, 3584, 28, 4, 18944, 152064, False),
}


def config(name: str, max_position_embeddings: int = 32768) -> dict:
    """The ``config.json`` of shape ``name`` (a key of ``SHAPES``, or "tiny": 2 layers × 64 for tests).
    Raises ShapeMismatchError for an unknown name."""
    if name == "tiny":
        n_layer, C, H, K, F, V, tied = 2, 64, 4, 2, 128, 512, True
    elif name in SHAPES:
        n_layer, C, H, K, F, V, tied = SHAPES[name]
    else:
        raise ShapeMismatchError(f"unknown Qwen2 shape {name!r}; known: tiny, {', '.join(SHAPES)}")
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "vocab_size": V, "hidden_size": C, "intermediate_size": F, "num_hidden_layers": n_layer,
            "num_attention_heads": H, "num_key_value_heads": K, "max_position_embeddings": max_position_embeddings,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied, "use_sliding_window": False,
            "torch_dtype": "bfloat16"}


def random_weights(name: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random weights of shape ``name`` under the Hugging Face keys (``checkpoint.expected_shapes``)."""
    from rwkv_chat.models.qwen2.checkpoint import expected_shapes
    from rwkv_chat.models.qwen2.config import QwenConfig

    c = config(name)
    cfg = QwenConfig(version="2", vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                     intermediate_size=c["intermediate_size"], n_layer=c["num_hidden_layers"],
                     n_head=c["num_attention_heads"], n_kv_head=c["num_key_value_heads"],
                     head_dim=c["hidden_size"] // c["num_attention_heads"], rope_theta=c["rope_theta"],
                     rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
                     tie_word_embeddings=c["tie_word_embeddings"], qkv_bias=True, qk_norm=False)
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for key, shape in expected_shapes(cfg).items():
        if len(shape) == 2:
            bound = 0.5 * math.sqrt(3.0 / shape[1])
            t = (torch.rand(shape, generator=g, device=device) * 2 - 1) * bound
        elif key.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g, device=device)
        else:
            t = 0.02 * torch.randn(shape, generator=g, device=device)
        out[key] = t.to(dtype).contiguous()
    return out


def write_random(folder: str | Path, name: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                 device: str | torch.device = "cpu") -> Path:
    """Write ``config.json`` and ``model.safetensors`` of random weights of shape ``name`` into ``folder``
    (created). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    w = random_weights(name, dtype, seed, device)
    save_file({k: t.cpu() for k, t in w.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config(name), indent=2))
    return folder
