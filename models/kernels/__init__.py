"""Compiled kernels: build at first use, cache, report, and dispatch with a pure-torch fallback.

The C++/CUDA sources live in ``csrc/`` (one folder per op family). ``ensure_built("cpu")`` builds
one CPU library (all CPU ops, OpenMP) and ``ensure_built("cuda")`` one CUDA library (all CUDA ops)
with ``torch.utils.cpp_extension.load`` and ninja, into
``<cache dir>/kernels/<device>-<source hash>-torch<version>-cuda<version>-<arch>/``, so a second
process reuses the build at once. The ops register under ``torch.ops.rwkv_chat`` as
``<family>_<device>`` (``wkv7_cuda``, ``mm8_cpu``, ...) and write into caller-allocated outputs.

A failed build is never silent: the reason is logged and kept, ``report()`` returns it (``rwkv-chat
doctor --json``), and the dispatch functions (``wkv4``, ``wkv5``, ``wkv7``, ``mm8``, ``gemm``) serve
those calls with the pure-torch paths of ``models/rwkv/wkv.py`` and ``models/formats/i8.py``. ``install()``
rebinds ``wkv.wkv4/wkv5/wkv7`` and ``quant.mm8`` to these dispatch functions.

The dispatch functions validate their inputs first, whichever path serves them, and raise
``DeviceError``, ``UnsupportedDtypeError`` or ``ShapeMismatchError`` (never ``assert``).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from rwkv_chat.models.formats import i8 as _quant
from rwkv_chat.models.rwkv import wkv as _wkv
from rwkv_chat.models.errors import DeviceError, ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.kernels.checks import (CPU_FAMILIES, CUDA_FAMILIES, FAMILIES, check_mm8, check_wkv4, check_wkv5,
                         check_wkv7)

log = logging.getLogger("rwkv_chat.kernels")

CPU_SOURCES = ("bindings/cpu_ops.cpp", "wkv4/wkv4_cpu.cpp", "wkv5/wkv5_cpu.cpp", "wkv6/wkv6_cpu.cpp",
               "wkv7/wkv7_cpu.cpp", "mm8/mm8_cpu.cpp", "fused_cpu/fused_cpu.cpp")
CUDA_SOURCES = ("bindings/cuda_ops.cpp", "bindings/fused_ops.cpp", "bindings/chunk_ops.cpp", "gemm/gemm_cuda.cpp",
                "wkv4/wkv4_cuda.cu", "wkv5/wkv5_cuda.cu", "wkv6/wkv6_cuda.cu", "wkv7/wkv7_cuda.cu",
                "wkv7/wkv7_chunk_cuda.cu", "mm8/mm8_cuda.cu", "fused/v7_fused.cu")
CPU_CFLAGS = ("-O3", "-std=c++17", "-fopenmp")
CUDA_CFLAGS = ("-O3", "-std=c++17")
CUDA_NVCC_FLAGS = ("-O3", "-std=c++17", "-Xptxas=-O3", "--extra-device-vectorization")
NOT_BUILT = "not built yet (ensure_built has not run for this device)"
CPU_GEMM_REASON = "no compiled CPU gemm: torch.matmul (oneDNN/MKL) serves CPU products"
CPU_REASONS = {"gemm": CPU_GEMM_REASON,
               "v7fused": "the fused RWKV-7 layer kernels (models/backends/fused_cuda.py) are CUDA only"}
#: the op whose presence marks a family as loaded (default ``<family>_<device>``)
OP_NAMES = {"v7fused": "v7_tmix_one"}

ProgressFn = Callable[[str], None]


def default_source_dir() -> Path:
    """The ``csrc/`` folder shipped with the package."""
    import rwkv_chat.csrc as csrc_pkg
    return Path(csrc_pkg.__file__).resolve().parent


def default_cache_dir() -> Path:
    """``<user cache dir>/kernels`` from platformdirs (``~/.cache/rwkv-chat/kernels`` on Linux). The daemon
    passes its own home's cache directory instead (``set_cache_dir``)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("rwkv-chat")) / "kernels"


def _cuda_arches() -> list[tuple[int, int]]:
    return sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})


class KernelLoader:
    """Builds, caches and loads the kernel libraries of one source tree into one cache dir.

    Args:
        source_dir: the ``csrc`` folder to build (default: the package's).
        cache_dir: where builds are kept (default: ``default_cache_dir()``).
        progress: called with a one-line message when a build starts, ends, fails or is reused.
    """

    def __init__(self, source_dir: Path | str | None = None, cache_dir: Path | str | None = None,
                 progress: ProgressFn | None = None):
        self.source_dir = Path(source_dir) if source_dir else default_source_dir()
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.progress = progress
        self.status: dict[str, dict[str, str]] = {
            "cpu": {f: NOT_BUILT for f in FAMILIES}, "cuda": {f: NOT_BUILT for f in FAMILIES}}
        self.builds: dict[str, dict] = {}
        self._lock = threading.Lock()

    @property
    def cache_dir(self) -> Path:
        return self._cache_dir or default_cache_dir()

    @cache_dir.setter
    def cache_dir(self, path: Path | str | None) -> None:
        self._cache_dir = Path(path) if path else None

    def _say(self, msg: str) -> None:
        log.info(msg)
        if self.progress is not None:
            self.progress(msg)

    def build_key(self, device: str) -> str:
        """``<device>-<source hash>-torch<v>-cuda<v>-<arch>``: names the build directory."""
        sources = CPU_SOURCES if device == "cpu" else CUDA_SOURCES
        h = hashlib.sha256()
        files = sorted(p for p in self.source_dir.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh"))
        for p in files:
            h.update(str(p.relative_to(self.source_dir)).encode())
            h.update(p.read_bytes())
        h.update(repr((sources, CPU_CFLAGS, CUDA_CFLAGS, CUDA_NVCC_FLAGS)).encode())
        if device == "cpu":
            arch = platform.machine() or "cpu"
        else:
            arch = "-".join(f"sm{a}{b}" for a, b in _cuda_arches()) or "nogpu"
        cuda = torch.version.cuda or "none"
        return f"{device}-{h.hexdigest()[:16]}-torch{torch.__version__}-cuda{cuda}-{arch}".replace("+", "_")

    def ensure_built(self, device: str | torch.device) -> dict[str, str]:
        """Build (or reuse) and load the library for a device type; never raises for a failed build.

        Args:
            device: "cpu", "cuda", "cuda:N" or a torch.device; other device types get no kernels.
        Returns:
            ``{family: "ok" | reason}`` for that device type (also kept for ``report()``).
        """
        dev = torch.device(device).type if not isinstance(device, torch.device) else device.type
        if dev not in ("cpu", "cuda"):
            return {f: f"no compiled kernels for device type {dev!r}: torch paths" for f in FAMILIES}
        with self._lock:
            if all(v != NOT_BUILT for v in self.status[dev].values()):
                return dict(self.status[dev])
            if dev == "cuda" and not torch.cuda.is_available():
                why = ("CUDA unavailable (torch built without CUDA)" if torch.version.cuda is None
                       else "CUDA unavailable (no GPU visible)")
                self.status[dev] = {f: why for f in FAMILIES}
                return dict(self.status[dev])
            try:
                self._build_and_load(dev)
            except Exception as e:  # noqa: BLE001 - any build failure becomes a reported fallback
                lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
                errs = [ln for ln in lines if "error" in ln.lower()]   # compiler errors before warnings/notes
                detail = " | ".join((errs or lines)[-6:])[-1500:] if lines else type(e).__name__
                why = f"build failed ({type(e).__name__}: {detail}); using the torch path"
                log.warning("rwkv-chat %s kernels: %s", dev, why)
                self._say(f"{dev} kernels: build failed, using the torch path")
                self.status[dev] = {f: why for f in FAMILIES}
                return dict(self.status[dev])
            families = CPU_FAMILIES if dev == "cpu" else CUDA_FAMILIES
            ops = torch.ops.rwkv_chat
            for f in FAMILIES:
                if f not in families:
                    self.status[dev][f] = CPU_REASONS.get(f, "no compiled kernel for this device: torch path")
                elif hasattr(ops, f"{OP_NAMES.get(f, f)}_{dev}"):
                    self.status[dev][f] = "ok"
                    _LOADED.add((dev, f))
                else:
                    self.status[dev][f] = f"op rwkv_chat::{f}_{dev} missing from the built library; torch path"
            return dict(self.status[dev])

    def _build_and_load(self, dev: str) -> None:
        key = self.build_key(dev)
        build_dir = self.cache_dir / key
        name = f"rwkv_chat_{dev}_{key.split('-')[1][:12]}"
        lib = build_dir / f"{name}.so"
        t0 = time.perf_counter()
        if key in _LOADED_KEYS:          # this very build is already loaded (from any cache dir)
            cached = True
        elif lib.exists():
            torch.ops.load_library(str(lib))
            _LOADED_KEYS.add(key)
            cached = True
        else:
            from torch.utils.cpp_extension import load
            build_dir.mkdir(parents=True, exist_ok=True)
            sources = [str(self.source_dir / s) for s in (CPU_SOURCES if dev == "cpu" else CUDA_SOURCES)]
            missing = [s for s in sources if not Path(s).exists()]
            if missing:
                raise FileNotFoundError(f"kernel sources missing: {missing}")
            self._say(f"building {dev} kernels in {build_dir} (first use; about a minute)")
            kwargs = dict(name=name, sources=sources, build_directory=str(build_dir), is_python_module=False,
                          verbose=False, extra_cflags=list(CPU_CFLAGS if dev == "cpu" else CUDA_CFLAGS))
            if dev == "cpu":
                kwargs["extra_ldflags"] = ["-fopenmp"]
            else:
                gencode = [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in _cuda_arches()]
                kwargs["extra_cuda_cflags"] = list(CUDA_NVCC_FLAGS) + gencode
            load(**kwargs)
            _LOADED_KEYS.add(key)
            cached = False
        secs = time.perf_counter() - t0
        self.builds[dev] = {"key": key, "dir": str(build_dir), "cached": cached, "seconds": round(secs, 3)}
        self._say(f"{dev} kernels {'loaded from cache' if cached else 'built'} in {secs:.1f} s ({key})")

    def report(self) -> dict[str, dict[str, str]]:
        """``{"cpu": {family: "ok" | reason}, "cuda": {...}}`` for families wkv4, wkv5, wkv6, wkv7, mm8, gemm,
        v7fused (the fused RWKV-7 layer kernels, CUDA only)."""
        return {d: dict(v) for d, v in self.status.items()}


# The torch paths the engine had before ``install()`` (e.g. the chunked prefill forms); fallbacks use them.
_TORCH_WKV4, _TORCH_WKV5, _TORCH_WKV7, _TORCH_MM8 = _wkv.wkv4, _wkv.wkv5, _wkv.wkv7, _quant.mm8
_LOADED: set[tuple[str, str]] = set()      # (device type, family) with a loaded op in this process
_LOADED_KEYS: set[str] = set()          # build keys whose library is loaded
_DEFAULT = KernelLoader()


def default_loader() -> KernelLoader:
    """The process-wide loader the engine and ``rwkv-chat doctor`` use."""
    return _DEFAULT


def set_cache_dir(path: Path | str | None) -> None:
    """Keep the default loader's builds under ``path`` (None: ``default_cache_dir()``)."""
    _DEFAULT.cache_dir = path


def set_progress(progress: ProgressFn | None) -> None:
    """Send the default loader's build progress messages to ``progress`` (also logged)."""
    _DEFAULT.progress = progress


def ensure_built(device: str | torch.device) -> dict[str, str]:
    """Build or reuse the kernels for a device type with the default loader. See ``KernelLoader.ensure_built``."""
    return _DEFAULT.ensure_built(device)


def report() -> dict[str, dict[str, str]]:
    """The default loader's per-device, per-family status: ``"ok"`` or the reason for the torch path."""
    return _DEFAULT.report()


def available(device_type: str, family: str) -> bool:
    """Whether the compiled op ``<family>_<device_type>`` is loaded in this process."""
    return (device_type, family) in _LOADED


def install() -> None:
    """Route the engine's public entry points through the dispatch functions of this module.

    Rebinds ``rwkv_chat.models.rwkv.wkv.wkv4/wkv5/wkv7`` and ``rwkv_chat.models.formats.i8.mm8``. The dispatch
    functions use compiled ops where ``ensure_built`` loaded them and the torch paths elsewhere, so
    calling ``install()`` before or after ``ensure_built`` is safe; it is idempotent.
    """
    _wkv.wkv4, _wkv.wkv5, _wkv.wkv7 = wkv4, wkv5, wkv7
    _quant.mm8 = mm8


def _op(dev: str, family: str):
    return getattr(torch.ops.rwkv_chat, f"{family}_{dev}")


def wkv4(w, u, k, v, aa, bb, pp, *, out=None):
    """RWKV-4 WKV; same contract as ``wkv.wkv4_torch`` (w, u float32 [C]; k, v [B, T, C] fp32/fp16/bf16;
    aa, bb, pp float32 [B, C]) -> ``(y [B, T, C] k.dtype, aa, bb, pp)``, new tensors.

    ``out=(y, aa, bb, pp)`` writes into given contiguous tensors instead.
    Raises: DeviceError, UnsupportedDtypeError, ShapeMismatchError.
    """
    check_wkv4(w, u, k, v, aa, bb, pp, out)
    dev = k.device.type
    if not available(dev, "wkv4"):
        y, a2, b2, p2 = _TORCH_WKV4(w, u, k.float(), v.float(), aa, bb, pp)
        return _fill(out, (y.to(k.dtype), a2, b2, p2))
    k, v = k.contiguous(), v.contiguous()
    o = out or (torch.empty_like(k), torch.empty_like(aa), torch.empty_like(bb), torch.empty_like(pp))
    _op(dev, "wkv4")(w.contiguous(), u.contiguous(), k, v, aa.contiguous(), bb.contiguous(), pp.contiguous(), *o)
    return tuple(o)


def wkv5(r, k, v, w, u, s, *, out=None):
    """RWKV-5/5.1/5.2 (w float32 [H, N]) and RWKV-6 (w float32 [B, T, H, N]) WKV; same contract as
    ``wkv.wkv5_torch``: r, k, v [B, T, H, N] fp32/fp16/bf16, u float32 [H, N], s float32 [B, H, N, N]
    ([key, value]) -> ``(y [B, T, H, N] r.dtype, new s)``. ``out=(y, s_new)`` writes into given tensors.
    Raises: DeviceError, UnsupportedDtypeError, ShapeMismatchError.
    """
    check_wkv5(r, k, v, w, u, s, out)
    dev, fam = r.device.type, ("wkv6" if w.dim() == 4 else "wkv5")
    if not available(dev, fam):
        y, s2 = _TORCH_WKV5(r.float(), k.float(), v.float(), w, u, s)
        return _fill(out, (y.to(r.dtype), s2))
    r, k, v = r.contiguous(), k.contiguous(), v.contiguous()
    o = out or (torch.empty_like(r), torch.empty_like(s))
    _op(dev, fam)(r, k, v, w.contiguous(), u.contiguous(), s.contiguous(), *o)
    return tuple(o)


#: on CUDA, sequences of at least this many tokens take the chunked WKV-7 kernel (head size 64) ...
WKV7_CHUNK_MIN_T = 128
#: ... when batch x heads is at most this many per multiprocessor. The chunked kernel's time grows with
#: batch x heads from the first head on, the sequential kernel's (one dependent chain per head) stays flat
#: until the heads fill the GPU. H100 (132 multiprocessors), us sequential / chunked: T = 1024, 32 heads
#: 333 / 245, 64 heads 342 / 431, 256 heads 907 / 1617; T = 256, 32 heads 81 / 62; T = 64, 32 heads
#: 22.5 / 36.9 (``bench/results/kernels_bench_h100.md``).
WKV7_CHUNK_MAX_HEADS_PER_SM = 1 / 3
#: tokens per chunk of the chunked WKV-7 kernel (16 or 32)
WKV7_CHUNK = 32


def wkv7_chunk_choice(B: int, T: int, H: int, multiprocessors: int) -> int:
    """The chunk length ``wkv7`` picks on CUDA for head size 64: ``WKV7_CHUNK`` (the chunked kernel) for
    T >= ``WKV7_CHUNK_MIN_T`` and B * H <= ``WKV7_CHUNK_MAX_HEADS_PER_SM`` * multiprocessors, else 0 (the
    sequential kernel)."""
    many = B * H > WKV7_CHUNK_MAX_HEADS_PER_SM * multiprocessors
    return 0 if T < WKV7_CHUNK_MIN_T or many else WKV7_CHUNK


_SM_COUNTS: dict[int, int] = {}


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def wkv7(r, w, k, v, a, b, s, *, out=None, chunk: int | None = None):
    """RWKV-7 WKV; same contract as ``wkv.wkv7_torch``: r, k, v, a, b [B, T, H, N] fp32/fp16/bf16 (one
    dtype), w float32 [B, T, H, N] decay factors in RWKV-7's range (``exp(-e^{-1/2}·sigmoid(·))``, so in
    [0.545, 1)), s float32 [B, H, N, N] ([value, key]) -> ``(y float32 [B, T, H, N], new s)``.
    ``out=(y, s_new)`` writes into given tensors.

    ``chunk``: None picks the kernel (CUDA, head size 64: ``wkv7_chunk_choice``, the chunked kernel of
    ``csrc/wkv7/wkv7_chunk_cuda.cu`` in chunks of ``WKV7_CHUNK`` for long sequences of few batch x heads;
    otherwise the sequential kernel); 0 forces
    the sequential kernel; 16 or 32 forces the chunked kernel with that chunk length where it applies.
    Raises: DeviceError, UnsupportedDtypeError, ShapeMismatchError.
    """
    check_wkv7(r, w, k, v, a, b, s, out)
    dev = r.device.type
    if not available(dev, "wkv7"):
        return _fill(out, _TORCH_WKV7(r, w, k, v, a, b, s))
    r, w, k, v, a, b = (t.contiguous() for t in (r, w, k, v, a, b))
    o = out or (torch.empty(r.shape, dtype=torch.float32, device=r.device), torch.empty_like(s))
    B, T, H, N = r.shape
    if chunk is None:
        chunk = wkv7_chunk_choice(B, T, H, _multiprocessors(r.device)) if dev == "cuda" else 0
    if chunk in (16, 32) and dev == "cuda" and N == 64 and hasattr(torch.ops.rwkv_chat, "wkv7_chunk_cuda"):
        torch.ops.rwkv_chat.wkv7_chunk_cuda(r, w, k, v, a, b, s.contiguous(), *o, chunk)
        return tuple(o)
    _op(dev, "wkv7")(r, w, k, v, a, b, s.contiguous(), *o)
    return tuple(o)


def mm8(x: torch.Tensor, q: _quant.Int8Weight, *, out=None) -> torch.Tensor:
    """``x @ q.dequantize()`` for an i8 weight; same contract as ``quant.mm8_torch``.

    Args:
        x: [..., N] fp32/fp16/bf16 on q's device.
        q: Int8Weight (logical [N, M]). The compiled ops read the layout of their device: output-major on
            CUDA (GEMV for <= 4 rows, else dequantize + cuBLAS), input-major on the CPU; a weight in the
            other layout is served by the torch path (``quant.mm8_torch``), correct but slower.
            Scales are cast to x.dtype if they differ.
        out: optional contiguous [..., M] tensor of x.dtype to write.
    Returns: [..., M] in x.dtype (fp32 accumulation in the compiled paths).
    Raises: DeviceError, UnsupportedDtypeError, ShapeMismatchError.
    """
    check_mm8(x, q, out)
    dev = x.device.type
    if not available(dev, "mm8") or q.output_major != _quant.prefers_output_major(x.device):
        y = _TORCH_MM8(x, q)
        return y if out is None else out.copy_(y)
    N, M = q.shape
    x2 = x.reshape(-1, N).contiguous()
    sc = [t if t.dtype == x.dtype else t.to(x.dtype) for t in (q.mx, q.rx, q.my, q.ry)]
    y = out if out is not None else torch.empty(*x.shape[:-1], M, dtype=x.dtype, device=x.device)
    _op(dev, "mm8")(x2, q.storage.contiguous(), *(t.contiguous() for t in sc), y.view(-1, M))
    return y


def gemm(x: torch.Tensor, w: torch.Tensor, output_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ w`` with cuBLAS (fp32 accumulation) for fp16/bf16 on CUDA, ``torch.matmul`` elsewhere.

    Args:
        x: [..., K]; w: [K, M] of x's dtype and device (row-major, or a transposed row-major matrix).
        output_dtype: x.dtype (default) or float32 (e.g. logits without an fp16 round trip).
    Returns: [..., M] in ``output_dtype``.
    Raises: DeviceError, UnsupportedDtypeError, ShapeMismatchError.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise UnsupportedDtypeError("gemm needs tensors")
    if x.device != w.device:
        raise DeviceError(f"gemm: x on {x.device}, w on {w.device}")
    if w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[0]:
        raise ShapeMismatchError(f"gemm: x {tuple(x.shape)} @ w {tuple(w.shape)} do not match")
    if x.dtype != w.dtype or not x.is_floating_point():
        raise UnsupportedDtypeError(f"gemm: x {x.dtype} and w {w.dtype} must be one floating dtype")
    odt = output_dtype or x.dtype
    if odt not in (x.dtype, torch.float32):
        raise UnsupportedDtypeError(f"gemm: output dtype {odt} must be {x.dtype} or float32")
    cublas_ok = (x.device.type == "cuda" and available("cuda", "gemm") and x.dtype in (torch.float16, torch.bfloat16)
                 and (w.is_contiguous() or w.t().is_contiguous()))
    if not cublas_ok:
        y = x @ w
        return y if y.dtype == odt else y.to(odt)
    K, M = w.shape
    y = torch.empty(*x.shape[:-1], M, dtype=odt, device=x.device)
    _op("cuda", "gemm")(x.reshape(-1, K).contiguous(), w, y.view(-1, M))
    return y


def _fill(out, results):
    if out is None:
        return tuple(results)
    for o, r in zip(out, results):
        o.copy_(r)
    return tuple(out)
