"""Qwen2 / Qwen3 against ``transformers`` on the same random weights: logits, greedy continuations, and the
sequence path against the one-token path."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import Model, TokenError
from rwkv_chat.models.qwen2.model import Qwen2

from .conftest import hf_greedy

VARIANTS = ("tied", "untied", "qwen3", "sharded")


def prompt(n: int, vocab: int = 320, seed: int = 5) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(qwen_folders, variant):
    folder, hf = qwen_folders[variant]
    model = Qwen2(folder, "cpu fp32", kernels=False)
    assert isinstance(model, Model) and model.family == "qwen2"
    assert model.version == ("3" if variant == "qwen3" else "2")
    ids = prompt(40)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    ours, state = model.forward(ids, None, full_output=True)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), float((ours - ref).abs().max())
    assert state.token_count == 40 and state.tokens[0].tolist() == ids


@pytest.mark.parametrize("variant", ("tied", "untied", "qwen3"))
def test_greedy_continuation_matches_transformers(qwen_folders, variant):
    folder, hf = qwen_folders[variant]
    model = Qwen2(folder, "cpu fp32", kernels=False)
    ids = prompt(12, seed=11)
    logits, state = model.forward(ids, None)
    ours = []
    for _ in range(32):
        t = int(logits.argmax())
        ours.append(t)
        logits, state = model.forward([t], state)
    assert ours == hf_greedy(hf, ids, 32)


def test_sequence_equals_one_by_one_and_chunks(qwen_folders):
    model = Qwen2(qwen_folders["qwen3"][0], "cpu fp32", kernels=False)
    ids = prompt(30, seed=3)
    seq, _ = model.forward(ids, None, full_output=True)
    state, rows = None, []
    for t in ids:
        logits, state = model.forward([t], state)
        rows.append(logits)
    assert torch.allclose(torch.stack(rows), seq, atol=1e-5, rtol=0)
    a, st = model.forward(ids[:13], None, full_output=True)
    b, st = model.forward(ids[13:], st, full_output=True)
    assert torch.allclose(torch.cat([a, b]), seq, atol=1e-5, rtol=0)


def test_forward_batch_equals_single(qwen_folders):
    model = Qwen2(qwen_folders["tied"][0], "cpu fp32", kernels=False)
    rows = [prompt(9, seed=s) for s in (1, 2, 3)]
    batched, state = model.forward_batch(rows, None)
    assert batched.shape == (3, model.vocab_size) and state.batch_size == 3
    for row, logits in zip(rows, batched):
        assert torch.allclose(model.forward(row, None)[0], logits, atol=1e-5, rtol=0)
    more, _ = model.forward_batch([[7], [8], [9]], state)
    for row, t, logits in zip(rows, (7, 8, 9), more):
        assert torch.allclose(model.forward(row + [t], None)[0], logits, atol=1e-5, rtol=0)


def test_random_shapes_folder_loads_in_both(tmp_path):
    from transformers import AutoModelForCausalLM

    from rwkv_chat.models.qwen2 import shapes

    folder = shapes.write_random(tmp_path / "tiny", "tiny", torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = Qwen2(folder, "cpu fp32", kernels=False)
    ids = prompt(24, vocab=ours.vocab_size)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours.forward(ids, None, full_output=True)[0], ref, atol=1e-4, rtol=0)
    n_layer, C, H, K, F, V, tied = shapes.SHAPES["1.5B"]
    assert shapes.config("1.5B")["num_hidden_layers"] == n_layer and shapes.config("1.5B")["tie_word_embeddings"]


def test_bad_tokens_are_token_errors(qwen_folders):
    model = Qwen2(qwen_folders["tied"][0], "cpu fp32", kernels=False)
    for bad in ([], [model.vocab_size], [-1], [1.5], ["a"]):
        with pytest.raises(TokenError):
            model.forward(bad, None)
    with pytest.raises(TokenError):
        model.forward_batch([[1, 2], [3]], None)


def test_bf16_logits_close_to_transformers_bf16(qwen_folders):
    folder, hf = qwen_folders["qwen3"]
    model = Qwen2(folder, "cpu bf16", kernels=False)
    ids = prompt(32, seed=9)
    ref16 = type(hf).from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        ref = ref16(torch.tensor([ids])).logits[0].float()
    ours = model.forward(ids, None, full_output=True)[0]
    rel = float((ours - ref).norm() / ref.norm())
    assert ours.dtype == torch.float32 and rel < 2e-2, rel
