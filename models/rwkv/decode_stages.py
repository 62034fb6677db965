"""Per-device CUDA graphs of a batched decode step, for a model whose layers lie on several CUDA devices.

A ``cuda:0 fp16 *16 -> cuda:1 fp16`` model runs a decode step as segments, one per run of consecutive layers
on one device (the head in the last). Each segment of each batch bucket is captured in its own CUDA graph on
its own device (a graph cannot span devices); between two segments the activations are handed over outside
the graphs into static input buffers of the next device:

    segment 0 (cuda:0): ids -> embedding -> layers 0..15          -> x_out [b, 1, C] (and RWKV-7's v_first)
    hand-over:           x_in[1] <- x_out, v_first_in[1] <- v_first, ids[1] <- ids    (device-to-device copies)
    segment 1 (cuda:1): x_in[1] -> layers 16..n-1 -> ln_out, head -> logits [b, vocab]

Ordering needs no events of ours: torch orders a copy between two CUDA devices after the work queued on both
devices' current streams, and the next segment's graph is replayed on its device's current stream after it.
Per token the hand-over moves b·C activation elements (twice for RWKV-7), which ``rwkv_chat.models.plan``
reports as the transfers per token.

Greedy decoding on device (``BatchDecoder.greedy``) replays the segments one step at a time here, with the
argmax copied back to the first device between steps (no multi-step unrolled graph across devices).
Segments follow the strategy's stages; a segment on the CPU runs its body without a graph, so the same
hand-over logic runs in CPU tests.
"""

from __future__ import annotations

import torch

from rwkv_chat.models.rwkv.generations import Context


def segments(model) -> list[tuple[torch.device, int, int]]:
    """The strategy's stages as runs of layers: ``(device, start, stop)`` with layers ``start .. stop-1``;
    index ``n_layer`` is the head, so the last segment has ``stop == n_layer + 1``."""
    out, start, devs, places = [], 0, model.devices, model.plan.layers
    for i in range(1, len(devs) + 1):
        if i == len(devs) or devs[i] != devs[start] or places[i].stage != places[start].stage:
            out.append((devs[start], start, i))
            start = i
    return out


class StagedGraphs:
    """The per-segment graphs of one ``BatchDecoder`` (its state buffers, ids and compiled step).

    Args:
        decoder: the ``BatchDecoder`` whose model spans several CUDA devices.
    Attributes:
        segments: see ``segments``.
    """

    def __init__(self, decoder):
        self.dec = decoder
        m = decoder.model
        self.segments = segments(m)
        B, C = decoder.max_batch, m.n_embd
        self.x_in: dict[int, torch.Tensor] = {}
        self.vf_in: dict[int, torch.Tensor] = {}
        self.ids: dict[int, torch.Tensor] = {}
        for k, (dev, start, _) in enumerate(self.segments):
            if k == 0:
                continue
            atype = m.plan.layers[start].atype
            self.x_in[k] = torch.zeros(B, 1, C, dtype=atype, device=dev)
            if m.version == "7" and start < m.n_layer:
                self.vf_in[k] = torch.zeros(B, 1, m.spec.n_att, dtype=atype, device=dev)
            self.ids[k] = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self._graphs: dict[tuple[int, int], tuple] = {}       # (bucket, segment) -> (CUDAGraph, outputs)

    def body(self, b: int, k: int):
        """Segment k for the first b slots: (x [b, 1, C], v_first or None) or, for the last, logits [b, vocab]."""
        dec, m = self.dec, self.dec.model
        _, start, stop = self.segments[k]
        if k == 0:
            ids = dec._ids[:b]
            x, vf = torch.index_select(m.emb, 0, ids.view(-1)).view(b, 1, -1), None
        else:
            ids, x = self.ids[k][:b], self.x_in[k][:b]
            vf = self.vf_in[k][:b] if k in self.vf_in else None
        layers, _ = dec._state_views(b)
        ctx = Context(m.spec, dec._ops, v_first=vf, tokens=ids)
        x, _ = m.run_layers(x, layers, ctx, step=dec._step, start=start, stop=min(stop, m.n_layer))
        if stop == m.n_layer + 1:
            return dec._logits(x)
        return x, ctx.v_first

    def run(self, b: int) -> torch.Tensor:
        """One decode step of the first b slots (capturing a segment's graph at its first use): logits float32
        [b, vocab] on the head's device (a static buffer, valid until the next step)."""
        out = None
        for k, (dev, _, _) in enumerate(self.segments):
            if k > 0:
                x, vf = out
                self.x_in[k][:b].copy_(x)
                if k in self.vf_in:
                    self.vf_in[k][:b].copy_(vf)
                self.ids[k][:b].copy_(self.dec._ids[:b])
            if dev.type != "cuda":     # the same segments and hand-over without graphs (CPU stages, tests)
                out = self.body(b, k)
                continue
            key = (b, k)
            if key not in self._graphs:
                self._graphs[key] = self.dec._capture(b, lambda bb, k=k: self.body(bb, k), device=dev)
            g, out = self._graphs[key]
            with torch.cuda.device(dev):
                g.replay()
        return out
