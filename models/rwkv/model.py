"""``RWKV``: a model placed on devices by a strategy, with the ``rwkv`` pip package's ``forward``.

Drop-in for ``rwkv.model.RWKV`` (ChatRWKV, pip 0.8.32)::

    model = RWKV(model="path/to/model.pth", strategy="cuda fp16i8 *10 -> cpu fp32")
    logits, state = model.forward([187, 510], None)                 # float32 [vocab]
    logits, state = model.forward(tokens, state, full_output=True)  # float32 [T, vocab]

Every generation (4, 5, 5.1, 5.2, 6, 7) takes the full strategy grammar; several models of different
generations can live in one process. ``forward`` never modifies the state it is given; it returns a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rwkv_chat.models.rwkv import checkpoint as loader
from rwkv_chat.models.errors import CheckpointError, StateError, TokenError
from rwkv_chat.models.rwkv.generations import module_for
from rwkv_chat.models.rwkv.nn import layer_norm, matmul
from rwkv_chat.models.formats.i8 import prefers_output_major, quantize_i8
from rwkv_chat.models.state import State
from rwkv_chat.models.strategy import Plan, plan_layers, rescale_layer_for, torch_device

_RESCALED = ("att.output.weight", "ffn.value.weight")
_FINGERPRINTED = ("emb.weight", "head.weight", "ln_out.weight")


@dataclass
class _Context:
    """Per-forward values a block may need beside its own layer (v7: v_first; DeepEmbed: tokens)."""

    spec: loader.ModelSpec
    layer: int = 0
    v_first: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    wkv7: Callable | None = None      # the WKV-7 to call (None: ``wkv.wkv7``); set by fast decode paths
    matmul: Callable | None = None    # the x @ W to call (None: ``ops.matmul``); set by fast decode paths


class RWKV:
    """An RWKV model (any generation) placed according to a strategy.

    Args:
        model: path to a BlinkDL ``.pth`` or a ``.safetensors`` checkpoint. As in the reference, a path
            without a suffix gets ``.pth`` appended when that file exists. Also a checkpoint already in
            memory: a dict of BlinkDL key -> tensor (e.g. ``rwkv_chat.models.rwkv.shapes.random_checkpoint``).
        strategy: e.g. ``"cpu fp32"``, ``"cuda fp16"``, ``"cuda fp16i8 *10+ -> cpu fp32"`` (see
            ``rwkv_chat.models.strategy``).
        verbose: print the layer plan, as the reference does.
        rescale_layer: halve the residual stream every N layers (v4–v6) to avoid fp16 overflow; default as
            the reference: 6 when any stage is fp16, else 0 (off). RWKV-7 does not rescale.
        progress: called as ``progress(done, total)`` while the layers are converted and placed
            (units: layers, total = n_layer + 1).
        kernels: use the compiled WKV/mm8/gemm kernels (``csrc/``), built at first use and cached; where a
            build fails the pure-torch path runs and ``rwkv_chat.models.kernels.report()`` says why.
            ``False`` builds nothing for this model (the numbers are the same to rounding either way).
    Raises:
        CheckpointError, StrategyError, DeviceError: see those classes.
    """

    def __init__(self, model: str | Path | dict, strategy: str, verbose: bool = False,
                 rescale_layer: int | None = None, progress: Callable[[int, int], None] | None = None,
                 kernels: bool = True):
        if isinstance(model, dict):
            path = Path("<memory>")
            if not model or not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in model.items()):
                raise CheckpointError("a checkpoint dict must map weight names to tensors")
        else:
            path = Path(str(model).strip())
            if not path.exists() and not path.suffix and path.with_suffix(".pth").exists():
                path = path.with_suffix(".pth")
        self.path = path
        with torch.no_grad():
            w = dict(model) if isinstance(model, dict) else loader.read_checkpoint(path)
            self.spec = spec = loader.inspect(w)
            loader.check_finite(w)
            # the fingerprint samples a few tensors through numpy: give it CPU copies of those
            sampled = (*_FINGERPRINTED, f"blocks.{spec.n_layer - 1}.ffn.value.weight")
            self.fingerprint = loader.fingerprint(
                {k: t.cpu() if k in sampled and t.device.type != "cpu" else t for k, t in w.items()}, spec)
            self.plan: Plan = plan_layers(strategy, spec.n_layer)
            self.strategy = self.plan.strategy
            self._gen = module_for(spec.version)
            self._devices = [torch_device(p.device) for p in self.plan.layers]
            if spec.version == "7":
                self.rescale_layer = 0
            else:
                self.rescale_layer = rescale_layer_for(self.plan.stages) if rescale_layer is None else int(rescale_layer)
            self._place(w, progress)
            self.kernels = {}
            self._seq_block = None    # RWKV-7 on CUDA: the fused prefill block (models/backends/fused_cuda.py)
            self._prefill_graphs = None   # ... and CUDA graphs of it per prompt shape (models/rwkv/prefill_graph.py)
            if kernels:
                from rwkv_chat.models import kernels as compiled

                for dev in sorted({d.type for d in self._devices}):
                    self.kernels[dev] = compiled.ensure_built(dev)
                compiled.install()
                from rwkv_chat.models.backends import fused_cuda as fused7

                self._seq_block = fused7.sequence_block(self)
                if self._seq_block is not None and fused7.decode_ready(self):
                    from rwkv_chat.models.rwkv.prefill_graph import PrefillGraphs

                    self._prefill_graphs = PrefillGraphs(self._stack, self._devices[0])
            from rwkv_chat.models.backends import fused_cpu

            #: the fused CPU call serving CPU forwards (None: eager blocks; ``fused_cpu_reason`` says why)
            self.fused_cpu = fused_cpu.attach(self)
        if verbose:
            print(f"RWKV-{spec.version} {path.name}: {spec.n_layer} layers, n_embd {spec.n_embd}, "
                  f"vocab {spec.vocab_size}\n{self.plan}")

    # -- public attributes ---------------------------------------------------------------------
    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def n_layer(self) -> int:
        return self.spec.n_layer

    @property
    def n_embd(self) -> int:
        return self.spec.n_embd

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    # -- loading ---------------------------------------------------------------------------------
    def _place(self, w: dict[str, torch.Tensor], progress=None) -> None:
        spec, plan, gen = self.spec, self.plan, self._gen
        first = plan.layers[0]
        emb = layer_norm(w["emb.weight"].float(), w["blocks.0.ln0.weight"].float(), w["blocks.0.ln0.bias"].float())
        self.layers: list[dict] = [{} for _ in range(spec.n_layer)]
        total, seen = spec.n_layer + 1, set()
        for key, t in w.items():
            if not key.startswith("blocks.") or ".ln0." in key or key.endswith("ffn.s_emb_x.weight"):
                continue
            i = int(key.split(".")[1])
            if progress is not None and i not in seen:
                seen.add(i)
                progress(len(seen) - 1, total)
            name, t, kind = gen.convert(key.split(".", 2)[2], t, spec)
            if name.endswith("ffn.s_emb.weight") and f"blocks.{i}.ffn.s_emb_x.weight" in w:
                t = t.float() + emb @ w[f"blocks.{i}.ffn.s_emb_x.weight"].float().t()
            if self.rescale_layer and name in _RESCALED:
                t = t / (2 ** (i // self.rescale_layer))
            self.layers[i][name] = self._convert(t, kind, plan.layers[i], i)
        head = plan.layers[-1]
        self.emb = emb.to(dtype=first.atype, device=self._devices[0]).contiguous()
        self.ln_out = (w["ln_out.weight"].to(head.atype).to(self._devices[-1]),
                       w["ln_out.bias"].to(head.atype).to(self._devices[-1]))
        self.head = self._convert(w["head.weight"].t(), "matrix", head, spec.n_layer)
        self._zero = [gen.zero_state(spec, 1, self._devices[i], plan.layers[i].atype, self.layers[i])
                      for i in range(spec.n_layer)]
        self._state_shapes = [t.shape[1:] for z in self._zero for t in z]
        if progress is not None:
            progress(total, total)

    def _convert(self, t: torch.Tensor, kind: str, place, i: int):
        device = self._devices[i]
        if kind == "matrix":
            t = quantize_i8(t, place.atype) if place.wtype == torch.uint8 else t.to(place.wtype)
            if place.stream:
                if place.wtype == torch.uint8:   # the pinned copy in the layout of the device it streams to
                    t = t.with_layout(prefers_output_major(device))
                return t.contiguous().pin_memory() if torch.cuda.is_available() else t.contiguous()
        else:
            t = t.to(torch.float32 if kind == "fp32" else place.atype)
        return t.to(device).contiguous()

    def _layer_params(self, i: int) -> dict:
        p = self.layers[i]
        if not self.plan.layers[i].stream:
            return p
        dev = self._devices[i]
        return {k: (v.to(dev, non_blocking=True) if v.device != dev else v) for k, v in p.items()}

    # -- state -----------------------------------------------------------------------------------
    def zero_state(self, batch: int = 1) -> State:
        """A fresh state (the checkpoint's tuned ``time_state`` where it has one) for ``batch`` sequences."""
        layers = [tuple(t.expand(batch, *t.shape[1:]).clone() for t in z) for z in self._zero]
        return State(self.version, self.fingerprint, self._gen.STATE_NAMES, layers)

    def check_state(self, state: State) -> None:
        """Raise StateError unless ``state`` belongs to this model (fingerprint, version, shapes)."""
        if not isinstance(state, State):
            raise StateError(f"expected a State, got {type(state).__name__}")
        if state.fingerprint != self.fingerprint or state.version != self.version:
            raise StateError(f"state belongs to another model (v{state.version}, {state.fingerprint}); "
                             f"this is v{self.version}, {self.fingerprint}")
        if state.n_layer != self.n_layer or state.names != self._gen.STATE_NAMES:
            raise StateError("state layout does not match this model")
        shapes = [t.shape[1:] for layer in state.layers for t in layer]     # one pass, no per-tensor calls
        if shapes != self._state_shapes:
            for a, b in zip(self._state_shapes, shapes):
                if a != b:
                    raise StateError(f"state tensor shape {tuple(b)} (per sequence) does not match {tuple(a)}")
            raise StateError("state layout does not match this model")

    def place_state(self, state: State) -> State:
        """``state`` moved to this model's devices and activation dtypes, after ``check_state``."""
        self.check_state(state)
        layers = [tuple(t.to(device=z.device, dtype=z.dtype) for z, t in zip(zl, layer))
                  for zl, layer in zip(self._zero, state.layers)]
        return State(state.version, state.fingerprint, state.names, layers, state.token_count, state.metadata)

    def load_state(self, path: str | Path) -> State:
        """Read a state file (``State.save``) and place it on this model. Raises StateError."""
        return self.place_state(State.load(path))

    # -- inference -------------------------------------------------------------------------------
    def _tokens(self, tokens) -> list[int]:
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
        tokens = ids
        if not tokens:
            raise TokenError("no tokens to process")
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise TokenError(f"tokens outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return tokens

    def forward(self, tokens, state: State | None, full_output: bool = False):
        """Run tokens through the model.

        Args:
            tokens: list of int token ids (or an int / 1-D tensor), length T >= 1.
            state: the state to continue from, or None for the zero (tuned) state. Not modified.
            full_output: return logits for every position instead of the last.
        Returns:
            ``(logits, state)``: logits float32 [vocab] (or [T, vocab]) on the head's device; the new State.
        Raises:
            TokenError: empty or out-of-vocabulary tokens. StateError: a state of another model.
        """
        ids = self._tokens(tokens)
        state = self.zero_state() if state is None else state
        if state.batch_size != 1:
            raise StateError(f"forward takes a state of batch 1, got {state.batch_size}; use forward_batch")
        logits, new = self._run(torch.tensor([ids], dtype=torch.long), state, full_output)
        return (logits[0] if full_output else logits[0, -1]), new

    def forward_batch(self, tokens: list[list[int]], state: State | None, full_output: bool = False):
        """Run B sequences of equal length T at once.

        Args:
            tokens: B lists of T token ids.
            state: a State of batch B (``State.stack``), or None for B zero states.
        Returns:
            ``(logits, state)``: float32 [B, vocab] (or [B, T, vocab]) and the new batched State.
        Raises:
            TokenError: ragged, empty or out-of-vocabulary tokens. StateError: wrong model or batch size.
        """
        rows = [self._tokens(t) for t in tokens]
        if len({len(r) for r in rows}) != 1:
            raise TokenError("forward_batch needs sequences of equal length")
        state = self.zero_state(len(rows)) if state is None else state
        if state.batch_size != len(rows):
            raise StateError(f"state has batch {state.batch_size}, tokens have {len(rows)} sequences")
        logits, new = self._run(torch.tensor(rows, dtype=torch.long), state, full_output)
        return (logits if full_output else logits[:, -1]), new

    @torch.no_grad()
    def _run(self, ids: torch.Tensor, state: State, full_output: bool):
        fused = self.fused_cpu
        if fused is not None and fused.serves(ids.shape[1]):
            out = fused.run(self, ids, state, full_output)
            if out is not None:
                return out
        self.check_state(state)
        x = self.emb[ids.to(self.emb.device)]                                   # [B, T, C]
        out = None
        if self._prefill_graphs is not None and ids.shape[1] > 1 and not full_output:
            out = self._prefill_graphs.run(x, state.layers)
        logits, layers = out if out is not None else self._stack(x, state.layers, full_output, ids)
        new = State(state.version, state.fingerprint, state.names, layers,
                    state.token_count + ids.shape[1], state.metadata)
        return logits, new

    def _stack(self, x: torch.Tensor, layers: list[tuple], full_output: bool = False,
               ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple]]:
        """The layers, final LayerNorm and head for the embedded input x [B, T, C] and the state's
        per-layer tensors: (logits float32 [B, T or 1, vocab], the new per-layer state tuples).
        ``ids`` [B, T] (CPU) serves the layers that read the tokens (DeepEmbed)."""
        ctx = _Context(self.spec, tokens=ids)
        new = []
        block = self._seq_block if self._seq_block is not None and x.shape[1] > 1 else self._gen.block
        for i in range(self.n_layer):
            place, dev = self.plan.layers[i], self._devices[i]
            x = x.to(device=dev, dtype=place.atype)
            st = tuple(t.to(dev) for t in layers[i])
            ctx.layer = i
            x, st = block(x, st, self._layer_params(i), ctx)
            new.append(st)
            if self.rescale_layer and (i + 1) % self.rescale_layer == 0:
                x = x / 2
        if not full_output:
            x = x[:, -1:]
        head = self.plan.layers[-1]
        x = layer_norm(x.to(device=self._devices[-1], dtype=head.atype), *self.ln_out)
        hw = self.head
        if head.stream:
            hw = hw.to(self._devices[-1], non_blocking=True)
        return matmul(x, hw).float(), new

    def __repr__(self) -> str:
        return f"RWKV(v{self.version}, {self.path.name}, strategy={self.strategy!r})"
