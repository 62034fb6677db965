"""``RWKV``: a model placed on devices by a strategy, with the ``rwkv`` pip package's ``forward``.

Drop-in for ``rwkv.model.RWKV`` (ChatRWKV, pip 0.8.32)::

    model = RWKV(model="path/to/model.pth", strategy="cuda fp16i8 *10 -> cpu fp32")
    logits, state = model.forward([187, 510], None)                 # float32 [vocab]
    logits, state = model.forward(tokens, state, full_output=True)  # float32 [T, vocab]

Every generation (4, 5, 5.1, 5.2, 6, 7) takes the full strategy grammar; several models of different
generations can live in one process, each with its own backend (``model.backend``: the ops its blocks call
and what replaces them), so one model's ``kernels`` choice never affects another. ``forward`` never modifies
the state it is given; it returns a new one. ``RWKV`` satisfies ``rwkv_chat.models.Model``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from rwkv_chat.models import backends, formats
from rwkv_chat.models.errors import CheckpointError, DeviceError, StateError, TokenError
from rwkv_chat.models.formats import serialize
from rwkv_chat.models.interface import token_ids
from rwkv_chat.models.rwkv import checkpoint as loader
from rwkv_chat.models.rwkv import convert as converted
from rwkv_chat.models.rwkv.generations import Context, module_for
from rwkv_chat.models.rwkv.nn import layer_norm
from rwkv_chat.models.state import State
from rwkv_chat.models.strategy import Plan, plan_layers, rescale_layer_for, torch_device

_RESCALED = ("att.output.weight", "ffn.value.weight")
_FINGERPRINTED = ("emb.weight", "head.weight", "ln_out.weight")


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
        kernels: use the compiled WKV/mm8 kernels and the fused backends (``csrc/``), built at first use and
            cached; where a build fails the pure-torch path runs and ``rwkv_chat.models.kernels.report()`` says
            why. ``False`` builds nothing for this model and runs it in pure torch (the numbers are the same to
            rounding either way). Per model: other models in the process keep their own choice.
    Attributes:
        family: "rwkv". spec: the checkpoint's dimensions (``checkpoint.ModelSpec``). plan: the placement
            (``strategy.Plan``, naming the backend). devices: the torch device of every layer, the head last.
        generation: the generation module (``v4`` … ``v7``). backend: what serves the blocks and steps
            (``rwkv_chat.models.backends``). kernels: ``{device type: {family: "ok" | reason}}`` built for it.
        layers: per layer, the converted parameters (name -> tensor or packed weight). emb, ln_out, head: the
            embedding (LayerNorm ln0 applied), the final LayerNorm (weight, bias) and the head matrix.
        prefill_graphs: CUDA graphs of the prefill per prompt shape (``prefill_graph.PrefillGraphs``), or None.
    Raises:
        CheckpointError, StrategyError, DeviceError: see those classes.
    """

    family = "rwkv"

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
        self._tokenizer = None
        with torch.no_grad():
            if isinstance(model, dict):
                w, self._packed, self._packed_meta = dict(model), {}, None
            else:      # a file converted for a strategy keeps its packed weights apart (rwkv/convert.py)
                w, self._packed, self._packed_meta = converted.read_packed(path)
            self.spec = spec = loader.inspect(w)
            loader.check_finite(w)
            # the fingerprint samples a few tensors through numpy: give it CPU copies of those
            sampled = (*_FINGERPRINTED, f"blocks.{spec.n_layer - 1}.ffn.value.weight")
            self.fingerprint = self._packed_meta["fingerprint"] if self._packed_meta else loader.fingerprint(
                {k: t.cpu() if k in sampled and t.device.type != "cpu" else t for k, t in w.items()}, spec)
            self.plan: Plan = plan_layers(strategy, spec.n_layer)
            self.strategy = self.plan.strategy
            self.generation = module_for(spec.version)
            self.devices: list[torch.device] = [torch_device(p.device) for p in self.plan.layers]
            formats.check_plan(self.plan, self.devices)
            if spec.version == "7":
                self.rescale_layer = 0
            else:
                self.rescale_layer = rescale_layer_for(self.plan.stages) if rescale_layer is None else int(rescale_layer)
            self._place(w, progress)
            self.kernels: dict[str, dict[str, str]] = {}
            self._choose(kernels)
        if verbose:
            print(f"RWKV-{spec.version} {path.name}: {spec.n_layer} layers, n_embd {spec.n_embd}, "
                  f"vocab {spec.vocab_size}\n{self.plan}")

    def _choose(self, kernels: bool) -> None:
        """Build (or load) the kernels of the model's device types where ``kernels``, then choose the backend."""
        self.kernels = {}
        if kernels:
            from rwkv_chat.models import kernels as compiled

            from rwkv_chat.models.kernels.dispatch import probe_weight_kernels

            for dev in sorted({d.type for d in self.devices}):
                self.kernels[dev] = compiled.ensure_built(dev)
            probe_weight_kernels(self)
        self.backend: backends.Backend = backends.choose(self, kernels)
        self.plan = replace(self.plan, backend=str(self.backend))
        self.prefill_graphs = None
        if self.backend.captures_prefill:
            from rwkv_chat.models.rwkv.prefill_graph import PrefillGraphs

            self.prefill_graphs = PrefillGraphs(self._stack, self.devices[0])

    def use_kernels(self) -> backends.Backend:
        """Move a model loaded with ``kernels=False`` to the compiled kernels: build them (or load them from the
        cache: ``rwkv_chat.models.kernels.ready`` says whether that is instant; a first build takes about a
        minute, ``build_in_background`` runs it beforehand) and choose the backend again, as a load with
        ``kernels=True`` does. The results agree with the torch path to float32 rounding, and states move
        between the two unchanged (one layout), so a caller may switch between two steps of a generation.

        Call it between forwards. A batched decoder made before (``decoder``) keeps the old backend's ops: make
        a new one and move its conversations over (``remove`` / ``add``). Where a build failed, the backend
        is the eager one on the torch fallbacks and ``kernels`` says why.

        Returns:
            The new ``backend``.
        """
        with torch.no_grad():
            self._choose(True)
        return self.backend

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

    @property
    def tokenizer(self):
        """The model's tokenizer (``rwkv_chat.models.text.tokenizers.Tokenizer``): the one set (``load_model``
        sets it), else the default for the vocabulary size, loaded at first use (TokenizerError if none fits)."""
        if self._tokenizer is None:
            from rwkv_chat.models.text.tokenizers import load_tokenizer

            self._tokenizer = load_tokenizer(None, vocab_size=self.vocab_size, model_path=self.path)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    @property
    def chat_template(self):
        """ChatRWKV's chat format (``rwkv_chat.models.text.templates.RWKV_CHAT``)."""
        from rwkv_chat.models.text.templates import RWKV_CHAT

        return RWKV_CHAT

    @property
    def fused_cpu(self):
        """The fused CPU call serving this model's forwards and decode steps (``backends.fused_cpu.FusedCpu``),
        or None (``fused_cpu_reason`` says why). Setting None moves a fused CPU model to the eager backend (same
        ops); setting a ``FusedCpu`` moves the model to the fused CPU backend (DeviceError unless every layer
        is on the CPU)."""
        return self.backend.fused if isinstance(self.backend, backends.FusedCpuBackend) else None

    @fused_cpu.setter
    def fused_cpu(self, fused) -> None:
        ops = self.backend.ops
        if fused is not None:
            off = [str(d) for d in self.devices if d.type != "cpu"]
            if off:
                raise DeviceError(f"the fused CPU call serves models on the CPU only; this one has layers on {off[0]}")
            self.backend = backends.FusedCpuBackend(ops, fused)
        elif isinstance(self.backend, backends.FusedCpuBackend):
            self.backend = backends.Eager(bool(self.kernels), ops)
        self.plan = replace(self.plan, backend=str(self.backend))

    def decoder(self, max_batch: int = 1, buckets: tuple[int, ...] | None = None):
        """A ``BatchDecoder`` (``rwkv_chat.models.rwkv.decode``) with ``max_batch`` slots: conversations join
        and leave between one-token steps. ``buckets``: the batch sizes a step may run at (default
        ``decode.DEFAULT_BUCKETS``). Raises StateError for ``max_batch`` < 1."""
        from rwkv_chat.models.rwkv.decode import DEFAULT_BUCKETS, BatchDecoder

        return BatchDecoder(self, max_batch=max_batch, buckets=DEFAULT_BUCKETS if buckets is None else tuple(buckets))

    # -- loading ---------------------------------------------------------------------------------
    def _place(self, w: dict[str, torch.Tensor], progress=None) -> None:
        spec, plan, gen = self.spec, self.plan, self.generation
        first = plan.layers[0]
        emb = layer_norm(w["emb.weight"].float(), w["blocks.0.ln0.weight"].float(), w["blocks.0.ln0.bias"].float())
        self.layers: list[dict] = [{} for _ in range(spec.n_layer)]
        self._matrices: set[str] = set()
        total, seen = spec.n_layer + 1, set()
        for key, t in w.items():
            if not key.startswith("blocks.") or ".ln0." in key or key.endswith("ffn.s_emb_x.weight"):
                continue
            i = int(key.split(".")[1])
            if progress is not None and i not in seen:
                seen.add(i)
                progress(len(seen) - 1, total)
            name, t, kind = gen.convert(key.split(".", 2)[2], t, spec)
            if kind == "matrix":
                self._matrices.add(name)
            if key in self._packed:      # pre-quantized: placed as stored, rescaled exactly
                factor = 2 ** (i // self.rescale_layer) if self.rescale_layer and name in _RESCALED else 1
                self.layers[i][name] = self._adopt(key, serialize.rescaled(self._packed[key], factor), i)
                continue
            if name.endswith("ffn.s_emb.weight") and f"blocks.{i}.ffn.s_emb_x.weight" in w:
                t = t.float() + emb @ w[f"blocks.{i}.ffn.s_emb_x.weight"].float().t()
            if self.rescale_layer and name in _RESCALED:
                t = t / (2 ** (i // self.rescale_layer))
            self.layers[i][name] = self._convert(t, kind, i)
        head = plan.layers[-1]
        self.emb = emb.to(dtype=first.atype, device=self.devices[0]).contiguous()
        self.ln_out = (w["ln_out.weight"].to(head.atype).to(self.devices[-1]),
                       w["ln_out.bias"].to(head.atype).to(self.devices[-1]))
        if "head.weight" in self._packed:
            self.head = self._adopt("head.weight", self._packed["head.weight"], spec.n_layer)
        else:
            self.head = self._convert(w["head.weight"].t(), "matrix", spec.n_layer)
        self._packed = {}
        self._zero = [gen.zero_state(spec, 1, self.devices[i], plan.layers[i].atype, self.layers[i])
                      for i in range(spec.n_layer)]
        self._state_shapes = [t.shape[1:] for z in self._zero for t in z]
        self.attach_streamer()
        if progress is not None:
            progress(total, total)

    def _convert(self, t: torch.Tensor, kind: str, i: int):
        """One tensor of layer i (``n_layer``: the head) placed: a "matrix" packed by the weight format of the
        layer's stage (``rwkv_chat.models.formats``), "fp32" in float32, "act" in the activation dtype."""
        place, device = self.plan.layers[i], self.devices[i]
        if kind == "matrix":
            fmt = formats.get(place.quant)            # the head of an i4 stage: plain (strategy.HEAD_IN_ACTIVATION)
            return fmt.pack(t, place.atype, device, stream=place.stream)
        t = t.to(torch.float32 if kind == "fp32" else place.atype)
        return t.to(device).contiguous()

    def attach_streamer(self) -> None:
        """(Re)build ``streamer`` from the plan: the weight matrices of every layer placed ``stream`` (and the
        head's, when it is streamed) are served by a ``rwkv_chat.models.stream.LayerStreamer`` on the stream
        stage's device; None when nothing is streamed. The matrices stay where ``_place`` put them (pinned CPU
        memory); the other tensors of a streamed layer are resident on its device."""
        from rwkv_chat.models.stream import LayerStreamer

        streamed = [p.index for p in self.plan.layers if p.stream]
        self.streamer = None
        if not streamed:
            return
        host = {i: {k: v for k, v in self.layers[i].items() if k in self._matrices}
                for i in streamed if i < self.n_layer}
        if streamed[-1] == self.n_layer:
            host[self.n_layer] = {"head": self.head}
        self.streamer = LayerStreamer(self.devices[streamed[0]], host)
    def _adopt(self, key: str, packed, i: int):
        """A pre-quantized weight of layer i (``n_layer``: the head) placed by its stage (``convert.adopt``)."""
        place = self.plan.layers[i]
        return converted.adopt(packed, key, self.plan.stages[place.stage], place.atype, self.devices[i],
                               place.stream, self._packed_meta or {})

    def layer_params(self, i: int) -> dict:
        """Layer i's parameters on its device: the resident ones; for a streamed layer, its matrices in the
        streamer's device buffers (copied from pinned memory one layer ahead on a side stream; valid while
        the layer runs: ``stream.LayerStreamer.acquire``)."""
        p = self.layers[i]
        if not self.plan.layers[i].stream:
            return p
        return {**p, **self.streamer.acquire(i)}

    def head_weight(self):
        """The head matrix [C, vocab] (any weight format) on the head's device (a streamed head through the
        streamer's buffers, valid while the head runs)."""
        if self.plan.layers[-1].stream:
            return self.streamer.acquire(self.n_layer)["head"]
        return self.head

    # -- state -----------------------------------------------------------------------------------
    def zero_state(self, batch: int = 1) -> State:
        """A fresh state (the checkpoint's tuned ``time_state`` where it has one) for ``batch`` sequences."""
        layers = [tuple(t.expand(batch, *t.shape[1:]).clone() for t in z) for z in self._zero]
        return State(self.version, self.fingerprint, self.generation.STATE_NAMES, layers)

    def check_state(self, state: State) -> None:
        """Raise StateError unless ``state`` belongs to this model (fingerprint, version, shapes)."""
        if not isinstance(state, State):
            raise StateError(f"expected a State, got {type(state).__name__}")
        if state.fingerprint != self.fingerprint or state.version != self.version:
            raise StateError(f"state belongs to another model (v{state.version}, {state.fingerprint}); "
                             f"this is v{self.version}, {self.fingerprint}")
        if state.n_layer != self.n_layer or state.names != self.generation.STATE_NAMES:
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
        """Read a state file (``State.save``) and place it on this model. Raises StateError (naming the file)."""
        state = State.load(path)
        try:
            return self.place_state(state)
        except StateError as e:
            raise StateError(f"state file {path}: {e}") from None

    # -- inference -------------------------------------------------------------------------------
    def _tokens(self, tokens) -> list[int]:
        return token_ids(tokens, self.vocab_size)

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
        out = self.backend.forward(self, ids, state, full_output)
        if out is not None:
            return out
        self.check_state(state)
        x = self.emb[ids.to(self.emb.device)]                                   # [B, T, C]
        out = None
        if self.prefill_graphs is not None and ids.shape[1] > 1 and not full_output:
            out = self.prefill_graphs.run(x, state.layers)
        logits, layers = out if out is not None else self._stack(x, state.layers, full_output, ids)
        new = State(state.version, state.fingerprint, state.names, layers,
                    state.token_count + ids.shape[1], state.metadata)
        return logits, new

    def _stack(self, x: torch.Tensor, layers: list[tuple], full_output: bool = False,
               ids: torch.Tensor | None = None) -> tuple[torch.Tensor, list[tuple]]:
        """The layers, final LayerNorm and head for the embedded input x [B, T, C] and the state's
        per-layer tensors: (logits float32 [B, T or 1, vocab], the new per-layer state tuples).
        ``ids`` [B, T] (CPU) serves the layers that read the tokens (DeepEmbed)."""
        ops = self.backend.ops
        x, new = self.run_layers(x, layers, Context(self.spec, ops, tokens=ids))
        if not full_output:
            x = x[:, -1:]
        x = layer_norm(x.to(device=self.devices[-1], dtype=self.plan.layers[-1].atype), *self.ln_out)
        return ops.matmul(x, self.head_weight()).float(), new

    def run_layers(self, x: torch.Tensor, layers: list[tuple], ctx: Context, step: Callable | None = None,
                   start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, list[tuple]]:
        """The one layer loop (eager forward, prefill graphs, the batched decoder): every layer in order.

        Per layer: x moves to the layer's device and activation dtype (at a stage boundary RWKV-7's
        ``ctx.v_first`` moves with it, once), the state tuple to the layer's device, a streamed layer's
        matrices come from the streamer's buffers (``layer_params``), the block runs, and every
        ``rescale_layer`` layers x is halved. The block is ``step`` where given, else the backend's
        replacement for this layer and input (``backend.sequence_block``, T > 1), else the generation's.

        Args:
            x: the embedded input [B, T, C].
            layers: per layer, the state tuple [B, ...] (``STATE_NAMES`` order); not modified by the blocks.
            ctx: the forward's ``Context`` (``ctx.layer`` is set here; blocks set ``ctx.v_first``).
            step: a function with the block contract ``step(x, layer_state, params, ctx) -> (x, layer_state)``
                run for every layer instead (the decoder's compiled static-buffer step).
            start, stop: run only layers ``start`` .. ``stop - 1`` (default: all; the decoder's per-device CUDA
                graphs run one stage each).
        Returns:
            ``(x, new_layers)``: x [B, T, C] after the last layer run, on its device; the state tuples returned
            by the blocks run (one per layer of the range).
        """
        gen, places, devices = self.generation, self.plan.layers, self.devices
        replaced = self.backend.sequence_block if step is None and x.shape[1] > 1 else None
        new = []
        for i in range(start, self.n_layer if stop is None else stop):
            dev = devices[i]
            if x.device != dev and ctx.v_first is not None:     # RWKV-7's v_first crosses a stage with x
                ctx.v_first = ctx.v_first.to(dev)
            x = x.to(device=dev, dtype=places[i].atype)
            st = tuple(t.to(dev) for t in layers[i])
            p = self.layer_params(i)
            ctx.layer = i
            block = step
            if block is None and replaced is not None:
                block = replaced(i, x, p)
            x, st = (block or gen.block)(x, st, p, ctx)
            new.append(st)
            if self.rescale_layer and (i + 1) % self.rescale_layer == 0:
                x = x / 2
        return x, new

    def __repr__(self) -> str:
        return f"RWKV(v{self.version}, {self.path.name}, strategy={self.strategy!r})"
