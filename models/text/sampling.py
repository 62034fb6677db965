"""Token sampling with repetition penalties: the reference ``rwkv.utils.PIPELINE`` sampler, vectorized.

Per generated token, in the reference's order (``PIPELINE.generate`` and ``PIPELINE.sample_logits``):

1. banned tokens get logit ``-inf``;
   (not in the reference) with ``repetition_penalty`` != 1, every token of the context (the prompts fed and the tokens
   generated, :meth:`Sampler.observe` / :meth:`Sampler.record`) has its logit divided by it where positive and
   multiplied by it where negative: Hugging Face's ``RepetitionPenaltyLogitsProcessor`` (CTRL, Keskar et al. 2019),
   the penalty a ``generation_config.json`` gives;
2. every token seen so far loses ``alpha_presence + count * alpha_frequency`` from its logit;
3. ``probs = softmax(logits)``; keep the tokens whose probability is at least the one where the cumulative
   probability (descending) first reaches ``top_p``; if ``top_k > 0`` keep at most the ``top_k`` likeliest;
   ``probs ** (1 / temperature)``, renormalized; draw one token (``temperature == 0``: argmax);
4. a stop token ends here (its count is not recorded);
5. every count is multiplied by ``alpha_decay``; the token's count grows by 0 if its text is whitespace or
   digits (a substring of ``" \\t0123456789"``, as in the reference), else by 1. A token with count 0 is still
   "present" and pays ``alpha_presence``.

Deviations from the reference: when rounding keeps the float32 cumulative sum below ``top_p``, the reference
falls back to the single likeliest token; here every token is kept. ``top_p >= 1`` keeps every token whatever the
running sum does (the reference's may also reach 1 before the smallest tokens and cut them, which a temperature
above 1 makes visible). At a tie at the top-k cut the lowest token ids are kept (the reference's argsort keeps any).

``Sampler.sample`` applies the penalties at the penalized tokens only and, after the softmax, works on the kept
tokens alone (the sorted window that found the top-p cutoff holds them): a draw costs a few passes over the
vocabulary instead of a dozen (one CPU thread, vocabulary 151,936: 0.8-1.6 ms against 1.8-18.4 ms, the most at
top_p 1 with a top_k). A kept set larger than the window, or a top-k cut at a tie, is made over the whole
vocabulary from the cutoff found; top_p 1 keeps every token without a sort (3.5 ms there, 19 ms when it sorted
the whole vocabulary). Rows of one decode step are drawn together by
``batch_sampling.sample_rows``: on an accelerator the penalties, the softmax and the sorted window are computed on
the device and only the window comes to the host.

Randomness comes from a ``torch.Generator`` owned by each :class:`Sampler` (seeded from ``SamplerArgs.seed``, or
from the OS when ``None``); the global RNGs are never touched. The draw itself (cutoff, top-k, temperature, the
inverse CDF) runs on the CPU in float32 and float64 whatever the logits' device, so a seed gives the same tokens
for the same logits on the CPU; on an accelerator the softmax's last bits are the device's (see
``batch_sampling``).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rwkv_chat.models.errors import RWKVError, ShapeMismatchError, StateError, TokenError

if TYPE_CHECKING:
    import torch

__all__ = ["SamplerArgs", "SETTINGS", "Sampler", "SamplingError", "filtered_probs", "WEIGHTLESS_TEXT"]

WEIGHTLESS_TEXT = " \t0123456789"  # tokens whose text is a substring of this add 0 to their count (reference)
_STATE_FORMAT = 1


class SamplingError(RWKVError, ValueError):
    """Sampling arguments are out of range, or the logits leave nothing to sample (every token banned/NaN)."""


def _range(lo, hi) -> str:
    """``"between 0 and 1"``, ``"0 or more"``: a range in words (error messages)."""
    num = (lambda v: str(v) if isinstance(v, int) else f"{v:g}")
    return f"between {num(lo)} and {num(hi)}" if hi is not None else f"{num(lo)} or more"


def _real(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SamplingError(f"{name} must be {_range(lo, hi)}, got {value!r}")
    return float(value)


def _int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise SamplingError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise SamplingError(f"{name} must be an integer, got {value!r}") from None
    if v < lo or (hi is not None and v > hi):
        raise SamplingError(f"{name} must be {_range(lo, hi)}, got {v}")
    return v


@dataclass(frozen=True)
class SamplerArgs:
    """Sampling settings: the one type of them for the sampler, the daemon's ``[sampling]`` config section and
    the settings a request or a conversation gives (by field name, see :meth:`updated`).

    Defaults are the reference ``PIPELINE_ARGS``, except ``max_tokens``: 256 (the reference's loop has no such
    limit; 256 is the documented default of the daemon's ``[sampling] max_tokens``).

    Fields:
        temperature: >= 0 (0 = greedy argmax); applied after the top-p/top-k cut, as ``probs ** (1/T)``.
        top_p: nucleus mass in [0, 1] (0 keeps only the likeliest token).
        top_k: keep at most this many tokens; 0 = no limit.
        alpha_frequency: logit penalty per (decayed) occurrence, >= 0 (GPT-3 frequency penalty).
        alpha_presence: logit penalty for having occurred at all, >= 0 (GPT-3 presence penalty).
        alpha_decay: per-token multiplier of the occurrence counts, in [0, 1].
        repetition_penalty: > 0; 1 = off (Hugging Face's multiplicative penalty on the context's tokens).
        token_ban: token ids never sampled. token_stop: token ids that end a generation.
        seed: RNG seed (integer in [0, 2**63)); None draws one from the OS.
        max_tokens: most tokens a generation produces, >= 1.

    Raises SamplingError (a ValueError) naming the field for any value out of range.
    """

    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    alpha_frequency: float = 0.2
    alpha_presence: float = 0.2
    alpha_decay: float = 0.996
    repetition_penalty: float = 1.0
    token_ban: tuple[int, ...] = field(default=())
    token_stop: tuple[int, ...] = field(default=())
    seed: int | None = None
    max_tokens: int = 256

    def __post_init__(self) -> None:
        s = object.__setattr__
        s(self, "temperature", _real("temperature", self.temperature, 0.0))
        s(self, "top_p", _real("top_p", self.top_p, 0.0, 1.0))
        s(self, "top_k", _int("top_k", self.top_k, 0))
        s(self, "alpha_frequency", _real("alpha_frequency", self.alpha_frequency, 0.0))
        s(self, "alpha_presence", _real("alpha_presence", self.alpha_presence, 0.0))
        s(self, "alpha_decay", _real("alpha_decay", self.alpha_decay, 0.0, 1.0))
        s(self, "repetition_penalty", _real("repetition_penalty", self.repetition_penalty, 0.0))
        if self.repetition_penalty == 0:
            raise SamplingError("repetition_penalty must be more than 0 (1 = off), got 0")
        for name in ("token_ban", "token_stop"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise SamplingError(f"{name} must be a sequence of token ids, got {value!r}")
            s(self, name, tuple(_int(f"{name} entry", t, 0) for t in value))
        if self.seed is not None:
            s(self, "seed", _int("seed", self.seed, 0, 2**63 - 1))
        s(self, "max_tokens", _int("max_tokens", self.max_tokens, 1))

    def updated(self, overrides: Mapping[str, Any] | None = None, /, **fields: Any) -> SamplerArgs:
        """A copy with the settings in ``overrides`` and ``fields`` replaced (a None value keeps this one's).

        Args:
            overrides: setting name -> value, e.g. a conversation's stored settings or a request's.
        Raises:
            SamplingError: a name that is not one of :data:`SETTINGS`, or a value out of range.
        """
        given = {k: v for k, v in {**(overrides or {}), **fields}.items() if v is not None}
        unknown = sorted(set(given) - set(SETTINGS))
        if unknown:
            raise SamplingError(f"unknown sampling settings {unknown} (known: {', '.join(SETTINGS)})")
        return dataclasses.replace(self, **given) if given else self


#: the settings a configuration, a conversation or a request may give, by name (the token lists are the
#: caller's own: they depend on the tokenizer)
SETTINGS = ("temperature", "top_p", "top_k", "alpha_frequency", "alpha_presence", "alpha_decay",
            "repetition_penalty", "max_tokens", "seed")


def filtered_probs(logits: torch.Tensor, args: SamplerArgs) -> torch.Tensor:
    """The distribution a token is drawn from: ``softmax``, top-p cut, top-k cut, temperature, renormalized.

    Args:
        logits: float tensor [vocab] (any float dtype/device), after bans and penalties.
        args: supplies temperature, top_p, top_k.
    Returns:
        float32 CPU tensor [vocab] summing to 1. ``temperature == 0`` gives a one-hot at the argmax.
    Raises SamplingError if no token has a finite logit.

    Source: ``rwkv.utils.PIPELINE.sample_logits`` (CPU branch); the cutoff is computed on the same float32 values
    with the same float32 cumulative sum, so the kept set equals the reference's (see the module docstring for the
    one deviation). The temperature is applied as ``(p / p.max()) ** (1/T)`` to avoid underflow at small T.
    """
    import torch
    from torch.nn import functional as F
    if logits.dim() != 1:
        raise ShapeMismatchError(f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
    x = logits.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(x).any()):
        raise SamplingError("no token can be sampled: every logit is -inf or NaN (all tokens banned?)")
    x = torch.where(torch.isnan(x), -math.inf, x)  # a NaN logit is never sampled
    if bool(torch.isposinf(x).any()):               # +inf logits share all the probability (softmax's limit)
        x = torch.where(torch.isposinf(x), 0.0, -math.inf)
    if args.temperature == 0:
        out = torch.zeros_like(x)
        out[int(torch.argmax(x))] = 1.0
        return out
    probs = F.softmax(x, dim=-1)
    return _kept_probs(probs, _top_p_cutoff(probs, args.top_p), args)


def _kept_probs(probs: torch.Tensor, cutoff: torch.Tensor, args: SamplerArgs) -> torch.Tensor:
    """``filtered_probs`` from the softmax ``probs`` [vocab] and its top-p ``cutoff``: the top-k cut, the
    temperature, renormalized (float32 [vocab], zero outside the kept tokens)."""
    import torch
    keep = probs >= cutoff
    if 0 < args.top_k < probs.numel():             # the top_k likeliest; at a tie at the cut, the lowest ids
        kth = torch.topk(probs, args.top_k, sorted=False).values.min()
        top = probs > kth
        tied = torch.nonzero(probs == kth).flatten()[:args.top_k - int(top.sum())]
        top[tied] = True
        keep &= top
    probs = torch.where(keep, probs, torch.zeros((), dtype=probs.dtype))
    if args.temperature != 1.0:
        probs = (probs / probs.max()) ** (1.0 / args.temperature)
    return probs / probs.sum()


def _top_p_cutoff(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest kept probability: the descending-sorted probability at which the float32 cumulative sum first
    reaches ``top_p`` (reference ``sample_logits``); the smallest probability if it never does."""
    return _top_p_head(probs, top_p)[0]


#: the first sorted window of the top-p search (``_top_p_head``)
WINDOW = 256


def _top_p_head(probs: torch.Tensor, top_p: float, top_k: int = 0, first=None, grow: bool = True):
    """``(cutoff, kept, values)``: the cutoff of ``_top_p_cutoff`` and, where the sorted window that found it shows
    every token at or above it, those tokens' ids (int64 CPU tensor, likeliest first; ties at the cutoff included)
    and their probabilities (float32 CPU tensor), else None, None. With ``top_k`` > 0, a window of more than
    ``top_k`` tokens whose running sum has not reached ``top_p`` ends the search: every token in it is kept by
    top-p, and the top-k cut falls inside it (cutoff None, kept the window).

    ``probs``: float32 [vocab] on any device (a window is sorted there and copied to the host). Only the head of
    the sorted order is needed, so it grows a ``topk`` window (256, 1024, ...) instead of sorting the whole
    vocabulary; the window's values are exactly the sorted prefix, so the running sum and the cutoff are those of
    a full sort. A window whose last value still reaches the cutoff may leave tokens of that value outside it:
    ``kept`` is None then. ``first``: the first window's ``(values, ids)`` on the host where the caller took it
    already (``torch.topk(probs, WINDOW, sorted=True)`` of a batch of rows, or the whole row sorted). With
    ``grow`` False the search ends after the first window: ``(None, None, None)`` where it did not decide.
    """
    import numpy as np
    import torch
    n = probs.numel()
    limit = np.float32(top_p)
    if top_p >= 1:                  # every token is kept by top-p (module docstring: no running sum decides)
        if not 0 < top_k < n:
            return (torch.tensor(float(probs.min())) if grow else None), None, None
        limit = np.float32(np.inf)  # the window with the top-k cut in it decides
    k = min(WINDOW, n)
    while True:
        if first is not None:
            head_t, ids = first
            k, first = head_t.numel(), None
        elif k < n:
            head_t, ids = (t.cpu() for t in torch.topk(probs, k, sorted=True))
        elif probs.device.type == "cpu":  # numpy's sort is several times faster than torch.sort on CPU
            head_t, ids = torch.from_numpy(np.sort(probs.numpy())[::-1].copy()), None
        else:
            head_t, ids = (t.cpu() for t in torch.sort(probs, descending=True))
        head = head_t.numpy()
        cumulative = np.cumsum(head)  # float32 running sum, as the reference's np.cumsum
        reached = cumulative >= limit
        if reached.any() or k == n:
            cutoff = head[int(np.argmax(reached))] if reached.any() else head[-1]
            count = int(np.count_nonzero(head >= cutoff))
            if ids is not None and count < k:
                return torch.tensor(cutoff), ids[:count], head_t[:count]
            return torch.tensor(cutoff), None, None
        if 0 < top_k < k:
            return None, ids, head_t
        if not grow:
            return None, None, None
        k = n if k * 4 >= n else k * 4


class Sampler:
    """Samples tokens one at a time and keeps the repetition-penalty counts of one generation/conversation.

    Args:
        args: SamplerArgs.
        tokenizer: decides which tokens count 0 (whitespace/digit text); ``None`` counts every token 1.

    State: ``counts`` float64 [vocab] and ``present`` bool [vocab] (sized by the first logits), and the RNG.
    ``state_dict()`` / ``load_state_dict()`` save and restore both, so a resumed conversation samples on as if
    never interrupted.
    """

    def __init__(self, args: SamplerArgs | None = None, tokenizer=None) -> None:
        import torch
        self.args = args if args is not None else SamplerArgs()
        self.tokenizer = tokenizer
        self.generator = torch.Generator(device="cpu")
        if self.args.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(self.args.seed)
        self._stop = frozenset(self.args.token_stop)
        a = self.args
        self._plain = (a.temperature == 0 and not a.token_ban and a.alpha_frequency == 0 and a.alpha_presence == 0
                       and a.repetition_penalty == 1)
        self._ban = torch.tensor(self.args.token_ban, dtype=torch.long)
        self._weights: dict[int, float] = {}
        self.vocab_size: int | None = None
        self.counts: torch.Tensor | None = None  # float64 [vocab]
        self.present: torch.Tensor | None = None  # bool [vocab]
        self.seen: torch.Tensor | None = None  # bool [vocab]: the context's tokens (repetition_penalty)
        if tokenizer is not None:
            self._allocate(tokenizer.vocab_size)

    def _allocate(self, vocab_size: int) -> None:
        import torch
        if self.args.token_ban and max(self.args.token_ban) >= vocab_size:
            raise TokenError(f"token_ban has ids outside the vocabulary of {vocab_size}")
        self.vocab_size = vocab_size
        self.counts = torch.zeros(vocab_size, dtype=torch.float64)
        self.present = torch.zeros(vocab_size, dtype=torch.bool)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        self._counts_np = self.counts.numpy()    # the same memory: per-token updates without torch dispatch
        self._present_np = self.present.numpy()
        self._seen_np = self.seen.numpy()
        self._present_ids = _Ids()                # the ids set in present / seen, each once (penalties touch these)
        self._seen_ids = _Ids()
        self._entries = None                      # device_sampling.row_entries's layout of the penalized ids
                                                  # (its key: the id lists' lengths; a reset or a load drops it)

    def reset(self) -> None:
        """Forget every occurrence count (the RNG continues)."""
        if self.counts is not None:
            self.counts.zero_()
            self.present.zero_()
            self.seen.zero_()
            self._present_ids.clear()
            self._seen_ids.clear()
            self._entries = None

    def observe(self, tokens) -> None:
        """Mark ``tokens`` (ids fed to the model: a prompt) as part of the context that ``repetition_penalty``
        applies to, as Hugging Face applies it to every id of ``input_ids``. Needs a vocabulary (a tokenizer given
        or a token sampled before); ids outside it raise TokenError."""
        if self.seen is None:
            raise StateError("the sampler has no vocabulary yet: sample once or give it a tokenizer")
        import numpy as np
        ids = [operator.index(t) for t in tokens]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise TokenError(f"a prompt token is outside the vocabulary (0..{self.vocab_size - 1})")
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        new = ids[~self._seen_np[ids]]
        self._seen_np[new] = True
        self._seen_ids.extend(new)

    def is_stop(self, token: int) -> bool:
        """Whether ``token`` is one of ``args.token_stop``."""
        return token in self._stop

    def weight(self, token: int) -> float:
        """Count increment of ``token``: 0 if its text is a substring of ``" \\t0123456789"``, else 1."""
        w = self._weights.get(token)
        if w is None:
            if self.tokenizer is None:
                w = 1.0
            else:
                w = 0.0 if self.tokenizer.decode([token]) in WEIGHTLESS_TEXT else 1.0
            self._weights[token] = w
        return w

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """Steps 1-2: a float32 CPU copy of ``logits`` [vocab] with bans and presence/frequency penalties applied.

        Raises ShapeMismatchError if ``logits`` is not 1-D or its size differs from the sampler's vocabulary.
        """
        import torch
        self._check_row(logits)
        return self._penalized(logits.detach().to(device="cpu", dtype=torch.float32, copy=True))

    def _check_row(self, logits: torch.Tensor) -> None:
        """A row this sampler draws from: 1-D, of its vocabulary (the first row sets it). Raises
        ShapeMismatchError (TokenError: a banned token outside the vocabulary the first row sets)."""
        if logits.dim() != 1:
            raise ShapeMismatchError(f"logits must be 1-D [vocab], got shape {tuple(logits.shape)}")
        n = logits.shape[0]
        if self.counts is None:
            self._allocate(n)
        elif n != self.vocab_size:
            raise ShapeMismatchError(f"logits have {n} entries but the sampler's vocabulary has {self.vocab_size}")

    def _penalized(self, x: torch.Tensor) -> torch.Tensor:
        """Steps 1-2 on ``x`` (a float32 row of the vocabulary, this sampler's own copy), in place; returns it. The
        penalized tokens only, as the batched path applies them (``device_sampling.row_entries``)."""
        import torch

        from rwkv_chat.models.text.device_sampling import apply_entries, row_entries
        entries = row_entries(self)
        if entries is not None:
            apply_entries(x, torch.from_numpy(entries[0]), torch.from_numpy(entries[1]))
        return x

    def record(self, token: int) -> None:
        """Step 5: decay every count, then add ``token``'s occurrence. Raises TokenError outside the vocabulary."""
        if self.counts is None:
            raise StateError("the sampler has no vocabulary yet: sample once or give it a tokenizer")
        token = operator.index(token)
        if not 0 <= token < self.vocab_size:
            raise TokenError(f"token {token} is outside the vocabulary (0..{self.vocab_size - 1})")
        counts = self._counts_np                  # views of self.counts / self.present (same float64 math)
        present = self._present_ids.array
        if present.size * 8 < counts.size:        # only present ids have a count: decay those (same products)
            counts[present] *= self.args.alpha_decay
        else:
            counts *= self.args.alpha_decay
        counts[token] += self.weight(token)
        if not self._present_np[token]:
            self._present_np[token] = True
            self._present_ids.append(token)
        if not self._seen_np[token]:
            self._seen_np[token] = True
            self._seen_ids.append(token)

    @property
    def plain_greedy(self) -> bool:
        """Whether a draw is just the argmax of the raw logits: temperature 0, no banned tokens and no
        presence/frequency penalty (the counts are still kept: a later request may turn penalties on)."""
        return self._plain

    def sample(self, logits: torch.Tensor) -> int:
        """Draw one token from ``logits`` (float tensor [vocab], any device) and update the counts.

        A stop token is returned without being recorded. Raises ShapeMismatchError for logits of the wrong shape,
        SamplingError if bans/NaN leave nothing to sample. Logits on an accelerator are penalized, softmaxed and
        windowed there (``batch_sampling.sample_rows``); only the sorted window comes to the host.
        """
        if logits.device.type != "cpu":
            from rwkv_chat.models.text.batch_sampling import sample_rows
            return sample_rows([self], [logits])[0]
        return self._sample_host(logits)

    def _sample_host(self, logits: torch.Tensor) -> int:
        """:meth:`sample` with every step after the copy on the host (float32): the reference's rules, and the
        path any row the batched paths do not decide takes."""
        import torch
        if self.plain_greedy and logits.dim() == 1 and logits.shape[0] == (self.vocab_size or logits.shape[0]):
            token, value = _argmax(logits)                     # first maximum; a NaN wins
            if math.isfinite(value):                           # else: the reference's rules below
                return self._take(token, logits.shape[0])
        x = self.penalize(logits)
        drawn = self._draw_kept(x)
        if drawn is not None:
            token = drawn
        else:
            probs = filtered_probs(x, self.args)
            if self.args.temperature == 0:
                token = int(torch.argmax(probs))
            else:
                ids = torch.nonzero(probs).flatten()  # inverse-CDF draw over the kept tokens only
                token = self._inverse_cdf(ids, probs[ids])
        if token not in self._stop:
            self.record(token)
        return token

    def _inverse_cdf(self, ids: torch.Tensor, probs: torch.Tensor) -> int:
        """One draw from the kept tokens ``ids`` (ascending) with float32 probabilities ``probs`` (any scale)."""
        import torch
        cdf = torch.cumsum(probs.double(), 0)
        u = torch.rand((), dtype=torch.float64, generator=self.generator) * cdf[-1]
        return int(ids[min(int(torch.searchsorted(cdf, u, right=True)), ids.numel() - 1)])

    def _draw_kept(self, x: torch.Tensor) -> int | None:
        """``filtered_probs`` and the draw touching only the kept tokens after the softmax (a handful, where the
        full path makes a dozen passes over the vocabulary): the same kept set and the same per-token float32
        values up to the last bit of the temperature's power (numpy's here, torch's there); the normalizing sum
        adds the same terms in another order, so a draw may differ from the full path's only where ``u`` falls
        within float32 rounding of a boundary. Where the sorted window does not
        show every kept token, or top_k cuts at a tie, the kept set is made over the whole vocabulary from the
        cutoff found (``_kept_probs``, as the full path). None for a non-finite logit, or a tie at the top-k cut
        of a window that ended before the cutoff: the full path decides, as before."""
        import torch
        from torch.nn import functional as F
        top = float(x.max())                       # NaN propagates: any NaN, -inf everywhere or +inf -> None
        if not math.isfinite(top):
            return None
        if self.args.temperature == 0:
            return int(torch.argmax(x))
        return self._draw_probs(F.softmax(x, dim=-1))

    def _draw_probs(self, probs: torch.Tensor, first=None, grow: bool = True) -> int | None:
        """``_draw_kept`` from the softmax ``probs`` [vocab] of finite logits (float32, any device; ``first``: see
        ``_top_p_head``). The kept tokens' values come from the sorted window, so only the window leaves the
        device; a kept set the windows do not show is made from the row on the host. With ``grow`` False, None
        (and no random draw) wherever the first window does not show the kept set."""
        import numpy as np
        import torch
        a = self.args
        cutoff, kept, values = _top_p_head(probs, a.top_p, a.top_k, first, grow)
        if kept is not None and 0 < a.top_k < kept.numel():
            if values[a.top_k - 1] == values[a.top_k]:   # a tie at the cut: the lowest ids, over the vocabulary
                kept = None
            else:
                kept, values = kept[:a.top_k], values[:a.top_k]
        if kept is None:
            if cutoff is None or not grow:
                return None
            full = _kept_probs(probs.cpu(), cutoff, a)
            ids = torch.nonzero(full).flatten()
            return self._inverse_cdf(ids, full[ids])
        from rwkv_chat.models.text.draws import kept_draws
        u = float(torch.rand((), dtype=torch.float64, generator=self.generator))
        return int(kept_draws(values.numpy()[None], kept.numpy()[None], np.array([kept.numel()]),
                              np.array([a.temperature]), np.array([u]))[0])

    def _take(self, token: int, vocab_size: int) -> int:
        """Record a greedy draw (stop tokens are not recorded); returns it."""
        if self.counts is None:
            self._allocate(vocab_size)
        if token not in self._stop:
            self.record(token)
        return token

    def state_dict(self) -> dict[str, Any]:
        """Penalty counts and RNG state as plain types (msgpack/JSON friendly apart from ``rng_state`` bytes):
        ``{"format", "vocab_size", "tokens": list[int], "counts": list[float], "seen": list[int], "rng_state":
        bytes}`` (``seen``: the context's tokens of ``repetition_penalty``; a state without it takes ``tokens``)."""
        import torch
        if self.counts is None:
            tokens: list[int] = []
            counts: list[float] = []
            seen: list[int] = []
        else:
            ids = torch.nonzero(self.present).flatten()
            tokens = ids.tolist()
            counts = self.counts[ids].tolist()
            seen = torch.nonzero(self.seen).flatten().tolist()
        return {
            "format": _STATE_FORMAT,
            "vocab_size": self.vocab_size or 0,
            "tokens": tokens,
            "counts": counts,
            "seen": seen,
            "rng_state": bytes(self.generator.get_state().numpy().tobytes()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. Raises StateError if it is malformed or its vocabulary differs."""
        import torch
        try:
            fmt, vocab, tokens, counts = state["format"], state["vocab_size"], state["tokens"], state["counts"]
            seen = list(state.get("seen", tokens))
            rng = torch.frombuffer(bytearray(state["rng_state"]), dtype=torch.uint8).clone()
        except (KeyError, TypeError, ValueError) as e:
            raise StateError(f"malformed sampler state: {e!r}") from None
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in (*tokens, *seen)):
            raise StateError("malformed sampler state: token ids must be integers")
        if fmt != _STATE_FORMAT or len(tokens) != len(counts):
            raise StateError(f"unsupported sampler state (format {fmt!r}, {len(tokens)} tokens, {len(counts)} counts)")
        if vocab and self.vocab_size is not None and vocab != self.vocab_size:
            raise StateError(f"sampler state is for a vocabulary of {vocab}, not {self.vocab_size}")
        if (tokens or seen) and (not vocab or min(tokens + seen) < 0 or max(tokens + seen) >= vocab):
            raise StateError("sampler state has token ids outside its vocabulary")
        try:
            self.generator.set_state(rng)
        except RuntimeError as e:
            raise StateError(f"sampler state has an invalid RNG state: {e}") from None
        if vocab:
            self._allocate(vocab)
            ids = torch.tensor(tokens, dtype=torch.long)
            self.counts[ids] = torch.tensor(counts, dtype=torch.float64)
            self.present[ids] = True
            self.seen[torch.tensor(seen, dtype=torch.long)] = True
            self._present_ids.extend(torch.nonzero(self.present).flatten().numpy())
            self._seen_ids.extend(torch.nonzero(self.seen).flatten().numpy())
        elif self.counts is not None:
            self.reset()


class _Ids:
    """A growing list of token ids kept as an int64 numpy array (amortized doubling), so the penalties index the
    counts with it directly: ``append`` / ``extend`` / ``clear``, ``len()``, truthiness, ``array`` (a view of the
    ids so far, in insertion order)."""

    __slots__ = ("_buf", "_n")

    def __init__(self) -> None:
        import numpy as np
        self._buf = np.empty(64, dtype=np.int64)
        self._n = 0

    def _reserve(self, n: int) -> None:
        import numpy as np
        if n > self._buf.size:
            buf = np.empty(max(n, 2 * self._buf.size), dtype=np.int64)
            buf[:self._n] = self._buf[:self._n]
            self._buf = buf

    def append(self, token: int) -> None:
        self._reserve(self._n + 1)
        self._buf[self._n] = token
        self._n += 1

    def extend(self, ids) -> None:
        self._reserve(self._n + len(ids))
        self._buf[self._n:self._n + len(ids)] = ids
        self._n += len(ids)

    def clear(self) -> None:
        self._n = 0

    @property
    def array(self):
        return self._buf[:self._n]

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0


def _argmax(row: torch.Tensor) -> tuple[int, float]:
    """``(index, value)`` of the first maximum of ``row`` (float tensor [vocab], any device); a NaN counts
    as the maximum (as ``torch.max``), so a non-finite value tells the caller to take the reference's rules.
    A float32 CPU row goes through numpy (~12x faster than ``torch.max`` at vocab 65536 on one thread)."""
    import torch
    if row.device.type == "cpu" and row.dtype == torch.float32:
        x = row.detach().numpy()
        i = int(x.argmax())
        return i, float(x[i])
    value, token = torch.max(row.detach(), dim=0)
    return int(token), float(value)
