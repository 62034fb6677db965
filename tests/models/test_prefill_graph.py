"""PrefillGraphs bookkeeping (models/rwkv/prefill_graph.py) on the CPU: when a shape is captured, that replays
see new inputs and return fresh tensors, least-recently-used eviction, and the eager fallback after a
failed capture. The capture itself is replaced by a stand-in that replays the stack into the static
outputs, as a CUDA graph does; the real graphs are checked bit-identical to the eager prefill on a GPU
by tests/gpu/verify_fused.py."""

from __future__ import annotations

import torch

from rwkv_chat.models.rwkv import prefill_graph
from rwkv_chat.models.rwkv.prefill_graph import PrefillGraphs


def stack(x, layers):
    """A stand-in layer stack: logits [B, 1, 3] and one new state tensor per layer."""
    logits = x.sum(dim=1, keepdim=True)[..., :3].float()
    return logits, [(layer[0] * 2 + x.mean(),) for layer in layers]


class _Replay:
    def __init__(self, fn):
        self.replay = fn


class Graphs(PrefillGraphs):
    """PrefillGraphs with the capture replaced by a replay into static outputs (CPU)."""

    def __init__(self, fail: bool = False):
        super().__init__(stack, torch.device("cpu"))
        self.captures = 0
        self.fail = fail

    def _capture(self, x, layers):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        sx = x.clone()
        slayers = [tuple(t.clone() for t in layer) for layer in layers]
        logits, new = stack(sx, slayers)

        def replay():
            lg, nw = stack(sx, slayers)
            logits.copy_(lg)
            for dst, src in zip(new, nw):
                for d, s in zip(dst, src):
                    d.copy_(s)

        return _Replay(replay), sx, slayers, logits, new


def inputs(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, T, 8, generator=g), [(torch.randn(4, generator=g),) for _ in range(2)]


def test_captured_on_second_use_then_replayed_with_new_inputs():
    gr = Graphs()
    x, layers = inputs(5, 0)
    assert gr.run(x, layers) is None                       # first prefill of this shape: eager
    assert gr.captures == 0
    for seed in (1, 2, 3):
        x, layers = inputs(5, seed)
        got_logits, got_layers = gr.run(x, layers)
        want_logits, want_layers = stack(x, layers)
        assert torch.equal(got_logits, want_logits)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got_layers, want_layers))
    assert gr.captures == 1


def test_results_are_not_the_static_buffers():
    gr = Graphs()
    x, layers = inputs(4, 0)
    gr.run(x, layers)
    first = gr.run(x, layers)
    kept = first[0].clone(), first[1][0][0].clone()
    gr.run(*inputs(4, 9))                                  # a later replay overwrites the static outputs
    assert torch.equal(first[0], kept[0]) and torch.equal(first[1][0][0], kept[1])


def test_least_recently_used_shape_is_dropped():
    gr = Graphs()
    n = prefill_graph.CAPACITY + 1
    for T in range(2, 2 + n):
        for _ in range(prefill_graph.MIN_USES):
            gr.run(*inputs(T, T))
    assert gr.captures == n
    assert len(gr._graphs) == prefill_graph.CAPACITY
    gr.run(*inputs(2, 7))                                  # the oldest shape was dropped: captured again
    assert gr.captures == n + 1


def test_failed_capture_leaves_the_eager_path():
    gr = Graphs(fail=True)
    for _ in range(3):
        assert gr.run(*inputs(6, 1)) is None
    assert gr.disabled is not None and "capturing" in gr.disabled
