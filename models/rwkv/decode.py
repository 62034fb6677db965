"""Fast decode: one token per conversation per step, with static buffers, CUDA graphs and batching.

``BatchDecoder`` keeps up to ``max_batch`` conversations' states in static per-layer buffers (one slot
each; live slots are kept contiguous in ``[0, n)``). A step feeds one token to every live slot and runs
the whole model for a batch-size bucket (the smallest of ``buckets`` >= n). On CUDA, each bucket's step
is captured once in a CUDA graph and replayed per token. A step runs the model's own layer loop
(``RWKV.run_layers``) with a per-layer step that calls the generation's ``block`` (the same one that serves
``RWKV.forward``) on the static buffers; that per-layer step is compiled with ``torch.compile`` so that its
elementwise work is fused. Where the model's backend serves whole decode steps (``backend.decodes``: the
fused CUDA kernels, the fused CPU call) the step goes there instead. Graphs, compilation and the fused
step are chosen here, at the call site (arguments ``graphs``, ``compile``, ``fused``), never by globals or
environment variables. Rows never mix (every op is per row), so a conversation's result does not depend on
which others share its step.

Typical use (a scheduler doing continuous batching)::

    dec = BatchDecoder(model, max_batch=16)
    h = dec.add(state_after_prefill)            # join
    out = dec.step({h: token})                  # {handle: float32 [vocab]} (valid until the next step)
    state = dec.remove(h)                       # leave (the state, batch 1, ready to save)

``decode_greedy`` is the batch-1 convenience used by tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from rwkv_chat.models.backends import fused_cuda as fused7
from rwkv_chat.models.errors import StateError, TokenError
from rwkv_chat.models.rwkv import wkv
from rwkv_chat.models.rwkv.decode_step import compile_limits, fused_matmul, head_step, layer_step
from rwkv_chat.models.rwkv.generations import Context
from rwkv_chat.models.rwkv.model import RWKV
from rwkv_chat.models.slots import Slots, StepInputs
from rwkv_chat.models.state import State

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: greedy decode steps captured in one CUDA graph (``BatchDecoder.greedy``)
GREEDY_UNROLL = 8


class BatchDecoder(Slots):
    """Decode steps over a static batch of conversation slots (CUDA graph per batch-size bucket).

    Args:
        model: an ``RWKV``.
        max_batch: number of slots.
        buckets: batch sizes a step may run at (a graph each); the largest must be >= max_batch.
        graphs: capture each bucket's step in CUDA graphs. Default: when every layer sits on a CUDA device
            and none is streamed from CPU memory (the streamer's copies run outside graphs). A model on several
            GPUs gets one graph per device and bucket (``decode_stages.StagedGraphs``: activations handed over
            between the graphs; greedy steps one at a time).
        compile: compile the layer step with ``torch.compile`` (fused elementwise work). Default: as
            ``graphs``.
        gemv: the GEMV of the large matrices: "auto" (default), "ours" (the grouped GEMV kernel, fused
            RWKV-7 path), "cublas", or "fused" (see ``fused_matmul``; compiled path).
        fused: run RWKV-7 steps through the fused CUDA backend's decode step (``models/backends/fused_cuda.py``).
            Default: where the model's backend is that one and serves decode steps (``decodes``), and ``graphs``
            is on.
        large: with ``fused``, the path of buckets above ``fused7.GEMV_ROWS`` rows: "fused" (default: the fused
            mix/WKV kernels, one WKV launch per layer, r|k|v and the low-rank stages as batched cuBLAS GEMMs;
            1.09x the compiled step at batch 64 on an H100, bench/results/h100.md, and no compile time),
            "fused-split" (WKV as pre + row-split kernel + post) or "compiled" (the torch.compile'd
            static-buffer step).
        ffn: with ``fused``, the channel-mix value product of steps of <= ``fused7.GEMV_ROWS`` rows: "sparse"
            (the zero rows of relu(k)² not read) or "dense" (the same kernel reading every row; same bits), where
            the backend stores that matrix input-major (``FusedCuda.ffn``). Default (None): the backend's choice.
    Raises:
        StateError: ``max_batch`` < 1 or larger than the largest bucket, or ``ffn`` not None, "sparse" or
            "dense".
    """

    def __init__(self, model: RWKV, max_batch: int = 1, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 graphs: bool | None = None, compile: bool | None = None, gemv: str = "auto",
                 fused: bool | None = None, large: str = "fused", ffn: str | None = None):
        if max_batch < 1:
            raise StateError(f"max_batch must be >= 1, got {max_batch}")
        Slots.__init__(self, max_batch, buckets)
        self.model = model
        devs = {str(d) for d in model.devices}
        capturable = all(d.type == "cuda" for d in model.devices) and not any(pl.stream for pl in model.plan.layers)
        self.graphs = capturable if graphs is None else bool(graphs) and capturable
        backend = model.backend
        ready = backend.decodes and backend.decode_on_device     # the fused CUDA step
        self.fused = (ready and self.graphs) if fused is None else bool(fused) and ready
        if large not in ("fused", "fused-split", "compiled"):
            raise StateError(f"large must be 'fused', 'fused-split' or 'compiled', got {large!r}")
        self.large = large if self.fused else None
        if ffn not in (None, "sparse", "dense"):
            raise StateError(f"ffn must be None, 'sparse' or 'dense', got {ffn!r}")
        #: the channel-mix value product asked of fused steps (None: the backend's, ``FusedCuda.ffn``)
        self.ffn = ffn if self.fused else None
        if self.fused:
            self.gemv = "cublas" if gemv == "cublas" else "ours"
            compile = large == "compiled" and max_batch > fused7.GEMV_ROWS
        else:
            self.gemv = "cublas" if gemv in ("auto", "ours") else gemv
        self.compile = self.graphs if compile is None else bool(compile)
        self._mm = fused_matmul(self.gemv) if self.compile else None
        self._ops = self._step_ops()       # one object for the decoder's life: the compiled step guards on it
        self._layer = torch.compile(layer_step, dynamic=False) if self.compile else layer_step
        self._head = torch.compile(head_step, dynamic=False) if self.compile else head_step
        self._bufs = [tuple(t.contiguous() for t in layer) for layer in model.zero_state(max_batch).layers]
        dev0 = model.emb.device
        self._ids = torch.zeros(max_batch, 1, dtype=torch.long, device=dev0)
        self._inputs = StepInputs(self._ids)     # the step's token ids, staged in pinned memory
        self._count: dict[int, int] = {}         # handle -> tokens consumed
        self._graph: dict[int, tuple] = {}       # bucket -> (CUDAGraph, logits)
        self._greedy_graph: dict[tuple, tuple] = {}   # (bucket, steps) -> (CUDAGraph, tokens): argmax fed back
        self._greedy_log: dict[tuple, torch.Tensor] = {}   # (bucket, steps) -> int64 [steps, bucket]
        self._pools: dict[torch.device, tuple] = {}      # device -> graph memory pool
        self._views: dict[int, tuple[list, list]] = {}   # bucket -> state views (per layer, flat)
        self._staged = None                              # per-device graphs of a model on several GPUs
        if self.graphs and len(devs) > 1:
            from rwkv_chat.models.rwkv.decode_stages import StagedGraphs

            self._staged = StagedGraphs(self)

    # -- membership ------------------------------------------------------------------------------
    def add(self, state: State | None = None) -> int:
        """Join a conversation (its state, batch 1, or None for the zero state); returns its handle.

        Raises:
            StateError: no free slot, a state of another model, or a batched state.
        """
        state = self._joining(state)
        slot = self.size
        for bufs, layer in zip(self._bufs, state.layers):
            for buf, t in zip(bufs, layer):
                buf[slot:slot + 1].copy_(t)
        h = self._new_handle(state.metadata)
        self._count[h] = state.token_count
        return h

    def state(self, handle: int) -> State:
        """A copy of the conversation's current state (batch 1). Raises StateError for a stale handle."""
        slot = self._slot(handle)
        layers = [tuple(buf[slot:slot + 1].clone() for buf in bufs) for bufs in self._bufs]
        return State(self.model.version, self.model.fingerprint, self.model.generation.STATE_NAMES, layers,
                     self._count[handle], self._meta[handle])

    def remove(self, handle: int) -> State:
        """Leave: returns the conversation's state; the last live slot moves into the freed one."""
        st = self.state(handle)
        slot, last = self._slot(handle), self.size - 1
        if slot != last:
            for bufs in self._bufs:
                for buf in bufs:
                    buf[slot].copy_(buf[last])
        self._free(handle, slot, last)
        del self._count[handle]
        return st

    # -- stepping --------------------------------------------------------------------------------
    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        """Feed one token to each given conversation; the others keep their state unchanged.

        Args:
            tokens: handle -> token id.
        Returns:
            handle -> logits float32 [vocab] on the head's device. With graphs these are views of a
            static buffer, valid until the next ``step``.
        Raises:
            StateError: an unknown handle. TokenError: a token outside the vocabulary.
        """
        if not tokens:
            return {}
        slots, bucket, held, saved = self._feed(tokens)
        logits = self._run(bucket)
        self._restore(held, saved)
        for h in tokens:
            self._count[h] += 1
        rows = logits.unbind(0)
        return {h: rows[slots[h]] for h in tokens}

    def greedy(self, tokens: dict[int, int], n: int) -> dict[int, list[int]]:
        """Greedy decoding with the argmax on the device: feed one token to each given conversation,
        then run n - 1 more steps, each feeding the previous step's argmax without a host round trip
        (with graphs, the captured step of a bucket ends with the argmax written into the input buffer;
        the host queues the steps and reads all tokens once at the end).

        The tokens equal n calls of ``step`` with ``int(torch.argmax(logits))`` fed back by the host.

        Args:
            tokens: handle -> the first token id to feed.
            n: steps (>= 1).
        Returns:
            handle -> the n argmax tokens in order; each conversation has consumed its first token and
            all but the last of these (feed the last one next, like ``step``'s logits).
        Raises:
            StateError: an unknown handle, or n < 1. TokenError: a token outside the vocabulary.
        """
        if n < 1:
            raise StateError(f"greedy needs n >= 1 steps, got {n}")
        if not tokens:
            return {}
        slots, bucket, held, saved = self._feed(tokens)
        log = torch.empty(n, bucket, dtype=torch.long, device=self._ids.device)
        i = 0
        if self.graphs and self._staged is None:   # GREEDY_UNROLL steps per graph replay: no launch gap between
            while n - i >= GREEDY_UNROLL:
                log[i:i + GREEDY_UNROLL].copy_(self._run_greedy(bucket, GREEDY_UNROLL))
                i += GREEDY_UNROLL
        for i in range(i, n):
            log[i].copy_(self._run_greedy(bucket, 1)[0])
        self._restore(held, saved)
        for h in tokens:
            self._count[h] += n
        rows = log.t().tolist()
        return {h: rows[slots[h]] for h in tokens}

    def _feed(self, tokens: dict[int, int]):
        """Validate ``tokens``, copy them into the input buffer, save the states of live slots that are
        not fed. Returns (handle -> slot, bucket, held slots, their saved states)."""
        slots = {h: self._slot(h) for h in tokens}
        for t in tokens.values():
            if not 0 <= int(t) < self.model.vocab_size:
                raise TokenError(f"token {t} outside the vocabulary [0, {self.model.vocab_size})")
        n = self.size
        bucket = self.bucket(n)
        held = [s for s in range(n) if self._handle_at[s] not in tokens]
        saved = [[buf[s].clone() for bufs in self._bufs for buf in bufs] for s in held]
        host = self._inputs.host().numpy()       # the same memory: no torch dispatch per row
        host[:] = 0
        for h, t in tokens.items():
            host[slots[h], 0] = int(t)
        self._inputs.send(bucket)
        return slots, bucket, held, saved

    def _restore(self, held: list[int], saved: list) -> None:
        for s, vals in zip(held, saved):
            it = iter(vals)
            for bufs in self._bufs:
                for buf in bufs:
                    buf[s].copy_(next(it))

    def _run(self, bucket: int) -> torch.Tensor:
        if not self.graphs:
            if not self.compile:        # the dynamo config patch costs ~12 us: only where it matters
                return self._forward(bucket)
            with compile_limits():
                return self._forward(bucket)
        if self._staged is not None:
            return self._staged.run(bucket)
        if bucket not in self._graph:
            self._graph[bucket] = self._capture(bucket, self._forward)
        g, out = self._graph[bucket]
        g.replay()
        return out

    @torch.no_grad()
    def _forward_greedy(self, b: int, steps: int = 1) -> torch.Tensor:
        """``steps`` steps, each feeding the previous argmax: the chosen tokens, int64 [steps, b]."""
        log = self._greedy_log.setdefault((b, steps), torch.empty(steps, b, dtype=torch.long,
                                                                  device=self._ids.device))
        for j in range(steps):
            logits = self._forward(b)
            self._ids[:b, 0].copy_(torch.argmax(logits, dim=-1))
            log[j].copy_(self._ids[:b, 0])
        return log

    def _run_greedy(self, bucket: int, steps: int) -> torch.Tensor:
        if not self.graphs:
            if not self.compile:        # the dynamo config patch costs ~12 us: only where it matters
                return self._forward_greedy(bucket, steps)
            with compile_limits():
                return self._forward_greedy(bucket, steps)
        if self._staged is not None:     # one step: the segments' graphs, the argmax fed back to the first device
            self._ids[:bucket, 0].copy_(torch.argmax(self._staged.run(bucket), dim=-1))
            return self._ids[:bucket, 0].view(1, bucket)
        key = (bucket, steps)
        if key not in self._greedy_graph:
            self._greedy_graph[key] = self._capture(bucket, lambda b: self._forward_greedy(b, steps))
        g, out = self._greedy_graph[key]
        g.replay()
        return out

    def _capture(self, bucket: int, body: Callable[[int], torch.Tensor], device: torch.device | None = None) -> tuple:
        """A CUDA graph of ``body(bucket)`` on ``device`` (default: the first layer's) and its static output; the
        state and input buffers are left as they were before the warm-up runs."""
        device = self._ids.device if device is None else device
        with torch.cuda.device(device):
            return self._capture_on(bucket, body, device)

    def _capture_on(self, bucket: int, body, device: torch.device) -> tuple:
        saved = [tuple(buf[:bucket].clone() for buf in bufs) for bufs in self._bufs]
        ids = self._ids.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with compile_limits(), torch.cuda.stream(side):
            for _ in range(3):  # compile, autotune, settle
                body(bucket)
        torch.cuda.current_stream().wait_stream(side)
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with compile_limits(), torch.cuda.graph(g, pool=self._pools[device]):
            out = body(bucket)
        for bufs, sv in zip(self._bufs, saved):
            for buf, t in zip(bufs, sv):
                buf[:bucket].copy_(t)
        self._ids.copy_(ids)
        return g, out

    def _step_ops(self):
        """The ops of the per-layer step: the model's; compiled, with the one-token WKV-7 (``wkv.wkv7_one``) and,
        for RWKV-7 (whose step is written for them), the broadcast-and-sum products of ``fused_matmul``."""
        ops = self.model.backend.ops
        if not self.compile:
            return ops
        ops = replace(ops, wkv7=wkv.wkv7_one)
        return replace(ops, matmul=self._mm) if self.model.version == "7" else ops

    def _step(self, x: torch.Tensor, bufs: tuple, p: dict, ctx: Context) -> tuple[torch.Tensor, tuple]:
        """The per-layer step of ``RWKV.run_layers``: the (compiled) ``layer_step`` on the slots' buffers."""
        if ctx.tokens.device != x.device:          # a stage on another device: the ids move once, with x
            ctx.tokens = ctx.tokens.to(x.device)
        x, ctx.v_first = self._layer(self.model.generation.block, ctx.spec, x, bufs, p, ctx.v_first,
                                     ctx.tokens, ctx.ops)
        return x, bufs

    def _state_views(self, b: int) -> tuple[list, list]:
        """The first b slots of every state buffer: per layer (tuples) and flat (layer-major)."""
        views = self._views.get(b)
        if views is None:
            layers = [tuple(buf[:b] for buf in bufs) for bufs in self._bufs]
            views = self._views[b] = (layers, [t for layer in layers for t in layer])
        return views

    @torch.no_grad()
    def _forward(self, b: int) -> torch.Tensor:
        """The whole model for the first b slots: ids [b, 1] -> logits float32 [b, vocab]."""
        m = self.model
        ids = self._ids[:b]
        layers, flat = self._state_views(b)
        backend = m.backend
        if self.fused and (b <= fused7.GEMV_ROWS or self.large != "compiled"):   # RWKV-7 on CUDA: fused kernels
            return backend.decode_step(m, ids, flat, gemv=self.gemv, ffn=self.ffn,
                                       large_wkv="split" if self.large == "fused-split" else "one")
        if backend.decodes and not backend.decode_on_device and not self.graphs:   # CPU: one compiled call
            return backend.decode_step(m, ids, flat)
        x = torch.index_select(m.emb, 0, ids.view(-1)).view(b, 1, -1)          # [b, 1, C]
        x, _ = m.run_layers(x, layers, Context(m.spec, self._ops, tokens=ids), step=self._step)
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """ln_out and the head on the head's device: x [b, 1, C] -> logits float32 [b, vocab]."""
        m = self.model
        return self._head(x.to(device=m.devices[-1], dtype=m.plan.layers[-1].atype), *m.ln_out, m.head_weight(),
                          self._mm or m.backend.ops.matmul)


def decode_greedy(model: RWKV, logits: torch.Tensor, state: State, n: int,
                  decoder: BatchDecoder | None = None) -> list[int]:
    """Greedy-decode n tokens after ``logits`` (float32 [vocab]) and ``state`` (batch 1), through a
    ``BatchDecoder`` (a new one of batch 1 by default). Returns the token ids."""
    dec = decoder or BatchDecoder(model, max_batch=1)
    h = dec.add(state)
    if n < 1:
        dec.remove(h)
        return []
    first = int(torch.argmax(logits))
    out = [first] + (dec.greedy({h: first}, n - 1)[h] if n > 1 else [])
    dec.remove(h)
    return out
