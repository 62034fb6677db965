"""A tiny Qwen2 trained briefly on English text: the teacher of the weight-format checks (``test_formats``).

Random weights make a poor teacher for a quantization check (nearly tied logits, Gaussian matrices), so this
model learns bytes of real English first: ``transformers.Qwen2ForCausalLM`` (q/k/v biases, grouped-query
attention, RMSNorm, RoPE; the library's own initialization, normal with std ``initializer_range`` = 0.02) trained
with ``torch.optim.AdamW`` and a one-cycle learning rate on windows of English prose (``data/training_prose.txt``:
the prose of this repository's README.md and docs/architecture.md when it was written; bytes as token ids). The
evaluation text of the checks is another text (the story ``PROSE``), never seen in training.

Seeded throughout and run on one CPU thread (the global random state and thread count are left as they were),
so a given text gives the same model on every run with one CPU kind and torch build, whatever the number of
cores (one thread is also the fastest where the cores are busy: two threads on two busy cores took ten times
longer per step).
"""

from __future__ import annotations

from pathlib import Path

import torch

import transformers  # noqa: E402  (a test dependency)

#: the training text: the prose of this repository's README.md and docs/architecture.md as of when it was written
#: (outside code blocks, headings and tables; white space runs made one space), kept as a file so that editing
#: the documents does not change the teacher
TEXT = Path(__file__).resolve().parent / "data" / "training_prose.txt"
#: a vocabulary just above the 256 byte values; two layers, 128 wide (i4 groups of 128 rows: 128 divides every K),
#: four query heads sharing two key/value heads
CONFIG = dict(vocab_size=264, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
#: optimizer steps, windows per step, bytes per window, peak learning rate, weight decay, seed: ~9-12 s of one CPU
#: thread; the next-byte cross-entropy on ``PROSE`` falls from ln 264 = 5.58 nats to ~2.5 (the unigram of the
#: training text: 3.04)
RECIPE = dict(steps=150, batch=4, length=256, lr=5e-3, weight_decay=0.01, seed=0)


def training_text() -> bytes:
    """The training text (``TEXT``), UTF-8 bytes without the final line end."""
    return TEXT.read_bytes().rstrip(b"\n")


def train(text: bytes, steps: int, batch: int, length: int, lr: float, weight_decay: float, seed: int,
          **overrides) -> transformers.Qwen2ForCausalLM:
    """A Qwen2 of ``CONFIG`` (with ``overrides``) trained on ``text`` by next-byte cross-entropy, in eval mode.

    Each step takes ``batch`` windows of ``length + 1`` bytes at random offsets of ``text``; AdamW (betas 0.9,
    0.98) follows a one-cycle schedule (10% warm-up to ``lr``, cosine down). float32 on the CPU.
    """
    data = torch.tensor(list(text))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                    # the same sums on every machine, and no oversubscribed cores
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**CONFIG, **overrides}))
            g = torch.Generator().manual_seed(seed)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
            model.train()
            for _ in range(steps):
                starts = torch.randint(0, len(data) - length, (batch,), generator=g)
                x = torch.stack([data[s:s + length + 1] for s in starts.tolist()])
                logits = model(input_ids=x[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()
