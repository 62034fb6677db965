"""The weight formats on a tiny random Qwen2: top-1 agreement with the fp32 model over 512 positions of English
prose (bytes as token ids), the logits' relative error printed, and the i4 head kept in the activation dtype.

Random weights are harder than trained ones: the logits of this model are nearly tied (the top two within 0.1
standard deviation of the logits at ~29% of the positions, against ~2% for the trained tiny RWKV-6/7), and
its matrices are Gaussian, so the rounding noise of every matrix (i4 round-to-nearest: ~9% relative error per
matrix at group 64) compounds through the layers to ~32% on the logits. The measured shortfalls of the i8 and
i4 floors are strict xfails with their values; the i4 product itself is checked exactly against the fp32 model
whose matrices are the dequantized i4 ones (so a shortfall is the format's rounding, not a wrong product)."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.formats.i4 import quantize_i4
from rwkv_chat.models.qwen2.model import Qwen2

from ..formats.test_models import PROSE
from .conftest import build

#: the issue's floors; f8 has none (reported, and checked to be far above chance)
FLOORS = {"i8": 0.99, "i4": 0.95, "f8": 0.0}
#: measured on this model (seed 3, hidden 64, 3 layers, untied head): strict xfails, so a change that lifts them
#: shows up as a failure to update this table. i8 0.973 (q|k|v and gate|up quantized as joined matrices, whose
#: row ranges span the joined outputs; 0.978 with each matrix alone), i4 0.467 (hidden 128: 0.693), f8 0.873
#: (emulated exactly on the CPU); the logits' relative errors: 0.018 (0.015 alone), 0.32, 0.083.
SHORT = {"i8": 0.973, "i4": 0.467}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(folder, transformers model): a random untied Qwen2 with room for 512 positions."""
    hf = build("qwen2", seed=3, max_position_embeddings=1024, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("qwen-formats")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def teacher(folder):
    return Qwen2(folder[0], "cpu fp32", kernels=False).forward(list(PROSE), None, full_output=True)[0]


@pytest.mark.parametrize("quant", ["i8", "i4", "f8"])
def test_top1_agreement_with_the_fp32_model(quant, folder, teacher, request):
    if quant in SHORT:
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{quant} on a random 64-wide Qwen2 agrees "
                                                                  f"{SHORT[quant]:.3f} < {FLOORS[quant]}: nearly "
                                                                  "tied logits of random weights (module docstring)"))
    model = Qwen2(folder[0], f"cpu fp32{quant}", kernels=False)
    assert isinstance(model.head, torch.Tensor) == (quant == "i4")       # i4 keeps lm_head in fp32
    student = model.forward(list(PROSE), None, full_output=True)[0]
    agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    rel = ((student - teacher).norm() / teacher.norm()).item()
    print(f"qwen2 {quant}{' (emulated)' if quant == 'f8' else ''}: top-1 agreement {agree:.4f} over {len(PROSE)} "
          f"positions, logits relative error {rel:.4f}")
    assert agree > 0.3, (agree, rel)           # far above chance (1/320) whatever the floor
    assert agree >= FLOORS[quant], (agree, rel)


def test_i4_logits_are_those_of_the_dequantized_matrices(folder):
    """Our ``cpu fp32i4`` equals ``transformers`` with every Linear but ``lm_head`` replaced by its round-to-nearest
    i4 matrix dequantized (plain torch), and the plan names the float head."""
    path, hf = folder
    model = Qwen2(path, "cpu fp32i4", kernels=False)
    assert "weights i4 (head in float32)" in str(model.plan)
    ids = torch.tensor([list(PROSE[:96])])
    ref = type(hf)(hf.config).eval()
    ref.load_state_dict(hf.state_dict())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                mod.weight.copy_(quantize_i4(mod.weight.t()).dequantize(torch.float32).t())
        want = ref(ids).logits[0]
    got = model.forward(ids[0].tolist(), None, full_output=True)[0]
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())
