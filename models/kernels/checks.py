"""Typed argument checks of the kernel dispatch functions (``rwkv_chat.models.kernels``).

Every check runs before a compiled op or a torch path is chosen, so both paths reject the same
inputs with the same errors: ``DeviceError`` (tensors on different devices), ``UnsupportedDtypeError``
(activations not fp32/fp16/bf16, decay/bonus/state not float32, a non-tensor), ``ShapeMismatchError``
(shapes that disagree, non-contiguous output tensors).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import DeviceError, ShapeMismatchError, UnsupportedDtypeError

FAMILIES = ("wkv4", "wkv5", "wkv6", "wkv7", "mm8", "gemm", "v7fused", "gemvq")
CPU_FAMILIES = ("wkv4", "wkv5", "wkv6", "wkv7", "mm8", "gemvq")
CUDA_FAMILIES = FAMILIES
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise UnsupportedDtypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _need(op: str, name: str, t, shape: tuple, dtype: torch.dtype | tuple, device: torch.device) -> None:
    _tensor(op, name, t)
    if t.device != device:
        raise DeviceError(f"{op}: {name} is on {t.device}, expected {device} (the device of the inputs)")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise UnsupportedDtypeError(f"{op}: {name} must be {want}, got {str(t.dtype).replace('torch.', '')}")
    if tuple(t.shape) != tuple(shape):
        raise ShapeMismatchError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _act(op: str, name: str, t) -> torch.Tensor:
    _tensor(op, name, t)
    if t.dtype not in ACT_DTYPES:
        raise UnsupportedDtypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def _outs(op: str, out, specs) -> None:
    """specs: [(name, shape, dtype)]; out must be a tuple/list of contiguous tensors matching them."""
    if out is None:
        return
    if not isinstance(out, (tuple, list)) or len(out) != len(specs):
        raise ShapeMismatchError(f"{op}: out must be a tuple of {len(specs)} tensors")
    for t, (name, shape, dtype, device) in zip(out, specs):
        _need(op, f"out {name}", t, shape, dtype, device)
        if not t.is_contiguous():
            raise ShapeMismatchError(f"{op}: out {name} must be contiguous")


def check_wkv4(w, u, k, v, aa, bb, pp, out) -> None:
    op = "wkv4"
    k = _act(op, "k", k)
    if k.dim() != 3:
        raise ShapeMismatchError(f"{op}: k must be [B, T, C], got {tuple(k.shape)}")
    B, T, C = k.shape
    d = k.device
    _need(op, "v", v, (B, T, C), k.dtype, d)
    for name, t in (("w", w), ("u", u)):
        _need(op, name, t, (C,), torch.float32, d)
    for name, t in (("aa", aa), ("bb", bb), ("pp", pp)):
        _need(op, name, t, (B, C), torch.float32, d)
    _outs(op, out, [("y", (B, T, C), k.dtype, d)] + [(n, (B, C), torch.float32, d) for n in ("aa", "bb", "pp")])


def check_wkv5(r, k, v, w, u, s, out) -> None:
    op = "wkv5"
    r = _act(op, "r", r)
    if r.dim() != 4:
        raise ShapeMismatchError(f"{op}: r must be [B, T, H, N], got {tuple(r.shape)}")
    B, T, H, N = r.shape
    d = r.device
    _need(op, "k", k, (B, T, H, N), r.dtype, d)
    _need(op, "v", v, (B, T, H, N), r.dtype, d)
    _tensor(op, "w", w)
    _need(op, "w", w, (B, T, H, N) if w.dim() == 4 else (H, N), torch.float32, d)
    _need(op, "u", u, (H, N), torch.float32, d)
    _need(op, "s", s, (B, H, N, N), torch.float32, d)
    _outs(op, out, [("y", (B, T, H, N), r.dtype, d), ("s", (B, H, N, N), torch.float32, d)])


def check_wkv7(r, w, k, v, a, b, s, out) -> None:
    op = "wkv7"
    r = _act(op, "r", r)
    if r.dim() != 4:
        raise ShapeMismatchError(f"{op}: r must be [B, T, H, N], got {tuple(r.shape)}")
    B, T, H, N = r.shape
    d = r.device
    for name, t in (("k", k), ("v", v), ("a", a), ("b", b)):
        _need(op, name, t, (B, T, H, N), r.dtype, d)
    _need(op, "w", w, (B, T, H, N), torch.float32, d)
    _need(op, "s", s, (B, H, N, N), torch.float32, d)
    _outs(op, out, [("y", (B, T, H, N), torch.float32, d), ("s", (B, H, N, N), torch.float32, d)])


def check_mm8(x, q, out) -> None:
    """x [..., N] against an ``Int8Weight`` q: w uint8, logical [N, M] (a transposed view of a contiguous
    [M, N] tensor when ``q.output_major``), mx/rx [M] and my/ry [N, 1] in an activation dtype."""
    op = "mm8"
    x = _act(op, "x", x)
    w = _tensor(op, "q.w", getattr(q, "w", None))
    if w.dtype != torch.uint8:
        raise UnsupportedDtypeError(f"{op}: q.w must be uint8, got {w.dtype}")
    if w.dim() != 2:
        raise ShapeMismatchError(f"{op}: q.w must be [N, M], got {tuple(w.shape)}")
    if getattr(q, "output_major", False) and not w.t().is_contiguous():
        raise ShapeMismatchError(f"{op}: an output-major q.w must be the transposed view of a contiguous [M, N] "
                                 f"tensor, got strides {w.stride()}")
    N, M = w.shape
    if x.dim() < 1 or x.shape[-1] != N:
        raise ShapeMismatchError(f"{op}: x {tuple(x.shape)} does not match q.w [N={N}, M={M}]")
    d = x.device
    if w.device != d:
        raise DeviceError(f"{op}: x is on {d}, q.w on {w.device}")
    for name, shape in (("mx", (M,)), ("rx", (M,)), ("my", (N, 1)), ("ry", (N, 1))):
        _need(op, f"q.{name}", getattr(q, name), shape, ACT_DTYPES, d)
    _outs(op, None if out is None else (out,), [("y", (*x.shape[:-1], M), x.dtype, d)])
