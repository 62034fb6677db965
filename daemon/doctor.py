"""``rwkv-chat doctor``: devices, versions, paths, daemon, and the kernels' build report."""

from __future__ import annotations

import platform
import sys


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def report(paths) -> dict:
    """A JSON-friendly dict of sections: system, torch, devices, packages, paths, daemon, kernels."""
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
    out["kernels"], out["kernel_builds"] = kernel_status(paths)
    return out


def kernel_status(paths) -> tuple[dict, dict]:
    """Build (or load from the cache) the kernels of every device type and report them:
    ``({"cpu"|"cuda": {family: "ok" | reason}}, {device: {"key", "dir", "cached", "seconds"}})``.
    A first run on a machine builds them (about a minute per device type)."""
    try:
        from rwkv_chat.models import kernels
    except ImportError as e:
        return {"cpu": {"all": f"engine not importable: {e}"}}, {}
    kernels.set_cache_dir(paths.cache_dir / "kernels")
    try:
        for dev in ("cpu", "cuda"):
            kernels.ensure_built(dev)       # records a reason instead of raising (e.g. no CUDA)
        return kernels.report(), dict(kernels.default_loader().builds)
    except Exception as e:  # noqa: BLE001 — doctor reports, never fails
        return {"error": f"{type(e).__name__}: {e}"}, {}
