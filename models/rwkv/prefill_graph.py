"""CUDA graphs of the prefill layer stack, one per prompt shape seen again.

A prefill of T tokens through the fused RWKV-7 block (``models/backends/fused_cuda.py``) is ~25 kernel launches per
layer; launched eagerly from Python, the GPU idles between the short ones (about 2 ms of 14.7 ms for
RWKV-7 1.5B at 1024 tokens on an H100, ``bench/results/h100.md``, "Prefill profile"). ``PrefillGraphs``
captures the stack (all layers, final LayerNorm and head, from the embedded input) for a (batch, T)
shape the second time that shape is prefilled, and replays it from then on: the daemon prefills in
chunks of ``[daemon] chunk_len`` tokens, so all full chunks share one graph. A graph reads the same
weights with the same kernels as the eager path, so its logits and state are bit-identical to it
(checked on a GPU by ``tests/gpu/verify_fused.py``).

Applies to models whose layers all sit on one CUDA device, unstreamed, run by the fused prefill block,
without per-token embeddings inside the layers (DeepEmbed); ``full_output`` prefills stay eager (their
[T, vocab] logits would be a large static buffer per shape).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

#: graphs kept per model (least recently used dropped); each holds its activations' memory
CAPACITY = 4
#: a shape is captured on its second prefill (a one-off prompt length costs no capture)
MIN_USES = 2


class PrefillGraphs:
    """Graphs of ``stack(x, layers) -> (logits, new_layers)`` keyed by (batch, T, dtype).

    Args:
        stack: the eager layer stack: x [B, T, C] (activation dtype, on the model's CUDA device) and the
            state's per-layer tensors -> (logits float32 [B, 1, vocab], list of per-layer state tuples).
        device: the CUDA device of every layer.
    """

    def __init__(self, stack: Callable, device: torch.device):
        self._stack = stack
        self._device = device
        self._seen: dict[tuple, int] = {}
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()
        self._pool = None
        #: why graphs are off for this model (a capture failed: the eager path serves every prefill), or None
        self.disabled: str | None = None

    def run(self, x: torch.Tensor, layers: list[tuple]) -> tuple[torch.Tensor, list[tuple]] | None:
        """The stack's output for x [B, T, C] and state tensors ``layers`` through a graph, or None when
        this shape has no graph yet (the caller runs the stack eagerly). Inputs are copied into the graph's
        static buffers; the returned tensors are fresh (a later replay does not change them)."""
        if self.disabled is not None:
            return None
        key = (x.shape[0], x.shape[1], x.dtype)
        entry = self._graphs.get(key)
        if entry is None:
            uses = self._seen.get(key, 0) + 1
            self._seen[key] = uses
            if uses < MIN_USES:
                return None
            try:
                entry = self._capture(x, layers)
            except RuntimeError as e:        # a kernel that cannot be captured: stay eager, say why
                self.disabled = f"prefill graph capture failed: {e}"
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
                return None
            self._graphs[key] = entry
            while len(self._graphs) > CAPACITY:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        g, sx, slayers, logits, new = entry
        sx.copy_(x)
        for dst, src in zip(slayers, layers):
            for d, s in zip(dst, src):
                d.copy_(s)
        g.replay()
        return logits.clone(), [tuple(t.clone() for t in layer) for layer in new]

    def _capture(self, x: torch.Tensor, layers: list[tuple]) -> tuple:
        sx = x.clone()
        slayers = [tuple(t.to(self._device).clone() for t in layer) for layer in layers]
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):
            self._stack(sx, slayers)          # warm-up: cuBLAS workspaces, lazy kernel loads
        torch.cuda.current_stream(self._device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            logits, new = self._stack(sx, slayers)
        return g, sx, slayers, logits, new
