"""The model host: the loaded model, its tokenizer and chat template, its batched decoder and the decoder's
batch sizes, and what the daemon makes of failures (out of memory above all).

The engine is reached only through its interface: ``rwkv_chat.models.load_model`` returns a ``Model``
(``.tokenizer``, ``.chat_template``, ``.devices``, ``.decoder(max_batch, buckets)``, ``.forward``, ...).
Runs in the scheduler thread, apart from :meth:`Host.info` and :meth:`Host.expect`.

:meth:`Host.info` (the status's ``model``) says what is loaded (``loaded``, ``path``, ``strategy``, ...), what
is loading (``loading``: the path, ``loading_strategy``, ``progress``: [done, total] layers, ``note``: e.g.
measuring decode batch sizes), the compiled kernels building in the background (``kernel_build``: one
``BackgroundBuild.progress()`` per device type; ``kernels_error`` once the switch found a build failed) and
how the last load failed (``error``: ``path``, ``strategy``, ``kind``, ``message``, ``time``; kept until a load
succeeds). A model given by its local name (``rwkv-chat models``) has ``name`` as well. A model unloaded while
idle (keep-alive) or by an ``Unload`` request is *parked*: ``loaded`` false, ``unloaded`` ("keep-alive" or
"request"), ``path``, ``strategy`` and ``unloaded_at`` (Unix time); :meth:`Host.reload` loads it again.
"""

from __future__ import annotations

import logging
import os
import re
import time

log = logging.getLogger("rwkv_chat.daemon")

_LOADING = ("loading", "loading_strategy", "progress", "note")


def _short(text: str, limit: int = 300) -> str:
    """``text`` cut to ``limit`` characters (status replies stay small whatever a client sent)."""
    return text if len(text) <= limit else text[:limit] + f"… ({len(text) - limit:,} more characters)"


class NoModel(RuntimeError):
    """No model is loaded (start the daemon with --model, set [model] path, or `rwkv-chat load`)."""


class Host:
    """The loaded model, its tokenizer, chat template and batch decoder (scheduler thread only, apart from
    :meth:`info`).

    First use: a model loads at once on the engine's pure-torch path (``kernels=False``) when the compiled
    kernels of its devices are not built yet; they build in the background (``kernels.build_in_background``,
    a child process at low priority) and the scheduler moves the model to them between two steps
    (:meth:`switch_due`, :meth:`use_kernels`). Where they are built already (the cache), the model uses them
    from the start.

    Args:
        kernels: the engine's kernel loader (default: the process's, ``rwkv_chat.models.kernels``).
    """

    def __init__(self, kernels=None, resolve=None):
        from rwkv_chat.models import kernels as compiled

        #: ``resolve(ref) -> path``: a model file or folder, or a local model's name (the registry's resolve)
        self.resolve = resolve if resolve is not None else (lambda ref: ref)
        self._parked: dict | None = None   # load() arguments of a model unloaded by unload(), until reload()
        self._args: dict | None = None     # load() arguments of the loaded model

        self.kernels = kernels if kernels is not None else compiled.default_loader()
        self.model = None
        self.tokenizer = None
        self.template = None          # the model's chat template (rwkv_chat.models.text.templates)
        self.decoder = None           # the model's batched decoder (Model.decoder)
        self.threads = 0
        self.builds: dict = {}        # device type -> kernels.BackgroundBuild the model waits for
        self._decoding = (16, "auto")  # (max_batch, batch_invariant) of the loaded model's decoder
        self._info: dict = {"loaded": False}

    def load(self, path: str, strategy: str, tokenizer: str = "", *, max_batch: int = 16,
             batch_invariant: bool | str = "auto", threads: int = 0, progress=None, context_limit: int = 0) -> None:
        """Load ``path`` with ``strategy``; ``progress(done_layers, total_layers)`` is called while the
        layers are placed. Sets torch's intra-op threads (``threads``, 0 = :func:`auto_threads`) and the
        decoder's batch sizes (:func:`decode_buckets` of ``batch_invariant``: True, False or "auto"); the status's
        ``context_limit`` is the model's own or ``context_limit`` (``[model] context_limit``, see
        :func:`rwkv_chat.daemon.context.limit_of`), None without one. The model
        uses the compiled kernels where they are built; else it serves on the torch path while they build
        (see the class). Raises what ``load_model`` raises (CheckpointError, StrategyError, TokenizerError,
        MemoryError, …); the previous model stays loaded then. ``path`` may be a local model's name (resolved
        by ``resolve``: FileNotFoundError when it names nothing)."""
        import torch

        from rwkv_chat.models import load_model

        from .context import limit_of

        args = {"path": path, "strategy": strategy, "tokenizer": tokenizer, "max_batch": max_batch,
                "batch_invariant": batch_invariant, "threads": threads}
        ref = path
        try:
            path = os.path.abspath(os.path.expanduser(self.resolve(ref)))
        except FileNotFoundError as e:
            self._info = {**{k: v for k, v in self._info.items() if k not in _LOADING},
                          "error": {"path": _short(ref), "strategy": _short(strategy), "kind": "NotFound",
                                    "message": _short(str(e), 500), "time": time.time()}}
            raise
        name = ref if path != os.path.abspath(os.path.expanduser(ref)) else ""
        self.expect(path, strategy)

        def placed(done: int, total: int) -> None:
            self._info["progress"] = [done, total]
            if progress is not None:
                progress(done, total)

        old_threads = torch.get_num_threads()
        builds = {}
        try:
            model = load_model(path, strategy, tokenizer=tokenizer or None, progress=placed, kernels=False)
            types = sorted({d.type for d in model.devices})
            waiting = [t for t in types if not self.kernels.ready(t)]
            if waiting:
                builds = {t: self.builds.get(t) or self.kernels.build_in_background(t) for t in waiting}
                log.info("serving %s on the torch path while the %s kernels build", path, "/".join(waiting))
            else:
                model.use_kernels()                             # built before: from the cache, at once
            n_threads = threads or auto_threads(model)
            torch.set_num_threads(n_threads)                    # the buckets are measured with these threads
            self._info["note"] = "measuring decode batch sizes"
            decoder, invariant = make_decoder(model, max_batch, batch_invariant)
        except BaseException as e:
            torch.set_num_threads(old_threads)
            kind, message = classify(e)
            self._info = {**{k: v for k, v in self._info.items() if k not in _LOADING},
                          "error": {"path": _short(path), "strategy": _short(strategy), "kind": kind,
                                    "message": _short(message, 500), "time": time.time()}}
            raise
        self.model = self.tokenizer = self.template = self.decoder = None   # release the old weights first
        self.model, self.tokenizer, self.template, self.decoder = model, model.tokenizer, model.chat_template, decoder
        self.threads = n_threads
        self.builds = builds
        self._decoding = (max_batch, batch_invariant)
        self._args, self._parked = args, None
        self._info = {"loaded": True, "path": path, "name": name, "strategy": strategy,
                      "family": getattr(model, "family", "rwkv"), "version": model.version,
                      "plan": str(model.plan), "backend": str(model.backend), "fingerprint": model.fingerprint,
                      "n_layer": getattr(model, "n_layer", None), "n_embd": getattr(model, "n_embd", None),
                      "vocab_size": model.vocab_size, "tokenizer": self.tokenizer.name,
                      "threads": self.threads, "max_batch": max_batch, "buckets": list(decoder.buckets),
                      "batch_invariant": invariant,
                      "context_limit": limit_of(model, context_limit),
                      "sampling_defaults": dict(getattr(model.chat_template, "sampling_defaults", None) or {})}

    # -- the compiled kernels, built in the background
    def switch_due(self) -> bool:
        """Whether the kernels the model waited for have finished building (built or failed): time for
        :meth:`use_kernels`, between two steps."""
        return self.model is not None and bool(self.builds) and all(b.done for b in self.builds.values())

    # -- keep-alive: unloading an idle model and loading it again
    @property
    def parked(self) -> bool:
        """Whether a model was unloaded by :meth:`unload` and loads again with :meth:`reload`."""
        return self.model is None and self._parked is not None

    def unload(self, reason: str) -> bool:
        """Free the model (its weights, decoder, device memory) and remember how it was loaded, so that
        :meth:`reload` loads it again; ``reason``: "keep-alive" or "request" (shown by :meth:`info`). Returns
        False when no model was loaded. The caller has no generation running and forgets its in-memory
        states (they are on disk)."""
        if self.model is None:
            return False
        import gc

        import torch

        info = self._info
        self._parked = self._args
        self.model = self.tokenizer = self.template = self.decoder = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self._info = {"loaded": False, "unloaded": reason, "unloaded_at": time.time(), "path": info.get("path", ""),
                      "name": info.get("name", ""), "strategy": info.get("strategy", "")}
        log.info("unloaded %s (%s)", info.get("path"), reason)
        return True

    def reload(self, progress=None) -> None:
        """Load the parked model again, as :meth:`load` loaded it (``progress(done, total)`` layers). Raises
        what :meth:`load` raises; the model is no longer parked then (the status shows the error)."""
        args, self._parked = self._parked, None
        if args is None:
            raise NoModel("no model to load again")
        self.load(**args, progress=progress)

    def use_kernels(self) -> None:
        """Move the model to the compiled kernels (``Model.use_kernels``) and make its decoder again (new
        batch sizes measured). The caller takes every generation's state out of the old decoder first and
        puts it into the new one after. A build that failed leaves the torch fallbacks serving (status says
        why); an error here keeps the model on the path it had."""
        builds, self.builds = self.builds, {}
        failed = [f"{t}: {b.error}" for t, b in builds.items() if b.state == "failed"]
        model = self.model
        max_batch, batch_invariant = self._decoding
        try:
            model.use_kernels()
            decoder, invariant = make_decoder(model, max_batch, batch_invariant)
        except Exception as e:  # noqa: BLE001 — the torch path keeps serving
            log.exception("could not move the model to the compiled kernels; the torch path serves on")
            failed.append(f"switching failed: {type(e).__name__}: {e}")
            decoder, invariant = make_decoder(model, max_batch, batch_invariant)
        self.decoder = decoder
        log.info("the model now runs on %s", model.backend)
        self._info.update(backend=str(model.backend), plan=str(model.plan), buckets=list(decoder.buckets),
                          batch_invariant=invariant, kernels_error="; ".join(failed))

    def close(self) -> None:
        """Stop the background builds (the daemon is stopping; a later start resumes them)."""
        for b in self.builds.values():
            b.cancel()

    def info(self) -> dict:
        info = dict(self._info)
        builds = dict(self.builds)
        if builds:
            info["kernel_build"] = [b.progress() for b in builds.values()]
        return info

    def strategy_for(self, path: str, strategy: str, default: str) -> str:
        """The strategy a load of ``path`` (a checkpoint or a local model's name) runs with: ``strategy`` where one
        is named; else ``default`` (the config's) in the checkpoint's own weight format where it holds one (a file
        of ``rwkv-chat convert``, a GPTQ folder: ``plan.fitted_strategy``), so a pre-quantized file loads as it
        is. Best effort: a checkpoint that cannot be read here, whatever the error, keeps ``default`` (the load
        reports why)."""
        if strategy:
            return strategy
        from rwkv_chat.models import fitted_strategy

        try:
            return fitted_strategy(os.path.expanduser(self.resolve(path)), default)
        except Exception:  # noqa: BLE001 — the load that follows reads the file and says what is wrong
            return default

    def expect(self, path: str, strategy: str) -> None:
        """Say (in :meth:`info`) that ``path`` (or a local model's name) is about to load with ``strategy``
        (any thread)."""
        try:
            path = self.resolve(path)
        except FileNotFoundError:
            pass                                # load() says so
        self._info = {**{k: v for k, v in self._info.items() if k not in _LOADING},
                      "loading": _short(os.path.abspath(os.path.expanduser(path))), "loading_strategy": _short(strategy)}

    def need(self):
        """``(model, tokenizer, chat template)`` of the loaded model. Raises NoModel (saying how the last load
        failed, where one did)."""
        if self.model is None and self._parked is not None:
            raise NoModel("the model was unloaded while idle and is loading again; retry in a moment")
        if self.model is None and (err := self._info.get("error")):
            raise NoModel(f"no model is loaded: loading {err['path']} with strategy {err['strategy']!r} failed "
                          f"({err['message']}); run `rwkv-chat load PATH --strategy S` (--default keeps it)")
        if self.model is None:
            raise NoModel("no model is loaded: start the daemon with --model PATH, set [model] path in the "
                          "config, or run `rwkv-chat load PATH`")
        return self.model, self.tokenizer, self.template


#: models with n_embd below this decode fastest on one CPU thread (measured: bench/results/cpu.md, "Daemon vs engine")
SMALL_EMBD = 512


def auto_threads(model) -> int:
    """Default torch intra-op threads: 1 for small models (n_embd < SMALL_EMBD: per-op overhead dominates
    and extra threads only add synchronisation), else min(4, CPU cores)."""
    if getattr(model, "n_embd", SMALL_EMBD) < SMALL_EMBD:
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def batch_invariance(setting: bool | str, device_types) -> bool:
    """Whether decode steps must be batch-invariant, from ``[daemon] batch_invariant`` (True, False or
    "auto") and the device types of the model's layers (e.g. ``{"cpu"}``, ``{"cuda"}``): "auto" means
    invariant where every layer is on the CPU (where :func:`decode_buckets` still drops it if the measured
    buckets have a floor above 1 row) and not on CUDA or any other accelerator (invariance there can cost a
    ``max_batch``-row step for one conversation, and fp16 results of the graph, batched and plain paths
    agree only within a tolerance anyway). Raises ConfigError for any other setting."""
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return all(t == "cpu" for t in device_types)
    from rwkv_chat.daemon.config import ConfigError

    raise ConfigError(f'[daemon] batch_invariant must be true, false or "auto", got {setting!r}')


def make_decoder(model, max_batch: int, batch_invariant: bool | str):
    """``(decoder, invariant)``: the model's batched decoder with the batch sizes of :func:`decode_buckets`, and
    whether its steps are batch-invariant (fixed buckets chosen)."""
    buckets = decode_buckets(model, max_batch, batch_invariant)
    return model.decoder(max_batch, buckets), buckets is not None


def decode_buckets(model, max_batch: int, batch_invariant: bool | str) -> tuple[int, ...] | None:
    """Batch sizes (rows) the daemon's decode step may run at, ascending, the last one ``max_batch``; None
    for the engine's default ones (``model.decoder(max_batch)``).

    Invariant (:func:`batch_invariance` of ``batch_invariant`` and ``model.devices``): a conversation's
    logits must be bit-identical whichever others share its step, so only the buckets that compute a row
    exactly as the ``max_batch`` bucket does are used, measured at load by :func:`invariant_buckets` (the
    kernels pick their GEMM by shape: on CPU the fused kernel is row-count invariant for small matrices up
    to 16 rows and BLAS from about 4 rows on, so the tiny models keep every bucket and larger ones a floor;
    on CUDA cuBLAS and the fused GEMV choose by row count, so often only ``max_batch`` is left, and the
    measurement captures a CUDA graph per bucket: slower to load and to decode). Not invariant: the
    engine's default buckets (None), a lone conversation stepping one row.
    "auto" on CPU keeps the measured buckets only when they start at 1 (invariance costs a lone conversation
    nothing: the tiny models); otherwise (a floor, e.g. (4, 8, 16) for RWKV-7 0.1B, where MKL computes 1-3
    rows with other kernels and a 4-row step costs ~3x a 1-row step on 2 cores) it takes the default buckets.
    Call it with the daemon's torch thread count already set (CPU kernels can choose by thread count).
    Raises ConfigError for a bad setting; what the decoder's ``step`` raises during the measurement."""
    if not batch_invariance(batch_invariant, {d.type for d in model.devices}):
        return None
    measured = invariant_buckets(model, max_batch)
    if batch_invariant == "auto" and measured[0] != 1:
        return None                              # auto: invariance only where a lone conversation pays nothing
    return measured


def invariant_buckets(model, max_batch: int, steps: int = 2) -> tuple[int, ...]:
    """The candidate buckets (those of the engine's default decoder: its default ones below ``max_batch``, and
    ``max_batch``) whose decode steps give every row bit-identical logits (float32 [vocab]) to the
    ``max_batch`` bucket's, found by running ``steps`` steps per bucket from the zero state with a distinct
    token per row (kernels are chosen by shape and thread count, never by value, so one set of values shows
    their choice). Always includes ``max_batch``. Cost: ``steps`` decode steps per candidate (milliseconds
    for the tiny models on CPU, about a second for a 1.5B model; on CUDA each bucket's graph capture as well)."""
    import torch

    dec = model.decoder(max_batch)
    cands = tuple(dec.buckets)
    vocab = model.vocab_size
    rows: dict[int, torch.Tensor] = {}
    for b in reversed(cands):                                # max_batch first: a mismatch stops nothing
        hs = [dec.add(None) for _ in range(b)]
        outs = []
        for s in range(steps):
            out = dec.step({h: (31 * i + 7 * s + 1) % vocab for i, h in enumerate(hs)})
            outs.append(torch.stack([out[h] for h in hs]).float().cpu())
        rows[b] = torch.stack(outs)                          # [steps, b, vocab]
        for h in hs:
            dec.remove(h)
    ref = rows[max_batch]
    del dec
    return tuple(b for b in cands if torch.equal(rows[b], ref[:, :b]))


_OOM_TEXT = re.compile(r"out of memory|can't allocate memory|cannot allocate memory|not enough memory", re.I)


def is_oom(e: BaseException | None) -> bool:
    """Whether ``e``, or an exception it was raised from (``__cause__``/``__context__``, e.g. a
    CheckpointError wrapping a failed allocation), is an out-of-memory condition: MemoryError,
    torch.OutOfMemoryError, ENOMEM, or an allocator RuntimeError."""
    import errno

    import torch

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            return True
        if isinstance(e, OSError) and e.errno == errno.ENOMEM:
            return True
        if isinstance(e, (RuntimeError, OSError)) and _OOM_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


#: characters of an Error/Failed message (an exception's text beyond it is cut: it may quote what a client sent)
MAX_ERROR_CHARS = 1000


def classify(e: BaseException) -> tuple[str, str]:
    """``(kind, message)`` of an exception for an Error/Failed message; the message is at most
    :data:`MAX_ERROR_CHARS` characters."""
    kind, text = _classify(e)
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + f"… ({len(text):,} characters)"
    return kind, text


def _classify(e: BaseException) -> tuple[str, str]:
    from rwkv_chat.models import RWKVError

    from .branches import Conflict
    from .context import ContextLimitExceeded
    from .protocol.messages import InvalidId, LimitError
    from .store import NotFound

    if is_oom(e):
        return "OOM", f"out of memory: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if isinstance(e, (RWKVError, NoModel, NotFound, InvalidId, LimitError, ContextLimitExceeded)):
        return type(e).__name__, str(e)
    if isinstance(e, Conflict):
        return "Conflict", str(e)
    if isinstance(e, FileNotFoundError):
        return "NotFound", str(e)
    if isinstance(e, ValueError):
        return "ValueError", str(e)
    return "Internal", f"{type(e).__name__}: {e}"
