"""Batched decoding for Qwen models: conversations of different cache lengths share one step.

``Qwen2Decoder`` keeps up to ``max_batch`` conversations' KV caches in per-layer slot buffers k, v
[max_batch, K, capacity, D] (live slots contiguous in ``[0, n)``) and each slot's length ``lens``. A step feeds
one token per slot: each row's new key/value goes to its own position ``lens[row]``, its query is rotated for that
position, and attends over the positions ``<= lens[row]`` (``attend.decode``: ``ops.rope_store`` and
``ops.decode_attention``, one Triton launch each on CUDA), so rows never mix.
The capacity doubles from ``cache.CHUNK`` positions when a slot needs more (``cache.span``; never a copy per
token), up to the model's context limit; a step attends over ``span(longest live slot + 1)`` positions only.
Contract as ``rwkv_chat.models.rwkv.decode.BatchDecoder``::

    dec = model.decoder(max_batch=16)
    h = dec.add(state_after_prefill)            # join (a KVState of batch 1, or None for an empty cache)
    out = dec.step({h: token})                  # {handle: float32 [vocab]}
    state = dec.remove(h)                       # leave: the KVState (batch 1, compact), ready to save

Rows not fed in a step write a key/value past their length (never read) and keep their length.
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import ContextLimitError, StateError, TokenError
from rwkv_chat.models.qwen2 import attend as attending
from rwkv_chat.models.qwen2.cache import NAMES, KVState, span
from rwkv_chat.models.qwen2.layers import block, to_layer
from rwkv_chat.models.slots import Slots, StepInputs

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def decode_one(model, ids: torch.Tensor, lens: torch.Tensor, bufs: list, capacity: int) -> torch.Tensor:
    """One token per row through the whole model over the slot buffers, updated in place (no host sync: a CUDA
    graph captures it as is).

    Args:
        model: a ``Qwen2``.
        ids: int64 [b] token ids; lens: int64 [b] cached positions per row (the new token's position); both on the
            first layer's device.
        bufs: per layer (k, v) [>= b, K, capacity, D] on the layer's device; rows [0, b) are used.
        capacity: the positions of ``bufs`` (every ``lens`` value is below it).
    Returns:
        logits float32 [b, vocab] on the head's device.
    """
    cfg, ops = model.config, model.backend.ops
    b = ids.shape[0]
    x = model.emb[ids.to(model.emb.device)].view(b, 1, -1)                           # [b, 1, C]
    res, on = None, {}
    for i in range(cfg.n_layer):
        dev, atype = model.devices[i], model.plan.layers[i].atype
        x, res = to_layer(x, res, dev, atype)
        here = on.get((dev, atype))
        if here is None:                                  # the positions and RoPE tables of this device, once
            here = on[(dev, atype)] = (lens.to(dev), *model.rope_tables(dev, atype))
        pos, cos, sin = here
        kc, vc = bufs[i]                                                           # [>= b, K, capacity, D]
        attend = attending.decode(ops, cos, sin, pos, kc, vc, cfg.n_head, cfg.rms_norm_eps)
        x, res = block(x, res, model.layer_params(i), cfg.rms_norm_eps, ops, attend)
    return model.head_logits(x, res)[:, 0]


class Qwen2Decoder(Slots):
    """Decode steps over slots of KV caches of any lengths (see the module docstring).

    Args:
        model: a ``Qwen2``. max_batch: slots. buckets: batch sizes a step may run at (the smallest >= the live
            slots is used; the largest is ``max_batch``).
        graphs: capture each bucket's step in a CUDA graph (made again when the capacity grows). Default: when
            every layer sits on one CUDA device and none is streamed. Then ``step``'s logits are views of a static
            buffer, valid until the next step.
    Attributes:
        buckets, max_batch, capacity (positions per slot), graphs; compile, fused (False), gemv, large (None) for
        reports.
    Raises:
        StateError: ``max_batch`` < 1.
    """

    compile = fused = False
    gemv = large = None

    def __init__(self, model, max_batch: int = 1, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 graphs: bool | None = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise StateError(f"max_batch must be >= 1, got {max_batch}")
        Slots.__init__(self, max_batch, buckets)
        self.model = model
        self.capacity = span(1, model.context_limit)
        self._bufs = self._alloc(self.capacity)
        self._tokens = torch.zeros(max_batch, self.capacity, dtype=torch.long)
        self._lens = torch.zeros(max_batch, dtype=torch.long)
        dev0 = model.devices[0]
        single_cuda = len(set(model.devices)) == 1 and dev0.type == "cuda" and \
            not any(p.stream for p in model.plan.layers)
        self.graphs = single_cuda if graphs is None else bool(graphs) and single_cuda
        # a step's inputs: token ids (row 0) and cached lengths (row 1), staged in pinned memory and copied
        # asynchronously in one transfer, so the host prepares the next step while the GPU runs this one
        self._inputs = StepInputs(torch.zeros(2, max_batch, dtype=torch.long, device=dev0))
        self._ids_dev, self._lens_dev = self._inputs.device
        self._graph: dict[tuple, tuple] = {}        # (bucket, width) -> (CUDAGraph, static logits) at this capacity
        self._pool = None

    def _alloc(self, capacity: int) -> list:
        cfg, m = self.model.config, self.model
        return [tuple(torch.zeros(self.max_batch, cfg.n_kv_head, capacity, cfg.head_dim, device=m.devices[i],
                                  dtype=m.plan.layers[i].atype) for _ in NAMES) for i in range(cfg.n_layer)]

    def _grow(self, need: int) -> None:
        """Make room for ``need`` positions per slot (``cache.span``: doubling, at most the context limit)."""
        if need <= self.capacity:
            return
        cap = span(need, self.model.context_limit)
        new = self._alloc(cap)
        for (k, v), (nk, nv) in zip(self._bufs, new):
            nk[:, :, :self.capacity].copy_(k)
            nv[:, :, :self.capacity].copy_(v)
        tokens = torch.zeros(self.max_batch, cap, dtype=torch.long)
        tokens[:, :self.capacity].copy_(self._tokens)
        self._bufs, self._tokens, self.capacity = new, tokens, cap
        self._graph.clear()

    # -- membership ------------------------------------------------------------------------------
    def add(self, state: KVState | None = None) -> int:
        """Join a conversation (its KVState of batch 1, or None for an empty cache); returns its handle.

        Raises:
            StateError: no free slot, a state of another model, or a batched state.
        """
        state = self._joining(state)
        L = state.token_count
        self._grow(L)
        slot = self.size
        for (k, v), (sk, sv) in zip(self._bufs, state.layers):
            k[slot, :, :L].copy_(sk[0])
            v[slot, :, :L].copy_(sv[0])
        self._tokens[slot, :L].copy_(state.tokens[0])
        self._lens[slot] = L
        return self._new_handle(state.metadata)

    def state(self, handle: int) -> KVState:
        """A copy of the conversation's cache (batch 1, compact). Raises StateError for a stale handle."""
        slot = self._slot(handle)
        L = int(self._lens[slot])
        layers = [(k[slot:slot + 1, :, :L].clone(), v[slot:slot + 1, :, :L].clone()) for k, v in self._bufs]
        m = self.model
        return KVState(m.version, m.fingerprint, NAMES, layers, L, self._meta[handle],
                       tokens=self._tokens[slot:slot + 1, :L].clone())

    def remove(self, handle: int) -> KVState:
        """Leave: returns the conversation's KVState; the last live slot moves into the freed one."""
        st = self.state(handle)
        slot, last = self._slot(handle), self.size - 1
        if slot != last:
            L = int(self._lens[last])
            for k, v in self._bufs:
                k[slot, :, :L].copy_(k[last, :, :L])
                v[slot, :, :L].copy_(v[last, :, :L])
            self._tokens[slot].copy_(self._tokens[last])
            self._lens[slot] = L
        self._lens[last] = 0
        self._free(handle, slot, last)
        return st

    # -- stepping --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        """Feed one token to each given conversation; the others keep their caches.

        Args:
            tokens: handle -> token id.
        Returns:
            handle -> logits float32 [vocab] on the head's device.
        Raises:
            StateError: an unknown handle. TokenError: a token outside the vocabulary. ContextLimitError: a
            conversation's cache is full (``model.context_limit``); nothing was run.
        """
        if not tokens:
            return {}
        slots = {h: self._slot(h) for h in tokens}
        limit = self.model.context_limit
        lens = self._lens.numpy()                  # the same memory: per-row bookkeeping without torch dispatch
        for h, t in tokens.items():
            if not 0 <= int(t) < self.model.vocab_size:
                raise TokenError(f"token {t} outside the vocabulary [0, {self.model.vocab_size})")
            if int(lens[slots[h]]) + 1 > limit:
                raise ContextLimitError(f"the conversation holds {int(lens[slots[h]])} tokens: its cache is "
                                        f"full (context limit {limit})", limit=limit, needed=limit + 1)
        n = self.size
        need = int(lens[:n].max()) + 1             # every live row writes at its next position, fed or not
        self._grow(need)
        b = self.bucket(n)
        self._stage(tokens, slots)
        logits = self._run(b, span(need, self.model.context_limit))
        ids = self._tokens.numpy()                 # after _grow, which may have replaced it
        for h, t in tokens.items():
            s = slots[h]
            ids[s, lens[s]] = int(t)
            lens[s] += 1
        rows = logits.unbind(0)
        return {h: rows[slots[h]] for h in tokens}

    def _stage(self, tokens: dict[int, int], slots: dict[int, int]) -> None:
        """Copy the step's token ids (0 for rows not fed) and every slot's length to the device (one asynchronous
        copy out of pinned memory on CUDA); a step reads the rows of its bucket."""
        host = self._inputs.host().numpy()
        host[0] = 0
        for h, t in tokens.items():
            host[0, slots[h]] = int(t)
        host[1] = self._lens.numpy()
        self._inputs.send()                                       # all slots: one contiguous transfer

    def _run(self, b: int, width: int) -> torch.Tensor:
        """The step of the first b slots over the first ``width`` positions (inputs in ``_ids_dev``, ``_lens_dev``):
        logits float32 [b, vocab]. Graphs are kept per (b, width): log2 of the context many widths."""
        if not self.graphs:
            return self._body(b, width)
        key = (b, width)
        if key not in self._graph:
            self._graph[key] = self._capture(b, width)
        g, out = self._graph[key]
        g.replay()
        return out

    def _body(self, b: int, width: int) -> torch.Tensor:
        bufs = [(k[:, :, :width], v[:, :, :width]) for k, v in self._bufs]
        return decode_one(self.model, self._ids_dev[:b], self._lens_dev[:b], bufs, width)

    def _capture(self, b: int, width: int) -> tuple:
        """A CUDA graph of the step and its static logits. The warm-up runs write keys/values only at the slots'
        next positions (past their lengths), so no cache is disturbed."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(b, width)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = self._body(b, width)
        return g, out

    def greedy(self, tokens: dict[int, int], n: int) -> dict[int, list[int]]:
        """``n`` steps feeding each conversation its previous argmax (the first step feeds ``tokens``): handle ->
        the n argmax tokens (the last one not yet fed), as ``rwkv.decode.BatchDecoder.greedy``."""
        if n < 1:
            raise StateError(f"greedy needs n >= 1 steps, got {n}")
        out: dict[int, list[int]] = {h: [] for h in tokens}
        feed = dict(tokens)
        for _ in range(n):
            logits = self.step(feed)
            feed = {h: int(torch.argmax(x)) for h, x in logits.items()}
            for h, t in feed.items():
                out[h].append(t)
        return out
