"""The Model interface (models/interface.py): ``load_model`` on each tiny model returns a ``Model`` whose
forward equals ``RWKV(...).forward``; the backend, devices, tokenizer, chat template and decoder it offers;
weight formats by strategy suffix."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import RWKV, Model, State, StrategyError, load_model

VERSIONS = ("4", "5", "5.2", "6", "7")
PROMPT = [int(c) for c in b"The interface"]


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16i8"])
@pytest.mark.parametrize("version", VERSIONS)
def test_load_model_is_a_model_with_the_forward_of_rwkv(model_path, version, strategy):
    model = load_model(model_path(version), strategy)
    assert isinstance(model, Model) and isinstance(model, RWKV)
    assert model.family == "rwkv" and model.version == version
    ref = RWKV(str(model_path(version)), strategy)
    got, st = model.forward(PROMPT, None, full_output=True)
    want, st_ref = ref.forward(PROMPT, None, full_output=True)
    assert torch.equal(got, want)
    for a, b in zip(st, st_ref):
        assert torch.equal(a, b)
    assert model.tokenizer.name == "bytes" and model.tokenizer.decode(model.tokenizer.encode("abc")) == "abc"
    assert model.chat_template.prompt("hi") == "User: hi\n\nAssistant:"
    assert model.devices == [torch.device("cpu")] * (model.n_layer + 1)
    assert model.backend.name in str(model.plan)


def test_tokenizer_defaults_by_vocabulary_size(model_path):
    model = RWKV(str(model_path("7")), "cpu fp32")
    assert model.tokenizer.name == "bytes"           # 256 tokens: loaded at first use


def test_decoder_of_the_model(model_path):
    model = load_model(model_path("7"), "cpu fp32")
    logits, state = model.forward(PROMPT, None)
    dec = model.decoder(max_batch=2)
    assert dec.buckets == (1, 2)
    h = dec.add(state)
    tok = int(torch.argmax(logits))
    out = dec.step({h: tok})[h]
    want, _ = model.forward([tok], state)
    assert torch.allclose(out, want, rtol=1e-5, atol=1e-5)
    assert isinstance(dec.remove(h), State)
    assert model.decoder(max_batch=4, buckets=(2,)).buckets == (2, 4)


def test_weight_formats_by_suffix(model_path):
    from rwkv_chat.models import formats
    from rwkv_chat.models.formats.i8 import Int8Weight

    fp, i8 = formats.get(None), formats.get("i8")
    assert formats.get("") is fp and isinstance(fp, formats.WeightFormat) and isinstance(i8, formats.WeightFormat)
    with pytest.raises(StrategyError, match="i3"):
        formats.get("i3")
    w = torch.randn(48, 32)
    x = torch.randn(3, 48)
    for fmt in (fp, i8):
        packed = fmt.pack(w, torch.float32, torch.device("cpu"))
        assert formats.format_of(packed) is fmt
        y = fmt.matmul(x, packed, output_dtype=torch.float64)
        assert y.shape == (3, 32) and y.dtype == torch.float64
        assert torch.allclose(y.float(), formats.matmul_with(None)(x, packed), rtol=1e-6, atol=1e-6)
    q = i8.pack(w, torch.float32, torch.device("cpu"))
    assert isinstance(q, Int8Weight) and formats.nbytes(q) == q.nbytes() < formats.nbytes(w) == 48 * 32 * 4
    with pytest.raises(StrategyError, match="i3"):
        load_model(model_path("7"), "cpu fp32i3")
