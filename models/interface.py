"""The one interface the daemon, the benchmark and the doctor use for every model family.

``load_model(path, strategy)`` reads the files, picks the family (an RWKV ``.pth`` / ``.safetensors`` file, or a
Hugging Face Qwen2 / Qwen3 checkpoint folder) and returns an object that satisfies ``Model``. Everything behind it —
generations, weight formats, backends, kernels — is the family's own business.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from rwkv_chat.models.errors import CheckpointError, TokenError
from rwkv_chat.models.state import State
from rwkv_chat.models.strategy import Plan


@runtime_checkable
class Model(Protocol):
    """A language model placed on devices by a strategy, with its conversation state, tokenizer and chat
    template.

    Attributes:
        family: "rwkv" or "qwen2" (Qwen2ForCausalLM and Qwen3ForCausalLM checkpoints).
        version: the family's generation (RWKV: "4", "5", "5.1", "5.2", "6", "7"; qwen2: "2" or "3").
        fingerprint: identifies the weights; a State carries it, and states of other weights are refused.
        vocab_size: logits per position.
        plan: which layer lives on which device in which dtype, and which backend serves it.
        backend: the backend chosen at load (``rwkv_chat.models.backends.Backend``: ``backend.name`` such as
            "fused-cuda", ``str(backend)`` with a one-line detail).
        devices: the torch device of every layer (the head last).
        tokenizer: ``rwkv_chat.models.text.tokenizers.Tokenizer`` of this model.
        chat_template: how a conversation becomes text (``rwkv_chat.models.text.templates``).

    A transformer family's state is its KV cache (``rwkv_chat.models.qwen2.cache.KVState``, a ``State``) and it has
    ``context_limit``: the most tokens a state holds (``ContextLimitError`` past it; ``state.token_count`` is
    what a state holds).
    """

    family: str
    version: str
    fingerprint: str
    vocab_size: int
    plan: Plan

    @property
    def backend(self): ...

    @property
    def devices(self) -> list[torch.device]: ...

    @property
    def tokenizer(self): ...

    @property
    def chat_template(self): ...

    def forward(self, tokens, state: State | None, full_output: bool = False) -> tuple[torch.Tensor, State]:
        """Tokens (T >= 1) from ``state`` (None: the zero state) -> float32 logits [vocab] (or [T, vocab])
        and a new State; the given state is not modified."""

    def forward_batch(self, tokens: list[list[int]], state: State | None,
                      full_output: bool = False) -> tuple[torch.Tensor, State]:
        """B sequences of equal length -> float32 [B, vocab] (or [B, T, vocab]) and the batched State."""

    def zero_state(self, batch: int = 1) -> State:
        """A fresh state for ``batch`` sequences."""

    def place_state(self, state: State) -> State:
        """``state`` checked against this model (StateError) and moved to its devices and dtypes."""

    def load_state(self, path: str | Path) -> State:
        """A state file read and placed on this model (StateError)."""

    def use_kernels(self):
        """Re-choose the backend with the compiled kernels for a model loaded with ``kernels=False`` (between
        forwards; the results agree to rounding and states carry over; a decoder made before must be made
        again). Returns the new backend."""

    def decoder(self, max_batch: int = 1, buckets: tuple[int, ...] | None = None):
        """A batched decoder with ``max_batch`` slots: conversations join and leave between one-token steps
        (``add(state) -> handle``, ``step({handle: token}) -> {handle: float32 [vocab]}``, ``remove(handle) ->
        State``; see ``rwkv_chat.models.rwkv.decode.BatchDecoder``). ``buckets``: the batch sizes a step may run
        at (None: the family's default)."""


def load_model(path: str | Path, strategy: str, *, tokenizer: str | Path | None = None,
               progress: Callable[[int, int], None] | None = None, kernels: bool = True,
               context_limit: int | None = None) -> Model:
    """Load any supported checkpoint.

    Args:
        path: an RWKV ``.pth`` / ``.safetensors`` file, or a Hugging Face checkpoint folder whose ``config.json``
            names ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (its tokenizer, chat template and generation
            defaults come from the folder: ``rwkv_chat.models.text.hf.load_hf_text``).
        strategy: the strategy string (``rwkv_chat.models.strategy``), e.g. ``"cuda fp16i8 *10 -> cpu fp32"``.
        tokenizer: "world", "neox", "bytes" or a tokenizer file; None picks by the vocabulary size.
        progress: ``progress(done, total)`` while the layers are placed (units: layers).
        kernels: use the compiled kernels where they build (the numbers agree to rounding either way).
        context_limit: for a transformer, the most tokens a conversation's KV cache holds (None: the checkpoint's
            ``max_position_embeddings``, which also caps it); ignored for RWKV.
    Returns:
        A ``Model``.
    Raises:
        CheckpointError, StrategyError, DeviceError, TokenizerError: see those classes.
    """
    from rwkv_chat.models.qwen2.config import check_not_a_folder_file, is_qwen_folder, read_config

    p = Path(str(path).strip()).expanduser()
    check_not_a_folder_file(p)
    if p.is_dir():
        if not is_qwen_folder(p):
            if (p / "config.json").is_file():
                read_config(p)          # says what is wrong with it: not JSON, another architecture
            raise CheckpointError(f"{p} is a folder without a config.json naming Qwen2ForCausalLM or "
                                  "Qwen3ForCausalLM (RWKV checkpoints are .pth / .safetensors files)")
        return _load_qwen(p, strategy, progress, kernels, context_limit)
    from rwkv_chat.models.rwkv.model import RWKV
    from rwkv_chat.models.text.tokenizers import load_tokenizer

    model = RWKV(model=p, strategy=strategy, progress=progress, kernels=kernels)
    model.tokenizer = load_tokenizer(tokenizer or None, vocab_size=model.vocab_size, model_path=model.path)
    return model


def _load_qwen(folder: Path, strategy: str, progress, kernels: bool, context_limit: int | None) -> Model:
    """A Qwen2 / Qwen3 folder as a ``Qwen2`` with the folder's tokenizer, chat template and generation defaults."""
    from rwkv_chat.models.errors import TokenizerError
    from rwkv_chat.models.qwen2.config import read_config
    from rwkv_chat.models.qwen2.model import Qwen2

    try:
        from rwkv_chat.models.text.hf import load_hf_text
    except ImportError as e:
        raise TokenizerError(f"{folder}: Hugging Face tokenizers are not supported by this build: {e}") from None
    text = load_hf_text(folder, read_config(folder).vocab_size)     # the text first: a bad tokenizer fails fast
    model = Qwen2(folder, strategy, context_limit=context_limit, progress=progress, kernels=kernels)
    model.tokenizer, model.chat_template, model.generation = text.tokenizer, text.chat_template, text.generation
    return model


def token_ids(tokens, vocab_size: int) -> list[int]:
    """``tokens`` (ints, an int, or a tensor of any shape, flattened) as a non-empty list of ids in
    ``[0, vocab_size)``: the check every family's ``forward`` makes first.

    Raises:
        TokenError: a non-integer token, no tokens, or a token outside the vocabulary (the first five named).
    """
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.reshape(-1).tolist()
    elif isinstance(tokens, int):
        tokens = [tokens]
    try:
        ids = [int(t) for t in tokens]
    except (TypeError, ValueError) as e:
        raise TokenError(f"tokens must be integers: {e}") from e
    if any(i != t for i, t in zip(ids, tokens)):
        raise TokenError(f"tokens must be integers, got {list(tokens)[:5]}")
    if not ids:
        raise TokenError("no tokens to process")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise TokenError(f"tokens outside the vocabulary [0, {vocab_size}): {bad[:5]}")
    return ids
