"""``rwkv-chat doctor``: devices, versions, paths, daemon (what serves its model), the kernels' build report,
and how each weight format runs on each device type."""

from __future__ import annotations

import platform
import sys


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def report(paths, build: bool = False, progress=None) -> dict:
    """A JSON-friendly dict of sections: system, torch, devices, packages, paths, daemon (and what serves its
    model), kernels (``build``: build those not built yet, see :func:`kernel_status`)."""
    import torch
    import zmq

    from .launcher import daemon_state

    out: dict = {}
    out["system"] = {"python": sys.version.split()[0], "platform": platform.platform(),
                     "executable": sys.executable}
    out["torch"] = {"version": torch.__version__, "cuda_build": torch.version.cuda or "none",
                    "cuda_available": torch.cuda.is_available(),
                    "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                    "threads": torch.get_num_threads()}
    devices = {"cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            devices[f"cuda:{i}"] = f"{prop.name}, {prop.total_memory / 2**30:.1f} GiB, sm_{prop.major}{prop.minor}"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices["mps"] = "available"
    out["devices"] = devices
    out["packages"] = {"rwkv-chat": _version("rwkv-chat"), "pyzmq": zmq.__version__,
                       "libzmq": zmq.zmq_version(), "zmq_ipc": zmq.has("ipc"), "zmq_curve": zmq.has("curve"),
                       "msgspec": _version("msgspec"), "textual": _version("textual"),
                       "safetensors": _version("safetensors"), "tokenizers": _version("tokenizers")}
    out["paths"] = {"config": str(paths.config_dir), "data": str(paths.data_dir), "cache": str(paths.cache_dir),
                    "runtime": str(paths.runtime_dir), "config_file": str(paths.config_file)}
    st = daemon_state(paths, timeout=1.0)
    info = st.info
    out["daemon"] = ({"running": True, "pid": info.pid, "request": info.request, "events": info.events,
                      "encrypted": bool(info.server_public_key)}
                     if info else {"running": False, "state": st.state, "pid": st.pid})
    if info:
        out["daemon"].update(_serving(paths))
    out["kernels"], out["kernel_builds"] = kernel_status(paths, build=build, progress=progress)
    out["formats"] = format_status(out["kernels"], {d: torch.cuda.get_device_capability(i)
                                                    for i, d in enumerate(k for k in devices if k.startswith("cuda"))})
    return out


#: (family, what its compiled product does) of each weight format per device type (models/kernels/dispatch.py)
_PRODUCTS = {"cpu": {"i8": ("mm8", "the uint8 weights read as stored"),
                     "i4": ("gemvq", "the GPTQ words read as stored"),
                     "f8": ("gemvq", "emulated: the e4m3 bytes made float32 as read")},
             "cuda": {"i8": ("gemvq", "decode GEMVs on the uint8 weights"),
                      "i4": ("gemvq", "decode GEMVs on the GPTQ words, Triton for decode batches"),
                      "f8": ("gemvq", "decode GEMVs on the e4m3 bytes, the fp8 tensor cores for prompts")}}
#: the lowest CUDA compute capability that runs f8 weights (models/formats/f8.py)
F8_CAPABILITY = (8, 9)


def format_status(kernels: dict, capabilities: dict) -> dict:
    """How each weight format (``i8``, ``i4``, ``f8``) runs on this machine's device types: ``{"cpu": {format:
    text}, "cuda:N": {...}}`` from the kernel report (``kernels``: :func:`kernel_status`'s first part) and each
    GPU's compute capability (``capabilities``: ``{"cuda:N": (major, minor)}``): the compiled product that
    serves it, or why the torch path does (each product dequantizes its matrix), or why it cannot run."""
    out: dict = {}
    for dev in ("cpu", *capabilities):
        kind = dev.split(":")[0]
        built = kernels.get(kind) if isinstance(kernels.get(kind), dict) else {}
        row = {}
        for fmt, (family, what) in _PRODUCTS[kind].items():
            cap = capabilities.get(dev)
            if fmt == "f8" and cap is not None and tuple(cap) < F8_CAPABILITY:
                row[fmt] = (f"cannot run: f8 needs compute capability {F8_CAPABILITY[0]}.{F8_CAPABILITY[1]}+ "
                            f"(this GPU: {cap[0]}.{cap[1]}); use i8 or i4")
            elif built.get(family) == "ok":
                row[fmt] = f"compiled ({family}: {what})"
            else:
                why = str(built.get(family, "unknown")).split(":")[0]      # "not built yet", "build failed", ...
                row[fmt] = f"torch, each product dequantizing its matrix ({family} {why}; see [kernels])"
        out[dev] = row
    return out


def _serving(paths) -> dict:
    """What serves the daemon's model: its backend, and the progress of a kernel build it waits for."""
    from .client import Client, DaemonError

    try:
        with Client(paths, autostart=False, timeout=3.0) as c:
            model = c.status().get("model") or {}
    except DaemonError as e:
        return {"status": f"no answer: {e.message}"}
    if not model.get("loaded"):
        return {"model": "none loaded"}
    out = {"model": model.get("path"), "backend": model.get("backend")}
    if model.get("kernel_build"):
        out["kernel_build"] = model["kernel_build"]
    if model.get("kernels_error"):
        out["kernels_error"] = model["kernels_error"]
    return out


NOT_BUILT = ("not built yet: the daemon builds them in the background at its first model load (the model "
             "answers meanwhile on the pure-torch path); `rwkv-chat doctor --build` builds them now")


def kernel_status(paths, build: bool = False, progress=None) -> tuple[dict, dict]:
    """The kernels of every device type: ``({"cpu"|"cuda": {family: "ok" | reason}}, {device: {"key", "dir",
    "cached", "seconds"}})``. Built kernels are loaded from this home's cache (instant); kernels not built yet
    are reported so, or built now with ``build`` (about a minute per device type; ``progress(build)`` is
    called about twice a second with the ``kernels.BackgroundBuild`` meanwhile)."""
    try:
        from rwkv_chat.models import kernels
    except ImportError as e:
        return {"cpu": {"all": f"engine not importable: {e}"}}, {}
    kernels.set_cache_dir(paths.cache_dir / "kernels")
    loader = kernels.default_loader()
    try:
        out = {}
        for dev in ("cpu", "cuda"):
            if not loader.ready(dev):
                if not build:
                    out[dev] = {f: NOT_BUILT if why == kernels.NOT_BUILT else why
                                for f, why in loader.report()[dev].items()}
                    continue
                job = loader.build_in_background(dev, nice=0)
                while not job.wait(0.5):
                    if progress is not None:
                        progress(job)
                if progress is not None:
                    progress(job)
            out[dev] = kernels.ensure_built(dev)   # from the cache; records a reason instead of raising
        return out, dict(loader.builds)
    except Exception as e:  # noqa: BLE001 — doctor reports, never fails
        return {"error": f"{type(e).__name__}: {e}"}, {}
