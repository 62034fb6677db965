"""Sampling the rows of one decode step together, on the logits' device.

``sample_rows`` gives every sampler the token ``Sampler.sample`` would give it alone, with far less work per row
than a copy of the vocabulary to the host:

* rows whose sampler is :attr:`Sampler.plain_greedy` take one ``max`` over the stacked rows on their device and
  one transfer of the winners;
* the other rows that share a vocabulary and a device (one row is enough on CUDA, two on the CPU; other accelerators
  take the per-row host path) are stacked there as float32 [rows, vocab]; the bans, the repetition penalty and the
  presence / frequency penalties are applied as one indexed update over the batch (every changed logit an entry,
  gathered on the host and sent in asynchronous copies); then one softmax, and one ``topk`` of
  :data:`~sampling.WINDOW` sorted tokens per row (the whole row sorted where the vocabulary is that small). One
  transfer brings each row's maximum, argmax and sorted window to the host, where the rows are drawn as
  ``Sampler.sample`` draws each (the top-p cutoff from the float32 running sum of the window, the top-k cut, the
  temperature, the inverse-CDF draw with the sampler's own generator), all the rows a window decides in one set of
  array operations (``draws.window_kept`` / ``draws.kept_draws``: every sum runs along its row in order, so a
  row draws the same token in any batch). A row whose window does not show its top-p
  set is drawn over the whole vocabulary on the device (``device_sampling.whole_rows_tokens``; on the CPU the window
  grows instead, as in ``Sampler.sample``). On CUDA both passes replay CUDA graphs (``device_sampling.SamplingGraphs``,
  each probed against the eager passes at its first use; ``sample_rows(..., cuda_graphs=False)``: eager).

On the CPU this is the same arithmetic as ``Sampler.sample`` in the same order, so the tokens are identical (a
test draws both ways). On an accelerator the softmax is the device's: its float32 values may differ from the CPU's
in the last bits, so a seed gives the same tokens there as on the CPU except where such a difference moves the
top-p cutoff or the draw across a boundary. Rows this path cannot decide alike (a NaN or infinite maximum, a tie at
a top-k cut beyond the windows) take ``Sampler._sample_host``, which applies the reference's rules and raises its
errors. Cost: ``tests/gpu/verify_sampling.py`` and ``bench/daemon_overhead.py --sampling default``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from rwkv_chat.models.errors import RWKVError
from rwkv_chat.models.text.sampling import WINDOW, Sampler

if TYPE_CHECKING:
    import torch

__all__ = ["sample_rows"]

log = logging.getLogger(__name__)


def sample_rows(samplers: list[Sampler], rows: list[torch.Tensor], return_errors: bool = False,
                cuda_graphs: bool = True) -> list:
    """One token per sampler, ``samplers[i]`` drawing from ``rows[i]`` (float tensor [vocab], any device,
    typically rows of one batched decode step); the tokens and counts of ``samplers[i].sample(rows[i])`` (on an
    accelerator: see the module docstring for where the device's softmax may differ).

    Raises what :meth:`Sampler.sample` raises (ShapeMismatchError for a row that is not [vocab] of the
    sampler's vocabulary, SamplingError, ...); with ``return_errors`` such a row's exception takes its place in
    the list instead, and the other rows still get their tokens. ``cuda_graphs``: replay the passes of CUDA rows
    as CUDA graphs (``device_sampling.SamplingGraphs``); False: launch them eagerly.
    """
    from rwkv_chat.models.text.sampling import _argmax
    out: list[int | None] = [None] * len(samplers)
    on_device: list[int] = []
    for i, (s, r) in enumerate(zip(samplers, rows)):
        if not s._plain or r.dim() != 1 or r.shape[0] != (s.vocab_size or r.shape[0]):
            continue                                         # the penalized path, or the shape error
        if r.device.type == "cpu":
            token, value = _argmax(r)
            if math.isfinite(value):
                out[i] = s._take(token, r.shape[0])
        else:
            on_device.append(i)
    if on_device:
        try:
            _greedy_on_device(samplers, rows, on_device, out)
        except Exception:   # noqa: BLE001 - the rows left undrawn take the host path, which reports per row
            log.warning("greedy sampling on the device failed; those rows are drawn on the host", exc_info=True)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(out):
        r = rows[i]
        if t is None and r.dim() == 1 and r.shape[0] == (samplers[i].vocab_size or r.shape[0]):
            groups.setdefault((r.shape[0], r.device), []).append(i)
    for (_, device), group in groups.items():   # other accelerators (MPS, DirectML: no float64) take the host path
        if len(group) >= {"cpu": 2, "cuda": 1}.get(device.type, len(group) + 1):
            try:
                _sample_group(samplers, rows, group, out, graphs=_graphs(device) if cuda_graphs else None)
            except Exception:   # noqa: BLE001 - the rows left undrawn take the host path, which reports per row
                log.warning("sampling on %s failed; those rows are drawn on the host", device, exc_info=True)
    for i, s in enumerate(samplers):
        if out[i] is None:
            try:
                out[i] = s._sample_host(rows[i])
            except Exception as e:
                if not return_errors:
                    raise
                out[i] = e
    return out


def _greedy_on_device(samplers: list[Sampler], rows: list[torch.Tensor], on_device: list[int], out: list) -> None:
    """The plain greedy rows on accelerators: one ``max`` over the stacked rows (one group of one vocabulary and
    device; others are left undrawn) and one transfer of values and indices."""
    import torch
    if len({(rows[i].shape[0], rows[i].device) for i in on_device}) != 1:
        return
    x = rows[on_device[0]].unsqueeze(0) if len(on_device) == 1 else torch.stack([rows[i] for i in on_device])
    values, ids = torch.max(x.detach(), dim=-1)          # first maximum, as argmax; NaN propagates
    if x.shape[-1] < _passes().EXACT_F32:                # one transfer: values and indices together
        pair = torch.stack((values.float(), ids.float())).tolist()
        values_l, ids_l = pair[0], [int(t) for t in pair[1]]
    else:
        values_l, ids_l = values.float().tolist(), ids.tolist()
    for i, v, t in zip(on_device, values_l, ids_l):
        if math.isfinite(v):
            out[i] = samplers[i]._take(t, x.shape[-1])


def _penalize(x: torch.Tensor, samplers: list[Sampler]) -> None:
    """Steps 1-2 of ``sampling`` on the stacked rows ``x`` (float32 [rows, vocab], any device; row j is
    ``samplers[j]``'s), in place, as one indexed update (``device_sampling.apply_entries``): the float32 results of
    ``Sampler.penalize`` on each row."""
    _apply_rows(x, [_passes().row_entries(s) for s in samplers])


def _apply_rows(x: torch.Tensor, entries: list) -> None:
    """Row j's penalty ``entries[j]`` (``device_sampling.row_entries``) applied to the stacked rows ``x``."""
    ds = _passes()
    ids, values = ds.pack_entries(entries, x.shape[1])
    if ids.size:
        ds.apply_entries(x.view(-1), ds.to_device(ids, x.device), ds.to_device(values, x.device))


def _draw_windows(chosen: list[Sampler], drawn: list[int], probs, values_h, ids_h, vocab: int, group: list[int],
                  out: list) -> list[int]:
    """Draw the sampled rows ``drawn`` (indices into ``chosen``) whose first sorted window decides them, all at
    once (``draws.window_kept`` / ``draws.kept_draws``; one uniform number from each such row's generator, as
    ``Sampler._draw_probs`` draws it); returns the rest, undrawn. ``probs``: the rows' softmax (float32 [rows,
    vocab], any device; only its size is read); ``values_h`` / ``ids_h``: the windows (float32 / int64 CPU tensors
    [rows, w])."""
    import numpy as np
    import torch

    from rwkv_chat.models.text.draws import kept_draws, window_kept
    if not drawn:
        return []
    if len(drawn) <= 2:                # a row or two: the row's own draw (the same arithmetic, fewer array calls)
        rest = []
        for j in drawn:
            token = chosen[j]._draw_probs(probs[j], (values_h[j], ids_h[j]), grow=False)
            if token is None:
                rest.append(j)
            else:
                out[group[j]] = chosen[j]._take(token, vocab)
        return rest
    head, ids = values_h.numpy()[drawn], ids_h.numpy()[drawn]
    args = [chosen[j].args for j in drawn]
    n_kept, decided = window_kept(head, ids, [a.top_p for a in args], [min(a.top_k, vocab) for a in args], vocab)
    rows = np.flatnonzero(decided)
    if rows.size:
        u = [float(torch.rand((), dtype=torch.float64, generator=chosen[drawn[r]].generator)) for r in rows]
        tokens = kept_draws(head[rows], ids[rows], n_kept[rows], [args[r].temperature for r in rows], u).tolist()
        for r, token in zip(rows.tolist(), tokens):
            out[group[drawn[r]]] = chosen[drawn[r]]._take(token, vocab)
    return [drawn[r] for r in np.flatnonzero(~decided).tolist()]


def _passes():
    from rwkv_chat.models.text import device_sampling
    return device_sampling


#: device -> its ``device_sampling.SamplingGraphs`` (CUDA only)
_GRAPHS: dict = {}


def _graphs(device):
    """The sampling graphs of a CUDA ``device`` (made at first use); None elsewhere."""
    if device.type != "cuda":
        return None
    g = _GRAPHS.get(device)
    if g is None:
        g = _GRAPHS[device] = _passes().SamplingGraphs(device, WINDOW)
    return g


def _sample_group(samplers: list[Sampler], rows: list[torch.Tensor], group: list[int], out: list,
                  whole_rows_here: bool | None = None, graphs=None) -> None:
    """Draw the rows ``group`` (one vocabulary, one device) together; see the module docstring. A sampler whose
    first row does not fit it (a banned id outside the vocabulary) and rows with a non-finite maximum are left
    undrawn in ``out``. Rows the first window does not decide: ``whole_rows_tokens`` on the rows' device where
    ``whole_rows_here`` (default: on an accelerator), else the host's growing windows. ``graphs``: a
    ``device_sampling.SamplingGraphs`` of the rows' device whose graphs replay both passes where it has them."""
    import torch
    ds = _passes()
    try:
        for i in group:
            samplers[i]._check_row(rows[i])            # sizes a new sampler's counts (a bad ban: its own path)
    except RWKVError:
        return
    chosen = [samplers[i] for i in group]
    device, vocab = rows[group[0]].device, rows[group[0]].shape[0]
    if whole_rows_here is None:
        whole_rows_here = device.type != "cpu"
    entries = [ds.row_entries(s) for s in chosen]
    replayed = graphs.first([rows[i].detach() for i in group], entries) if graphs is not None else None
    if replayed is not None:
        graph, host = replayed
        probs = graph.probs
        n_rows = graph.rows
    else:
        graph = None
        x = torch.stack([rows[i].detach() for i in group]).to(dtype=torch.float32)    # [R, vocab], a copy
        _apply_rows(x, entries)
        packed, probs = ds.first_pass(x, WINDOW)
        host = packed.cpu()                               # one transfer (one wait for the device)
        n_rows = len(group)
    top, arg, values_h, ids_h = ds.unpack_first(host, n_rows, vocab, WINDOW)
    drawn: list[int] = []
    for j, s in enumerate(chosen):
        if not math.isfinite(top[j]):
            continue                                      # NaN, all -inf, +inf: the row's own path
        if s.args.temperature == 0:
            out[group[j]] = s._take(arg[j], vocab)
        else:
            drawn.append(j)
    undecided = _draw_windows(chosen, drawn, probs, values_h, ids_h, vocab, group, out)
    if not whole_rows_here:                               # the host grows the windows of the rest
        for j in undecided:
            token = chosen[j]._draw_probs(probs[j], (values_h[j], ids_h[j]), grow=True)
            out[group[j]] = None if token is None else chosen[j]._take(token, vocab)
        return
    if not undecided:
        return
    params = ds.whole_row_params([chosen[j] for j in undecided], vocab)
    got = None
    if graph is not None:
        every = ds.whole_row_params([], vocab, graph.rows)             # rows not drawn here draw anything
        every[undecided] = params
        got = graphs.whole(graph, every)
    if got is not None:
        tokens = got[undecided].tolist()
    else:
        rows_p = probs if undecided == list(range(probs.shape[0])) else probs[torch.tensor(undecided, device=device)]
        tokens = ds.whole_rows_tokens(rows_p, ds.to_device(params, device)).tolist()
    for j, token in zip(undecided, tokens):
        out[group[j]] = chosen[j]._take(token, vocab)
