"""Sampling the rows of one decode step together, on the logits' device.

``sample_rows`` gives every sampler the token ``Sampler.sample`` would give it alone, with far less work per row
than a copy of the vocabulary to the host:

* rows whose sampler is :attr:`Sampler.plain_greedy` take one ``max`` over the stacked rows on their device and
  one transfer of the winners;
* the other rows that share a vocabulary and a device (one row is enough on an accelerator, two on the CPU) are
  stacked there as float32 [rows, vocab]; the bans, the repetition penalty and the presence / frequency penalties
  are applied with three indexed updates over the batch (the ids and values of every row gathered on the host
  first: one transfer each); then one softmax, and one ``topk`` of :data:`~sampling.WINDOW` sorted tokens per row
  (the whole row sorted where the vocabulary is that small). One transfer brings each row's maximum, the greedy
  rows' argmax and the sorted windows to the host, where each row is drawn as ``Sampler.sample`` draws it (the
  top-p cutoff from the float32 running sum of the window, the top-k cut, the temperature, the inverse-CDF draw
  with the sampler's own generator). A window that does not reach the cutoff grows on the device.

On the CPU this is the same arithmetic as ``Sampler.sample`` in the same order, so the tokens are identical (a
test draws both ways). On an accelerator the softmax is the device's: its float32 values may differ from the CPU's
in the last bits, so a seed gives the same tokens there as on the CPU except where such a difference moves the
top-p cutoff or the draw across a boundary. Rows this path cannot decide alike (a NaN or infinite maximum, a tie at
a top-k cut beyond the windows) take ``Sampler._sample_host``, which applies the reference's rules and raises its
errors. Cost, H100 and vocabulary 65,536: see ``bench/daemon_overhead.py --sampling default``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rwkv_chat.models.errors import RWKVError
from rwkv_chat.models.text.sampling import _EXACT_F32, WINDOW, Sampler

if TYPE_CHECKING:
    import torch

__all__ = ["sample_rows"]


def sample_rows(samplers: list[Sampler], rows: list[torch.Tensor], return_errors: bool = False) -> list:
    """One token per sampler, ``samplers[i]`` drawing from ``rows[i]`` (float tensor [vocab], any device,
    typically rows of one batched decode step); the tokens and counts of ``samplers[i].sample(rows[i])`` (on an
    accelerator: see the module docstring for where the device's softmax may differ).

    Raises what :meth:`Sampler.sample` raises (ShapeMismatchError for a row that is not [vocab] of the
    sampler's vocabulary, SamplingError, ...); with ``return_errors`` such a row's exception takes its place in
    the list instead, and the other rows still get their tokens.
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
        _greedy_on_device(samplers, rows, on_device, out)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(out):
        r = rows[i]
        if t is None and r.dim() == 1 and r.shape[0] == (samplers[i].vocab_size or r.shape[0]):
            groups.setdefault((r.shape[0], r.device), []).append(i)
    for (_, device), group in groups.items():
        if len(group) >= (2 if device.type == "cpu" else 1):
            _sample_group(samplers, rows, group, out)
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
    if x.shape[-1] < _EXACT_F32:                         # one transfer: values and indices together
        pair = torch.stack((values.float(), ids.float())).tolist()
        values_l, ids_l = pair[0], [int(t) for t in pair[1]]
    else:
        values_l, ids_l = values.float().tolist(), ids.tolist()
    for i, v, t in zip(on_device, values_l, ids_l):
        if math.isfinite(v):
            out[i] = samplers[i]._take(t, x.shape[-1])


def _to_device(array, device) -> torch.Tensor:
    """A numpy array as a tensor on ``device``: on CUDA one asynchronous copy from pinned memory (torch's caching
    host allocator keeps the block until the copy has run), so the host queues the sampling's kernels while the
    decode step still runs instead of waiting for it at every copy."""
    import torch
    t = torch.from_numpy(array)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _penalize(x: torch.Tensor, samplers: list[Sampler]) -> None:
    """Steps 1-2 of ``sampling`` on the stacked rows ``x`` (float32 [rows, vocab], any device; row j is
    ``samplers[j]``'s), in place: the same float32 operations as ``Sampler._penalized`` on each row (the
    repetition penalty's factors as float32 values, true divisions), the bans last (a banned logit ends at -inf
    whatever came before it, as when it is banned first)."""
    import numpy as np
    import torch
    vocab = x.shape[1]
    rp_ids, rp_f, pen_ids, pen_v, ban_ids = [], [], [], [], []
    for j, s in enumerate(samplers):
        a, base = s.args, j * vocab
        if a.repetition_penalty != 1 and s._seen_ids:
            ids = np.asarray(s._seen_ids, dtype=np.int64)
            rp_ids.append(ids + base)
            rp_f.append(np.full(ids.size, a.repetition_penalty, dtype=np.float32))
        if s._present_ids and (a.alpha_frequency or a.alpha_presence):
            ids, penalty = s._penalties()
            pen_ids.append(ids.numpy() + base)
            pen_v.append(penalty)
        if s._ban.numel():
            ban_ids.append(np.unique(s._ban.numpy()) + base)
    sizes = [sum(a.size for a in part) for part in (rp_ids, pen_ids, ban_ids)]
    if not sum(sizes):
        return
    ids = _to_device(np.concatenate(rp_ids + pen_ids + ban_ids), x.device)
    rp_ids_t, pen_ids_t, ban_ids_t = ids.split(sizes)
    flat = x.view(-1)
    if sizes[0] or sizes[1]:
        values = _to_device(np.concatenate(rp_f + pen_v), x.device)
        factor, penalty = values.split(sizes[:2])
        if sizes[0]:
            # transformers RepetitionPenaltyLogitsProcessor: score < 0 ? score * penalty : score / penalty
            v = flat[rp_ids_t]
            flat[rp_ids_t] = torch.where(v < 0, v * factor, v / factor)
        if sizes[1]:
            flat[pen_ids_t] = flat[pen_ids_t] - penalty
    if sizes[2]:
        flat[ban_ids_t] = -math.inf


def _sample_group(samplers: list[Sampler], rows: list[torch.Tensor], group: list[int], out: list,
                  whole_rows_here: bool | None = None) -> None:
    """Draw the rows ``group`` (one vocabulary, one device) together; see the module docstring. A sampler whose
    first row does not fit it (a banned id outside the vocabulary) and rows with a non-finite maximum are left
    undrawn in ``out``. Rows the first window does not decide: ``_draw_whole_rows`` on the rows' device where
    ``whole_rows_here`` (default: on an accelerator), else the host's growing windows."""
    import torch
    from torch.nn import functional as F
    try:
        for i in group:
            samplers[i]._check_row(rows[i])            # sizes a new sampler's counts (a bad ban: its own path)
    except RWKVError:
        return
    x = torch.stack([rows[i].detach() for i in group]).to(dtype=torch.float32)     # [R, vocab], a copy
    _penalize(x, [samplers[i] for i in group])
    vocab = x.shape[1]
    greedy = [j for j, i in enumerate(group) if samplers[i].args.temperature == 0]
    soft = [j for j, i in enumerate(group) if samplers[i].args.temperature != 0]
    parts = [x.max(dim=1).values]                         # NaN, all -inf, +inf: the row's own path
    if greedy:
        sel = x if len(greedy) == len(group) else x[greedy]
        parts.append(torch.argmax(sel, dim=1).to(torch.float32 if vocab < _EXACT_F32 else torch.float64))
    probs = values = ids = None
    if soft:
        probs = F.softmax(x if len(soft) == len(group) else x[soft], dim=-1)
        if vocab > WINDOW:
            values, ids = torch.topk(probs, WINDOW, dim=-1, sorted=True)
        else:                                             # a small vocabulary: the whole row sorted
            values, ids = torch.sort(probs, dim=-1, descending=True)
        parts += [values.flatten(), ids.flatten().to(values.dtype if vocab < _EXACT_F32 else torch.float64)]
    if vocab < _EXACT_F32:
        host = torch.cat(parts).cpu()                     # one transfer (one wait for the device)
    else:
        host = torch.cat([p.double() for p in parts]).cpu()
    top = host[:len(group)].tolist()
    at = len(group)
    if greedy:
        winners = host[at:at + len(greedy)].long().tolist()
        at += len(greedy)
        for j, t in zip(greedy, winners):
            if math.isfinite(top[j]):
                out[group[j]] = samplers[group[j]]._take(t, vocab)
    if not soft:
        return
    if whole_rows_here is None:
        whole_rows_here = x.device.type != "cpu"
    width = values.shape[1]
    host_values = host[at:at + len(soft) * width].view(len(soft), width).float()
    host_ids = host[at + len(soft) * width:].view(len(soft), width).long()
    undecided: list[int] = []
    for r, j in enumerate(soft):
        if not math.isfinite(top[j]):
            continue
        s = samplers[group[j]]
        token = s._draw_probs(probs[r], (host_values[r], host_ids[r]), grow=not whole_rows_here)
        if token is None and whole_rows_here:
            undecided.append(r)
        out[group[j]] = None if token is None else s._take(token, vocab)
    if undecided:
        chosen = [samplers[group[soft[r]]] for r in undecided]
        sel = torch.tensor(undecided, device=probs.device) if len(undecided) < len(soft) else None
        for r, token in zip(undecided, _draw_whole_rows(probs if sel is None else probs[sel], chosen)):
            out[group[soft[r]]] = samplers[group[soft[r]]]._take(token, vocab)


def _draw_whole_rows(probs: torch.Tensor, samplers: list[Sampler]) -> list[int]:
    """One token per row of ``probs`` (float32 [rows, vocab], softmax of finite logits, any device), row j drawn
    for ``samplers[j]`` over the whole vocabulary on the rows' device: the rows sorted, the float32 running sum's
    top-p cutoff (the reference's), the top-k cut (the first ``top_k`` of the sorted order: at a tie, the sort's
    choice, as ``topk``'s on the host), the temperature, renormalized, then the inverse-CDF draw over the token ids
    in ascending order with the sampler's own uniform number (drawn here, on the host, one per row as
    ``Sampler._inverse_cdf`` draws it). Only the tokens come back. The same arithmetic as ``sampling._kept_probs``
    and ``Sampler._inverse_cdf``; a GPU's running sums add in another order than the CPU's."""
    import numpy as np
    import torch
    rows, vocab = probs.shape
    dev = probs.device
    args = [s.args for s in samplers]
    u = [float(torch.rand((), dtype=torch.float64, generator=s.generator)) for s in samplers]
    params = _to_device(np.array([[float(np.float32(a.top_p)), a.top_k if 0 < a.top_k < vocab else vocab,
                                   a.temperature, ui] for a, ui in zip(args, u)], dtype=np.float64), dev)
    top_p, top_k, temperature, u_t = params.unbind(1)
    values, ids = torch.sort(probs, dim=1, descending=True)
    reached = torch.cumsum(values, dim=1) >= top_p.float()[:, None]       # float32 running sum, as the reference
    at = torch.where(reached.any(dim=1), reached.to(torch.uint8).argmax(dim=1), vocab - 1)
    cutoff = values.gather(1, at[:, None])                                  # [rows, 1]
    order = torch.arange(vocab, device=dev)
    top = torch.zeros_like(reached).scatter_(1, ids, order[None, :] < top_k.long()[:, None])
    keep = (probs >= cutoff) & top
    q = torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=dev))
    scaled = (q / q.amax(dim=1, keepdim=True)) ** (1.0 / temperature).float()[:, None]
    q = torch.where((temperature != 1.0)[:, None], scaled, q)
    q = q / q.sum(dim=1, keepdim=True)
    cdf = torch.cumsum(q.double(), dim=1)
    pick = torch.searchsorted(cdf, u_t[:, None] * cdf[:, -1:], right=True)
    last = torch.where(keep, order[None, :], -1).amax(dim=1, keepdim=True)   # the largest kept id
    return torch.minimum(pick, last).flatten().tolist()
