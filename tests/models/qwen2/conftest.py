"""Tiny random Qwen2 / Qwen3 checkpoints built with ``transformers`` (the golden reference) in a temporary folder.

Every parameter is drawn afresh (norm weights around 1, biases and matrices small), so a wrong RMSNorm, bias or
RoPE convention shows in the logits. Built once per session; the ``transformers`` model is returned beside its
folder for the golden comparisons.
"""

from __future__ import annotations

import pytest
import torch

import transformers  # noqa: E402  (a test dependency)

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6)

VARIANTS = {
    "tied": ("qwen2", dict(tie_word_embeddings=True)),
    "untied": ("qwen2", dict(tie_word_embeddings=False, num_hidden_layers=2, rope_theta=1e6,
                             max_position_embeddings=1024)),
    "qwen3": ("qwen3", dict(tie_word_embeddings=False, head_dim=32, attention_bias=True, num_hidden_layers=2)),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def build(kind: str, seed: int = 0, **overrides):
    """A random ``transformers`` model (eval mode, float32) of ``kind`` ("qwen2" or "qwen3")."""
    kw = {**BASE, **overrides}
    if kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    randomize(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def qwen_folders(tmp_path_factory):
    """variant -> (folder, transformers model); also "sharded": the tied model saved in several shards."""
    out = {}
    for i, (name, (kind, kw)) in enumerate(VARIANTS.items()):
        model = build(kind, seed=i, **kw)
        folder = tmp_path_factory.mktemp(f"qwen-{name}")
        model.save_pretrained(folder)
        out[name] = (folder, model)
    folder = tmp_path_factory.mktemp("qwen-sharded")
    out["tied"][1].save_pretrained(folder, max_shard_size="60KB")
    out["sharded"] = (folder, out["tied"][1])
    return out


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` by ``transformers`` (full recomputation each step)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def continue_greedy(model, logits, state, n: int):
    """``(n greedy tokens, the last logits)`` of our model fed one token at a time after ``logits`` / ``state``."""
    out = []
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits, state = model.forward([t], state)
    return out, logits
