"""``Qwen2``: a Hugging Face Qwen2 / Qwen3 checkpoint folder placed on devices by a strategy; its state is the
KV cache (``cache.KVState``).

    model = Qwen2("path/to/Qwen2.5-1.5B-Instruct", "cuda bf16")
    logits, state = model.forward([9707, 11, 1879], None)            # float32 [vocab]
    logits, state = model.forward(tokens, state, full_output=True)   # float32 [T, vocab]

The strategy grammar is the one of every family (``rwkv_chat.models.strategy``): ``n_layer + 1`` layers, the head
(final RMSNorm + ``lm_head``) last; per stage a device, an activation dtype and a weight format (``i8`` through
``rwkv_chat.models.formats``); ``*N`` pins layers, ``*N+`` streams the unassigned ones. The embedding table lives
with layer 0. ``forward`` never modifies the state it is given. ``Qwen2`` satisfies ``rwkv_chat.models.Model``.

Pre-quantized GPTQ folders (4-bit, ``checkpoint.py``) load their packed matrices as stored
(``formats.i4.gptq_linear``, no re-quantizing): every stage of the strategy must then use the ``i4`` format
(``cuda fp16i4``, ``cpu fp32i4``), else it is a ``StrategyError`` naming the stage and the strategy that works.
``lm_head`` is i4 where the checkpoint quantized it (the plan's head then says ``i4``), else float in the
activation dtype as for every ``i4`` stage.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from rwkv_chat.models import formats
from rwkv_chat.models.errors import CheckpointError, ContextLimitError, StateError, StrategyError, TokenError
from rwkv_chat.models.interface import token_ids
from rwkv_chat.models.qwen2.cache import NAMES, KVState
from rwkv_chat.models.qwen2.checkpoint import open_checkpoint
from rwkv_chat.models.qwen2.config import QwenConfig, read_config
from rwkv_chat.models.qwen2 import attend as attending
from rwkv_chat.models.qwen2 import weights
from rwkv_chat.models.qwen2.layers import QwenOps, block, rope_table, to_layer
from rwkv_chat.models.strategy import Plan, plan_layers, torch_device

class TorchBackend:
    """What serves a Qwen model: the layer functions of ``layers.py`` on ``ops`` (``QwenOps``).

    Attributes:
        name: "torch" (pure torch, ``kernels=False``) or "eager" (``kernels=True``: the compiled products of the
            weight formats where built; on one CUDA device in fp16/bf16, the Triton ops of ``rwkv_chat.models.ops`` that run there,
            see ``fused.fused_ops``).
        detail: one line (which ops serve). ops: the ``QwenOps`` the block calls.
    """

    def __init__(self, compiled: bool, ops: QwenOps, note: str = "", quants: tuple[str, ...] = ()):
        self.ops, self.compiled = ops, compiled
        self.name = "eager" if compiled else "torch"
        products = f", compiled {' / '.join(quants)} products where built" if quants else ""
        self.detail = (note or "torch ops") + ", SDPA prefill attention" + products

    def __str__(self) -> str:
        return f"{self.name} ({self.detail})"


class Qwen2:
    """A Qwen2-architecture model (``Qwen2ForCausalLM``; ``Qwen3ForCausalLM`` with q/k norm) on a strategy.

    Args:
        model: a Hugging Face checkpoint folder (``config.json`` + ``*.safetensors``).
        strategy: e.g. ``"cpu fp32"``, ``"cuda bf16"``, ``"cuda fp16i8 *10 -> cpu fp32"``.
        context_limit: the most tokens a conversation's KV cache holds; None: ``max_position_embeddings`` of
            config.json (also the cap of any value given).
        progress: ``progress(done, total)`` while the layers are placed (units: layers, total = n_layer + 1).
        kernels: use compiled products where built (the i8 GEMV); False: pure torch. Results agree to rounding.
    Attributes:
        family: "qwen2". version: "2" (Qwen2) or "3" (Qwen3). config: ``QwenConfig``. fingerprint: of the weights.
        plan, devices, backend: as every ``Model``. context_limit: tokens. n_layer, n_embd, vocab_size: sizes.
        tokenizer, chat_template, generation: set by ``load_model`` from the folder's tokenizer files (None here).
    Raises:
        CheckpointError, StrategyError, DeviceError: see those classes. StateError: a context_limit below 1.
    """

    family = "qwen2"

    def __init__(self, model: str | Path, strategy: str, *, context_limit: int | None = None,
                 progress: Callable[[int, int], None] | None = None, kernels: bool = True, verbose: bool = False):
        self.path = Path(str(model).strip()).expanduser()
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a folder (a Hugging Face Qwen2 checkpoint is a folder with "
                                  "config.json and *.safetensors)")
        self.config: QwenConfig = read_config(self.path)
        ck = open_checkpoint(self.path, self.config)
        self.fingerprint = ck.fingerprint
        cfg = self.config
        limit = cfg.max_position_embeddings
        if context_limit is not None:
            if isinstance(context_limit, bool) or not isinstance(context_limit, int) or context_limit < 1:
                raise StateError(f"context_limit must be a positive integer, got {context_limit!r}")
            limit = min(limit, context_limit)
        self.context_limit = limit
        self.plan: Plan = plan_layers(strategy, cfg.n_layer)
        if ck.gptq is not None:
            self.plan = gptq_plan(self.plan, self.path, ck.head_quantized)
        self.strategy = self.plan.strategy
        self.devices: list[torch.device] = [torch_device(p.device) for p in self.plan.layers]
        formats.check_plan(self.plan, self.devices)          # a format its device cannot run: DeviceError
        self.tokenizer = self.chat_template = self.generation = None
        with torch.no_grad():
            self._place(ck, progress)
        ck.close()
        # float32 [limit + 1, D]: a full slot of the batched decoder, not fed, still computes its next position
        self._cos, self._sin = rope_table(cfg.rope_theta, cfg.head_dim, limit + 1)
        self._rope: dict = {}
        self._choose(kernels)
        if verbose:
            print(f"Qwen{cfg.version} {self.path.name}: {cfg.n_layer} layers, hidden {cfg.hidden_size}, "
                  f"vocab {cfg.vocab_size}\n{self.plan}")

    # -- attributes --------------------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.config.version

    @property
    def n_layer(self) -> int:
        return self.config.n_layer

    @property
    def n_embd(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # -- loading ---------------------------------------------------------------------------------
    def _place(self, ck, progress) -> None:
        weights.place(self, ck, progress)

    def _choose(self, kernels: bool, gemv: str | None = None) -> None:
        from rwkv_chat.models.qwen2.fused import DEFAULT_GEMV, GEMV_MODES

        gemv = DEFAULT_GEMV if gemv is None else gemv
        if gemv not in GEMV_MODES:
            raise ValueError(f"gemv must be one of {GEMV_MODES}, not {gemv!r}")
        self.kernels: dict[str, dict[str, str]] = {}
        table = None
        if kernels and any(s.quant for s in self.plan.stages):
            from rwkv_chat.models import kernels as compiled
            from rwkv_chat.models.kernels import dispatch

            for dev in sorted({d.type for d in self.devices}):
                self.kernels[dev] = compiled.ensure_built(dev)
            dispatch.probe_weight_kernels(self)
            table = {f.packed_type: getattr(dispatch, f.kernel) for f in formats.FORMATS.values() if f.kernel}
        ops, note = QwenOps(matmul=formats.matmul_with(table)), ""
        dtypes = {p.atype for p in self.plan.layers}
        if kernels and len(set(self.devices)) == 1 and self.devices[0].type == "cuda" and len(dtypes) == 1:
            from rwkv_chat.models.qwen2.fused import fused_ops

            if gemv.startswith("compiled") and "cuda" not in self.kernels:
                from rwkv_chat.models import kernels as compiled

                self.kernels["cuda"] = compiled.ensure_built("cuda")
            ops, note = fused_ops(ops, self.devices[0], dtypes.pop(), gemv=gemv)
            self.kernels.setdefault("cuda", {})["triton"] = note
        quants = tuple(sorted({s.quant for s in self.plan.stages if s.quant})) if table is not None else ()
        self.backend = TorchBackend(bool(kernels), ops, note, quants)
        self.plan = replace(self.plan, backend=str(self.backend))

    def use_kernels(self, gemv: str | None = None):
        """Re-choose the backend with the compiled products (between forwards; states carry over; a decoder made
        before must be made again). ``gemv``: how the products of 1..4 rows run on CUDA (``fused.GEMV_MODES``;
        None: ``fused.DEFAULT_GEMV``): "compiled-norm" (the default: the compiled grouped GEMV of ``csrc/fused`` with
        the residual adds and RMSNorms inside its launches, built on first use; cuBLAS where it is not built),
        "compiled" (the same with separate RMSNorm launches), "cublas" or "triton" (``ops.norm_gemv``). Returns the
        new backend. Raises ValueError for another ``gemv``."""
        with torch.no_grad():
            self._choose(True, gemv)
        return self.backend

    def layer_params(self, i: int) -> dict:
        """Layer i's parameters on its device (a streamed layer's copied in from pinned memory)."""
        p = self.layers[i]
        if not self.plan.layers[i].stream:
            return p
        dev = self.devices[i]

        def move(v):
            if isinstance(v, tuple):
                return tuple(move(t) for t in v)
            return v.to(dev, non_blocking=True) if v.device != dev else v

        return {k: move(v) for k, v in p.items()}

    def head_weight(self):
        """The head matrix [C, vocab] on the head's device."""
        if self.plan.layers[-1].stream:
            return self.head.to(self.devices[-1], non_blocking=True)
        return self.head

    def rope_tables(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [context_limit + 1, D] of every position, on ``device`` in ``dtype`` (made once, kept)."""
        key = (device, dtype)
        tables = self._rope.get(key)
        if tables is None:
            tables = self._rope[key] = (self._cos.to(device, dtype), self._sin.to(device, dtype))
        return tables

    def decoder(self, max_batch: int = 1, buckets: tuple[int, ...] | None = None, graphs: bool | None = None):
        """A ``Qwen2Decoder`` (``rwkv_chat.models.qwen2.decode``) with ``max_batch`` slots of any cache lengths;
        ``graphs``: CUDA graphs of the steps (default: on one CUDA device). Raises StateError for ``max_batch`` < 1."""
        from rwkv_chat.models.qwen2.decode import DEFAULT_BUCKETS, Qwen2Decoder

        return Qwen2Decoder(self, max_batch, DEFAULT_BUCKETS if buckets is None else tuple(buckets), graphs=graphs)

    # -- state -------------------------------------------------------------------------------------
    def zero_state(self, batch: int = 1) -> KVState:
        """An empty KV cache for ``batch`` sequences (no positions)."""
        cfg = self.config
        layers = [tuple(torch.zeros(batch, cfg.n_kv_head, 0, cfg.head_dim, device=self.devices[i],
                                    dtype=self.plan.layers[i].atype) for _ in NAMES) for i in range(cfg.n_layer)]
        return KVState(self.version, self.fingerprint, NAMES, layers, 0, tokens=torch.zeros(batch, 0, dtype=torch.long))

    def place_state(self, state) -> KVState:
        """``state`` checked against this model and moved to its devices and activation dtypes.

        Raises:
            StateError: not a KV cache, another model's (fingerprint, version), another layout, or longer than the
                context limit.
        """
        if not isinstance(state, KVState):
            raise StateError(f"expected the KV cache of a Qwen model, got {type(state).__name__}")
        if state.fingerprint != self.fingerprint or state.version != self.version:
            raise StateError(f"state belongs to another model (qwen{state.version}, {state.fingerprint}); this is "
                             f"qwen{self.version}, {self.fingerprint}")
        cfg = self.config
        if state.n_layer != cfg.n_layer or any(k.shape[1] != cfg.n_kv_head or k.shape[3] != cfg.head_dim
                                               for k, _ in state.layers):
            raise StateError("state layout does not match this model")
        if state.token_count > self.context_limit:
            raise ContextLimitError(f"the state holds {state.token_count} tokens, past this model's context limit "
                                    f"of {self.context_limit}", limit=self.context_limit, needed=state.token_count)
        return state.with_layers([tuple(t.to(device=self.devices[i], dtype=self.plan.layers[i].atype) for t in kv)
                                  for i, kv in enumerate(state.layers)])

    def load_state(self, path: str | Path) -> KVState:
        """Read a KV cache file (``KVState.save``) and place it on this model. Raises StateError naming the file."""
        state = KVState.load(path)
        try:
            return self.place_state(state)
        except StateError as e:
            raise type(e)(f"state file {path}: {e}") from None

    # -- inference -------------------------------------------------------------------------------
    def check_tokens(self, tokens) -> list[int]:
        """``tokens`` (ints, an int or a 1-D tensor) as a non-empty list of ids in the vocabulary (TokenError)."""
        return token_ids(tokens, self.vocab_size)

    def forward(self, tokens, state: KVState | None, full_output: bool = False):
        """Run tokens through the model after ``state``.

        Args:
            tokens: int token ids (a list, an int or a 1-D tensor), T >= 1.
            state: the KV cache to continue (batch 1), or None for an empty one. Not modified.
            full_output: logits of every position instead of the last.
        Returns:
            ``(logits, state)``: float32 [vocab] (or [T, vocab]) on the head's device; the new KVState.
        Raises:
            TokenError: empty or out-of-vocabulary tokens. StateError: another model's state or a batched one.
            ContextLimitError: the cache would hold more than ``context_limit`` tokens.
        """
        ids = self.check_tokens(tokens)
        state = self.zero_state() if state is None else self.place_state(state)
        if state.batch_size != 1:
            raise StateError(f"forward takes a state of batch 1, got {state.batch_size}; use forward_batch")
        logits, new = self._run(torch.tensor([ids], dtype=torch.long), state, full_output)
        return (logits[0] if full_output else logits[0, -1]), new

    def forward_batch(self, tokens: list[list[int]], state: KVState | None, full_output: bool = False):
        """B sequences of equal length T after a batched state of one length (``KVState.stack``; None: empty) ->
        ``(float32 [B, vocab] or [B, T, vocab], the new batched KVState)``. Raises as ``forward``."""
        rows = [self.check_tokens(t) for t in tokens]
        if not rows or len({len(r) for r in rows}) != 1:
            raise TokenError("forward_batch needs one or more sequences of equal length")
        state = self.zero_state(len(rows)) if state is None else self.place_state(state)
        if state.batch_size != len(rows):
            raise StateError(f"state has batch {state.batch_size}, tokens have {len(rows)} sequences")
        logits, new = self._run(torch.tensor(rows, dtype=torch.long), state, full_output)
        return (logits if full_output else logits[:, -1]), new

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, state: KVState, full_output: bool):
        """ids int64 [B, T] (CPU) after ``state`` (placed) -> (logits float32 [B, T or 1, vocab], new KVState)."""
        cfg, ops = self.config, self.backend.ops
        B, T = ids.shape
        L = state.token_count
        need = L + T
        if need > self.context_limit:
            raise ContextLimitError(f"{need} tokens do not fit the context limit of {self.context_limit} tokens "
                                    f"({L} cached + {T} new)", limit=self.context_limit, needed=need)
        buf = state.writable(need, self.context_limit)
        x = self.emb[ids.to(self.emb.device)]                                    # [B, T, C]
        res, tables = None, {}
        for i in range(cfg.n_layer):
            dev, atype = self.devices[i], self.plan.layers[i].atype
            x, res = to_layer(x, res, dev, atype)
            rows = tables.get((dev, atype))
            if rows is None:                                                     # [T, D] of positions L .. need - 1
                rows = tables[(dev, atype)] = tuple(t[L:need] for t in self.rope_tables(dev, atype))
            kc, vc = buf.layers[i]                                               # [B, K, cap, D]
            attend = attending.prefill(ops, rows[0], rows[1], kc, vc, L, need, cfg.n_head, cfg.rms_norm_eps)
            x, res = block(x, res, self.layer_params(i), cfg.rms_norm_eps, ops, attend)
        buf.tokens[:, L:need].copy_(ids)
        buf.filled = need
        if not full_output:
            x, res = x[:, -1:], res[:, -1:]
        logits = self.head_logits(x, res)
        new = KVState(self.version, self.fingerprint, NAMES, [(k[:, :, :need], v[:, :, :need]) for k, v in buf.layers],
                      need, state.metadata, tokens=buf.tokens[:, :need], buffer=buf)
        return logits, new

    def head_logits(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The final RMSNorm (of ``x + residual``, the last layer's pair) and ``lm_head``: x [B, T, C] -> float32
        logits [B, T, vocab] on the head's device."""
        head = self.plan.layers[-1]
        dev = self.devices[-1]
        x = x.to(device=dev, dtype=head.atype)
        residual = None if residual is None else residual.to(device=dev, dtype=head.atype)
        ops = self.backend.ops
        return ops.norm_linear(x, residual, self.norm, self.config.rms_norm_eps, self.head_weight(), None,
                               ops)[0].float()

    def __repr__(self) -> str:
        return f"Qwen2(qwen{self.version}, {self.path.name}, strategy={self.strategy!r})"


def gptq_plan(plan: Plan, folder: Path, head_quantized: bool) -> Plan:
    """``plan`` for a GPTQ folder: every stage must be ``i4``; the head placement says ``i4`` where the checkpoint
    quantized ``lm_head`` (``head_quantized``). The loader's and the memory planner's check. Raises StrategyError
    naming the stage and a strategy that works."""
    for stage in plan.stages:
        if stage.quant != "i4":
            fixed = " -> ".join(str(replace(s, quant="i4")) for s in plan.stages)
            raise StrategyError(f"{folder} holds 4-bit GPTQ weights, which load as the i4 format; stage {str(stage)!r} "
                                f"of strategy {plan.strategy!r} asks for {stage.quant or 'plain float'} weights: use "
                                f"{fixed!r}")
    if not head_quantized:
        return plan
    head = replace(plan.layers[-1], quant="i4", wtype=torch.int32)
    return replace(plan, layers=plan.layers[:-1] + (head,))
