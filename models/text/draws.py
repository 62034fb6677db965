"""The draw of sampled rows from their sorted windows, as array operations over a batch of rows (numpy, host).

``batch_sampling.sample_rows`` brings each row's ``WINDOW`` likeliest probabilities (sorted) and their ids to the
host. :func:`window_kept` finds, for all rows at once, the kept tokens of those the window decides (the top-p cutoff
from the float32 running sum, the top-k cut), and :func:`kept_draws` draws each such row's token with its
sampler's uniform number: the arithmetic of ``Sampler._draw_probs`` (which draws one row through the same
functions), so a row draws the same token alone or in any batch. Rows a window does not decide are left to the
whole-vocabulary draw (``device_sampling.whole_rows_tokens``) or the host's growing windows.
"""

from __future__ import annotations

__all__ = ["window_kept", "kept_draws"]


def window_kept(head, ids, top_p, top_k, vocab: int):
    """The kept tokens of rows whose first sorted window decides them (``_top_p_head`` with ``grow`` False, then
    the top-k cut of ``_draw_probs``), for a batch of rows at once.

    Args:
        head: float32 numpy [R, W], each row's ``W`` likeliest probabilities in descending order (``W`` =
            ``min(WINDOW, vocab)``: the whole row where the vocabulary is that small); ids: int64 numpy [R, W],
            their token ids; top_p: float numpy [R]; top_k: int numpy [R] (0: none); vocab: the vocabulary size.
    Returns:
        ``(n_kept, decided)``: int64 numpy [R], how many of each row's first window entries are kept, and bool
        numpy [R], whether the window decides the row (else: a top-p set the window does not show, a tie at the
        top-k cut, or top_p >= 1 without a top_k: the caller draws over the whole vocabulary).

    The cutoff comes from the float32 running sum over the sorted window (``np.cumsum`` along each row:
    sequential, as the reference's ``np.cumsum``), so it equals ``_top_p_head``'s row by row.
    """
    import numpy as np
    rows, w = head.shape
    top_p, top_k = np.asarray(top_p, dtype=np.float64), np.asarray(top_k, dtype=np.int64)
    every = top_p >= 1                               # top-p keeps every token: only a top_k cuts
    has_k = (top_k > 0) & (top_k < vocab)
    limit = np.where(every, np.float32(np.inf), top_p.astype(np.float32)).astype(np.float32)
    reached = np.cumsum(head, axis=1) >= limit[:, None]
    any_reached = reached.any(axis=1)
    at = np.arange(rows)
    by_cut = any_reached | (w == vocab)
    cutoff = np.where(any_reached, head[at, reached.argmax(axis=1)], head[:, -1])
    count = (head >= cutoff[:, None]).sum(axis=1)
    cut_shown = by_cut & (count < w)                 # every token at or above the cutoff is in the window
    window_k = ~by_cut & has_k & (top_k < w)         # top-p unreached within a window longer than top_k
    decided = (cut_shown | window_k) & ~(every & ~has_k)
    n_kept = np.where(cut_shown, count, w)
    cut_k = decided & (top_k > 0) & (top_k < n_kept)
    i = np.clip(top_k - 1, 0, max(w - 2, 0))
    tie = cut_k & (w > 1) & (head[at, i] == head[at, np.minimum(i + 1, w - 1)])
    return np.where(cut_k, top_k, n_kept), decided & ~tie


def kept_draws(values, ids, n_kept, temperature, u):
    """One inverse-CDF draw per row from its kept tokens (``Sampler._inverse_cdf`` over the ids in ascending order).

    Args:
        values: float32 numpy [R, K], each row's kept probabilities first (descending, as the sorted window gives
            them), anything after; ids: int64 numpy [R, K], their token ids; n_kept: int numpy [R] (>= 1), how many
            lead each row; temperature: float numpy [R] (> 0); u: float64 numpy [R] in [0, 1), each row's uniform
            number from its sampler's generator.
    Returns:
        int64 numpy [R]: the tokens.

    Per row: the kept ids in ascending order with their probabilities, ``(p / max) ** (1 / T)`` where ``T != 1``
    (float32), normalized by their float32 running sum, the float64 running sum of the normalized values, and the
    first id whose running sum exceeds ``u`` times the total. Every reduction runs along the row in order, so a
    row gives the same token alone or in a batch.
    """
    import numpy as np
    rows, k = values.shape
    if rows == 1:                                    # the same arithmetic on the kept entries alone (fewer calls)
        n, t = int(np.asarray(n_kept)[0]), float(np.asarray(temperature)[0])
        order = np.argsort(ids[0, :n], kind="stable")
        p = values[0, :n][order].astype(np.float32)
        if t != 1.0:
            p = np.power(p / np.float32(values[0, 0]), np.float32(1.0 / t))
        q = p / np.cumsum(p)[-1]
        cdf = np.cumsum(q.astype(np.float64))
        pick = min(int(np.searchsorted(cdf, float(np.asarray(u)[0]) * cdf[-1], side="right")), n - 1)
        return ids[0, :n][order][pick:pick + 1].astype(np.int64)
    kept = np.arange(k)[None, :] < np.asarray(n_kept)[:, None]
    key = np.where(kept, ids, np.iinfo(np.int64).max)
    order = np.argsort(key, axis=1, kind="stable")
    sid = np.take_along_axis(key, order, axis=1)
    p = np.take_along_axis(np.where(kept, values, np.float32(0)), order, axis=1).astype(np.float32)
    temperature = np.asarray(temperature, dtype=np.float64)
    hot = temperature != 1.0
    if hot.any():
        inv = (1.0 / temperature[hot]).astype(np.float32)
        top = values[hot, :1].astype(np.float32)     # the kept maximum leads each row
        p[hot] = np.power(p[hot] / top, inv[:, None])
    q = p / np.cumsum(p, axis=1)[:, -1:]
    cdf = np.cumsum(q.astype(np.float64), axis=1)
    pick = (cdf <= (np.asarray(u, dtype=np.float64) * cdf[:, -1])[:, None]).sum(axis=1)
    pick = np.minimum(pick, np.asarray(n_kept) - 1)
    return sid[np.arange(rows), pick]
