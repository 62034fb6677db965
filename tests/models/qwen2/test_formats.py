"""The weight formats on a tiny Qwen2 trained briefly on English (``trained``): top-1 agreement with the fp32 model
over 512 positions of English prose it never saw in training (the story ``PROSE``, bytes as token ids), the
logits' relative error printed, and the i4 head kept in the activation dtype.

The teacher is trained, not random: random weights give nearly tied logits and Gaussian matrices, so the rounding
noise of every matrix compounds through the layers and flips the top-1 at the near ties (on a random 64-wide
Qwen2: i8 0.973, i4 0.467, f8 0.873). The floors are the issue's (i8 >= 0.99, i4 >= 0.95 at group 128, which
divides every K of this 128-wide model); f8 has none and is reported, emulated exactly on the CPU, and checked to
be far above chance. The i4 product itself is checked exactly against the fp32 model whose matrices are the
dequantized i4 ones (so a shortfall would be the format's rounding, not a wrong product)."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models.formats.i4 import quantize_i4
from rwkv_chat.models.qwen2.model import Qwen2

from ..formats.test_models import PROSE
from .trained import RECIPE, train, training_text

#: the issue's floors; f8 has none (reported, and checked to be far above chance). Measured on the teacher of
#: ``trained.RECIPE`` (seed 0) on ``data/training_prose.txt``: i8 1.000, i4 0.996, f8 0.992 (logits' relative
#: errors 0.0007, 0.0062, 0.0043). On the documents' prose of an earlier tree: i4 0.986, seeds 1 and 2 0.994 and
#: 0.988; trained longer (200 steps, seeds 0-2) i4 0.967, 0.980, 0.996, i8 0.994-1.000: still above the floors.
FLOORS = {"i8": 0.99, "i4": 0.95, "f8": 0.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(folder, transformers model): the tiny Qwen2 of ``trained`` (untied head, room for 1024 positions)."""
    text = training_text()
    assert PROSE not in text                    # the evaluation text is no training text
    hf = train(text, **RECIPE)
    path = tmp_path_factory.mktemp("qwen-formats")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def teacher(folder):
    return Qwen2(folder[0], "cpu fp32", kernels=False).forward(list(PROSE), None, full_output=True)[0]


def test_the_teacher_predicts_unseen_prose_better_than_byte_frequencies(teacher):
    """The trained teacher knows English beyond byte frequencies: its next-byte cross-entropy on ``PROSE`` is below
    that of the unigram model of its training text (add-one counts), in each half of the 512 positions (the second
    half lies past the 256-byte training windows)."""
    ids = torch.tensor(list(PROSE))
    counts = torch.bincount(torch.tensor(list(training_text())), minlength=teacher.shape[-1]).double() + 1
    unigram = -(counts / counts.sum()).log()[ids[1:]]
    ce = torch.nn.functional.cross_entropy(teacher[:-1].double(), ids[1:], reduction="none")
    half = len(ce) // 2
    print(f"teacher next-byte cross-entropy on PROSE {ce.mean():.3f} nats (halves {ce[:half].mean():.3f}, "
          f"{ce[half:].mean():.3f}); unigram of the training text {unigram.mean():.3f}")
    assert ce[:half].mean() < unigram[:half].mean() and ce[half:].mean() < unigram[half:].mean()


@pytest.mark.parametrize("quant", ["i8", "i4", "f8"])
def test_top1_agreement_with_the_fp32_model(quant, folder, teacher):
    model = Qwen2(folder[0], f"cpu fp32{quant}", kernels=False)
    assert isinstance(model.head, torch.Tensor) == (quant == "i4")       # i4 keeps lm_head in fp32
    student = model.forward(list(PROSE), None, full_output=True)[0]
    agree = (student.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    rel = ((student - teacher).norm() / teacher.norm()).item()
    print(f"qwen2 {quant}{' (emulated)' if quant == 'f8' else ''}: top-1 agreement {agree:.4f} over {len(PROSE)} "
          f"positions, logits relative error {rel:.4f}")
    assert agree > 0.3, (agree, rel)           # far above chance (1/264) whatever the floor
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
