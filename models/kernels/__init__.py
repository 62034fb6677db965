"""Compiled kernels: build at first use, cache, report; the op dispatch functions live in ``dispatch``.

The C++/CUDA sources live in ``csrc/`` (one folder per op family). ``ensure_built("cpu")`` builds
one CPU library (all CPU ops, OpenMP) and ``ensure_built("cuda")`` one CUDA library (all CUDA ops)
with ``torch.utils.cpp_extension.load`` and ninja, into
``<cache dir>/kernels/<device>-<source hash>-torch<version>-cuda<version>-<arch>/``, so a second
process reuses the build at once. The ops register under ``torch.ops.rwkv_chat`` as
``<family>_<device>`` (``wkv7_cuda``, ``mm8_cpu``, ...) and write into caller-allocated outputs.

``ready(device)`` says whether ``ensure_built`` would return at once (the build is cached or loaded, or its
outcome is known); ``build_in_background(device)`` builds in a child process at low priority while the caller
serves on the pure-torch path (a model loaded with ``kernels=False``, later switched with ``RWKV.use_kernels``),
and reports its progress (sources compiled of all). ``python -m rwkv_chat.models.kernels cpu`` builds from a
shell.

A failed build is never silent: the reason is logged and kept, ``report()`` returns it (``rwkv-chat
doctor --json``), and the dispatch functions of ``rwkv_chat.models.kernels.dispatch`` (``wkv4``, ``wkv5``,
``wkv7``, ``mm8``, ``mm4``, ``mmf8``, ``gemm``, re-exported here) serve those calls with the pure-torch paths of
``models/rwkv/wkv.py`` and ``models/formats/i8.py``. Nothing here rebinds anything: a model uses the
dispatch functions through its backend's ops (``rwkv_chat.models.backends``) when it is loaded with
``kernels=True``.
"""

from __future__ import annotations

import hashlib
import contextlib
import logging
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from rwkv_chat.models.kernels.checks import CPU_FAMILIES, CUDA_FAMILIES, FAMILIES

log = logging.getLogger("rwkv_chat.kernels")

CPU_SOURCES = ("bindings/cpu_ops.cpp", "wkv4/wkv4_cpu.cpp", "wkv5/wkv5_cpu.cpp", "wkv6/wkv6_cpu.cpp",
               "wkv7/wkv7_cpu.cpp", "mm8/mm8_cpu.cpp", "fused_cpu/fused_cpu.cpp", "gemvq/gemvq_cpu.cpp")
CUDA_SOURCES = ("bindings/cuda_ops.cpp", "bindings/fused_ops.cpp", "bindings/chunk_ops.cpp", "gemm/gemm_cuda.cpp",
                "gemm/gemm_lt.cpp",
                "wkv4/wkv4_cuda.cu", "wkv5/wkv5_cuda.cu", "wkv6/wkv6_cuda.cu", "wkv7/wkv7_cuda.cu",
                "wkv7/wkv7_chunk_cuda.cu", "mm8/mm8_cuda.cu", "fused/v7_fused.cu", "fused/v7_step.cu",
                "fused/ffn_rows.cu", "bindings/gemvq_ops.cpp", "gemvq/gemvq_cuda.cu", "gemvq/gemmq_cuda.cu")
CPU_CFLAGS = ("-O3", "-std=c++17", "-fopenmp")
CUDA_CFLAGS = ("-O3", "-std=c++17")
CUDA_NVCC_FLAGS = ("-O3", "-std=c++17", "-Xptxas=-O3", "--extra-device-vectorization")
NOT_BUILT = "not built yet (ensure_built has not run for this device)"
CPU_GEMM_REASON = "no compiled CPU gemm: torch.matmul (oneDNN/MKL) serves CPU products"
CPU_REASONS = {"gemm": CPU_GEMM_REASON,
               "v7fused": "the fused RWKV-7 layer kernels (models/backends/fused_cuda.py) are CUDA only"}


def _no_kernel(family: str) -> str:
    """Why a family has no compiled kernel on the CPU (the torch path serves it)."""
    return CPU_REASONS.get(family, "no compiled kernel for this device: torch path")


#: the op whose presence marks a family as loaded (default ``<family>_<device>``)
OP_NAMES = {"v7fused": "v7_tmix_one", "gemvq": "gemvq_i4"}

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


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an exclusive lock on ``build_dir`` for a build (POSIX ``flock``: released by the kernel when its
    holder dies, so a build killed midway never blocks the next one; torch's own lock file, which a killed build
    leaves behind, is removed by the holder). Without ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:          # pragma: no cover - not POSIX
        yield
        return
    with open(build_dir / ".build-lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
        # a family with no kernel for a device type says so from the start, built or not
        self.status: dict[str, dict[str, str]] = {
            dev: {f: NOT_BUILT if f in fams else _no_kernel(f) for f in FAMILIES}
            for dev, fams in (("cpu", CPU_FAMILIES), ("cuda", CUDA_FAMILIES))}
        self.builds: dict[str, dict] = {}
        self._background: dict[str, BackgroundBuild] = {}
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

    def library(self, device: str, key: str | None = None) -> Path:
        """Where the built library of a device type lives (it may not exist yet)."""
        key = key or self.build_key(device)
        return self.cache_dir / key / f"rwkv_chat_{device}_{key.split('-')[1][:12]}.so"

    def ready(self, device: str | torch.device) -> bool:
        """Whether ``ensure_built(device)`` returns at once: its library is loaded or in the cache, its build
        failed before in this process, or the device type has no kernels to build (no CUDA, "mps", ...)."""
        dev = torch.device(device).type if not isinstance(device, torch.device) else device.type
        if dev not in ("cpu", "cuda"):
            return True
        with self._lock:
            if all(v != NOT_BUILT for v in self.status[dev].values()):
                return True
        if dev == "cuda" and not torch.cuda.is_available():
            return True
        key = self.build_key(dev)
        return key in _LOADED_KEYS or self.library(dev, key).exists()

    def build_in_background(self, device: str, nice: int = 10) -> "BackgroundBuild":
        """Build the library of ``device`` ("cpu" or "cuda") in a child process (``python -m
        rwkv_chat.models.kernels``) at ``nice`` lower priority, so that a model served meanwhile on the torch
        path keeps the CPU; returns the build (``done``, ``progress()``, ``cancel()``). A build of that device
        already running is returned instead of starting another. ``ensure_built`` then loads the result from the
        cache at once; a failed build's reason becomes the device's status (``report()``)."""
        with self._lock:
            running = self._background.get(device)
            if running is not None and not running.done:
                return running
            build = self._background[device] = BackgroundBuild(self, device, nice)
        return build

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
                    self.status[dev][f] = _no_kernel(f)
                elif hasattr(ops, f"{OP_NAMES.get(f, f)}_{dev}"):
                    self.status[dev][f] = "ok"
                    _LOADED.add((dev, f))
                else:
                    self.status[dev][f] = f"op rwkv_chat::{f}_{dev} missing from the built library; torch path"
            return dict(self.status[dev])

    def _build_and_load(self, dev: str) -> None:
        key = self.build_key(dev)
        build_dir = self.cache_dir / key
        lib = self.library(dev, key)
        name = lib.stem
        t0 = time.perf_counter()
        if key in _LOADED_KEYS:          # this very build is already loaded (from any cache dir)
            cached = True
        elif lib.exists():
            torch.ops.load_library(str(lib))
            _LOADED_KEYS.add(key)
            cached = True
        else:
            build_dir.mkdir(parents=True, exist_ok=True)
            with _build_lock(build_dir):      # one builder per build folder; a killed one's lock is stale
                if lib.exists():              # built by another process while this one waited
                    torch.ops.load_library(str(lib))
                    _LOADED_KEYS.add(key)
                    cached = True
                else:
                    self._build(dev, name, build_dir)
                    _LOADED_KEYS.add(key)
                    cached = False
        secs = time.perf_counter() - t0
        self.builds[dev] = {"key": key, "dir": str(build_dir), "cached": cached, "seconds": round(secs, 3)}
        self._say(f"{dev} kernels {'loaded from cache' if cached else 'built'} in {secs:.1f} s ({key})")

    def _build(self, dev: str, name: str, build_dir: Path) -> None:
        """Compile and load the library ``name`` for ``dev`` in ``build_dir`` (the caller holds its build lock)."""
        from torch.utils.cpp_extension import load

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
        stale = build_dir / "lock"       # torch's own build baton, left behind by a builder that was killed
        if stale.exists():
            stale.unlink()
        load(**kwargs)

    def report(self) -> dict[str, dict[str, str]]:
        """``{"cpu": {family: "ok" | reason}, "cuda": {...}}`` for families wkv4, wkv5, wkv6, wkv7, mm8, gemm,
        v7fused (the fused RWKV-7 layer kernels, CUDA only), gemvq (the int4 / fp8 decode GEMVs; on the CPU the int4
        product of any rows)."""
        return {d: dict(v) for d, v in self.status.items()}


class BackgroundBuild:
    """A kernel build running in a child process (see ``KernelLoader.build_in_background``).

    Attributes:
        device: "cpu" or "cuda". directory: the build directory. total: sources to compile.
        state: "building", "built" or "failed". error: why it failed ("" otherwise). seconds: how long it took.
    """

    def __init__(self, loader: KernelLoader, device: str, nice: int = 10):
        self.loader, self.device = loader, device
        self.key = loader.build_key(device)
        self.directory = loader.cache_dir / self.key
        self.total = len(CPU_SOURCES if device == "cpu" else CUDA_SOURCES)
        self.state, self.error = "building", ""
        self.started = time.monotonic()
        self.seconds = 0.0
        self._finished = threading.Event()
        cmd = [sys.executable, "-m", "rwkv_chat.models.kernels", device, "--cache-dir", str(loader.cache_dir),
               "--source-dir", str(loader.source_dir), "--nice", str(nice)]
        loader._say(f"building {device} kernels in the background in {self.directory}")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True)
        threading.Thread(target=self._wait, name=f"rwkv-kernels-{device}", daemon=True).start()

    def _wait(self) -> None:
        _, err = self._proc.communicate()
        self.seconds = time.monotonic() - self.started
        if self._proc.returncode == 0 and self.loader.library(self.device, self.key).exists():
            self.state = "built"
            self.loader._say(f"{self.device} kernels built in the background in {self.seconds:.0f} s")
        else:
            lines = [ln.strip() for ln in (err or "").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"the build process ended with status {self._proc.returncode}"
            self.error = f"build failed ({why}); using the torch path"
            with self.loader._lock:      # ensure_built will not try again in this process
                self.loader.status[self.device] = {f: self.error for f in FAMILIES}
            self.state = "failed"
            log.warning("rwkv-chat %s kernels: %s", self.device, self.error)
        self._finished.set()

    @property
    def done(self) -> bool:
        """Whether the build has ended (built or failed)."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the end of the build; returns ``done``."""
        return self._finished.wait(timeout)

    def compiled(self) -> int:
        """Sources compiled so far (object files in the build directory)."""
        if self.state == "built":
            return self.total
        try:
            return min(self.total, sum(1 for p in self.directory.iterdir() if p.suffix == ".o"))
        except OSError:
            return 0

    def progress(self) -> dict:
        """``{"device", "state", "compiled", "total", "seconds", "error"}`` (JSON-friendly)."""
        secs = self.seconds if self.done else time.monotonic() - self.started
        return {"device": self.device, "state": self.state, "compiled": self.compiled(), "total": self.total,
                "seconds": round(secs, 1), "error": self.error}

    def cancel(self) -> None:
        """Stop the build (its compiler processes included); a later build resumes from what it compiled."""
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
            except OSError:
                pass


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


# the dispatch functions (they read ``available``, defined above)
from rwkv_chat.models.kernels.dispatch import (WKV7_CHUNK, WKV7_CHUNK_MAX_HEADS_PER_SM, WKV7_CHUNK_MIN_T,  # noqa: E402,F401
                                               gemm, mm4, mm8, mmf8, wkv4, wkv5, wkv7, wkv7_chunk_choice)
