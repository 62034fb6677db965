"""The op dispatch functions: each compiled op where ``ensure_built`` loaded it, the pure-torch path elsewhere.

``wkv4``, ``wkv5`` (RWKV-5/5.1/5.2 and, with a per-token decay, RWKV-6), ``wkv7``, ``mm8``, ``mm4`` (int4,
GPTQ words, either layout), ``mmf8`` (fp8 e4m3) and ``gemm`` take
the arguments of the torch paths (``models/rwkv/wkv.py``, ``models/formats/i8.py``) and return the same
results to rounding. They validate their inputs first, whichever path serves them, and raise
``DeviceError``, ``UnsupportedDtypeError`` or ``ShapeMismatchError`` (never ``assert``). A model calls them
through its backend's ops (``rwkv_chat.models.backends.eager``) when loaded with ``kernels=True``.
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import DeviceError, ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats import f8 as _f8
from rwkv_chat.models.formats import i4 as _i4
from rwkv_chat.models.formats import i8 as _quant
from rwkv_chat.models.formats.f8 import Float8Weight
from rwkv_chat.models.formats.i4 import Int4Weight
from rwkv_chat.models.kernels import available
from rwkv_chat.models.kernels import gemmq as _gemmq
from rwkv_chat.models.kernels.checks import check_mm8, check_wkv4, check_wkv5, check_wkv7
from rwkv_chat.models.ops import _triton
from rwkv_chat.models.ops import gemv as _gemv
from rwkv_chat.models.ops import wkv5_chunk as _wkv5c
from rwkv_chat.models.ops import wkv7_chunk as _wkv7c
from rwkv_chat.models.ops.gptq import norm_rows
from rwkv_chat.models.rwkv import wkv as _wkv

#: the pure-torch paths serving the calls whose compiled op is not loaded
_TORCH_WKV4, _TORCH_WKV5, _TORCH_WKV7, _TORCH_MM8 = _wkv.wkv4_torch, _wkv.wkv5_auto, _wkv.wkv7_auto, _quant.mm8_torch


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


def wkv5(r, k, v, w, u, s, *, out=None, chunk: int | None = None):
    """RWKV-5/5.1/5.2 (w float32 [H, N]) and RWKV-6 (w float32 [B, T, H, N]) WKV; same contract as
    ``wkv.wkv5_torch``: r, k, v [B, T, H, N] fp32/fp16/bf16, u float32 [H, N], s float32 [B, H, N, N]
    ([key, value]) -> ``(y [B, T, H, N] r.dtype, new s)``. ``out=(y, s_new)`` writes into given tensors.

    ``chunk``: None or 0 takes the compiled sequential kernel; 16 takes the chunked Triton kernel
    (``ops.wkv5_chunk``, CUDA, head sizes 16..128) where it serves, else the sequential one.
    Raises: DeviceError, UnsupportedDtypeError, ShapeMismatchError; ValueError for another ``chunk``.
    """
    if chunk not in (None, 0, _wkv5c.CHUNK):
        raise ValueError(f"wkv5: chunk must be None, 0 or {_wkv5c.CHUNK}, not {chunk!r}")
    check_wkv5(r, k, v, w, u, s, out)
    dev, fam = r.device.type, ("wkv6" if w.dim() == 4 else "wkv5")
    if chunk == _wkv5c.CHUNK and dev == "cuda" and _wkv5c.serves(r) and _triton_ok():
        return _wkv5c.wkv5_chunk(r, k, v, w, u, s, out=out)
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
#: 22.5 / 36.9 (``bench/results/h100.md``, "Kernel benchmark").
WKV7_CHUNK_MAX_HEADS_PER_SM = 1 / 3
#: tokens per chunk of the chunked WKV-7 kernel (16 or 32)
WKV7_CHUNK = 32


def wkv7_chunk_choice(B: int, T: int, H: int, multiprocessors: int) -> int:
    """The chunk length ``wkv7`` picks on CUDA for head size 64: ``WKV7_CHUNK`` (the chunked kernel) for
    T >= ``WKV7_CHUNK_MIN_T`` and B * H <= ``WKV7_CHUNK_MAX_HEADS_PER_SM`` * multiprocessors, else 0 (the
    sequential kernel). The same bound serves the tensor-core chunked kernel, whose time also grows with batch x
    heads from the first head (H100: 402.6 / 773.2 / 1479.4 us at 32 / 64 / 128 heads of T = 1024)."""
    many = B * H > WKV7_CHUNK_MAX_HEADS_PER_SM * multiprocessors
    return 0 if T < WKV7_CHUNK_MIN_T or many else WKV7_CHUNK


#: per input dtype, per device: None where the tensor-core chunked WKV-7 serves, else why not (``wkv7_tc_sound``)
WKV7_TC_PROBES: dict[torch.dtype, dict[torch.device, str | None]] = {}


def wkv7_tc_sound(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the tensor-core chunked WKV-7 (``ops.wkv7_chunk``) runs on ``device`` for inputs of ``dtype`` and
    agrees with the sequential kernel (the compiled one where built, else ``wkv.wkv7_torch``): y and the state within
    1e-4 relative for 70 tokens of 2 heads in both chunk lengths, inputs as RWKV-7 makes them. Checked once per
    (device, dtype) as the other probes are (``_sound``: not inside a CUDA-graph capture; ``WKV7_TC_PROBES`` says
    why not); False off CUDA and without Triton."""
    if torch.device(device).type != "cuda" or not _triton_ok():
        return False
    return _sound(WKV7_TC_PROBES.setdefault(dtype, {}), lambda d: _probe_wkv7_tc(d, dtype), device)


def _probe_wkv7_tc(device: torch.device, dtype: torch.dtype) -> str | None:
    g = torch.Generator(device="cpu").manual_seed(0)
    B, T, H, N = 1, 70, 2, 64
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    a, b = -kk, kk * torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    w = torch.exp(-0.6065 * torch.sigmoid(torch.randn(B, T, H, N, generator=g)))
    s = torch.randn(B, H, N, N, generator=g) * 0.3
    r, k, v, a, b = (t.to(device, dtype) for t in (r, k, v, a, b))
    w, s = w.to(device), s.to(device)
    if available("cuda", "wkv7"):
        want = (torch.empty(B, T, H, N, device=device), torch.empty_like(s))
        _op("cuda", "wkv7")(r, w, k, v, a, b, s, *want)
    else:
        want = _wkv.wkv7_torch(r, w, k, v, a, b, s)
    for chunk in (16, 32):
        got = _wkv7c.wkv7_chunk(r, w, k, v, a, b, s, chunk=chunk)
        for name, x, y in zip(("y", "state"), got, want):
            if not torch.isfinite(x).all() or (x - y).norm() > 1e-4 * y.norm():
                return f"chunks of {chunk}: {name} differs from the sequential kernel"
    return None


def wkv7(r, w, k, v, a, b, s, *, out=None, chunk: int | None = None, tensor_cores: bool = False):
    """RWKV-7 WKV; same contract as ``wkv.wkv7_torch``: r, k, v, a, b [B, T, H, N] fp32/fp16/bf16 (one
    dtype), w float32 [B, T, H, N] decay factors in RWKV-7's range (``exp(-e^{-1/2}·sigmoid(·))``, so in
    [0.545, 1)), s float32 [B, H, N, N] ([value, key]) -> ``(y float32 [B, T, H, N], new s)``.
    ``out=(y, s_new)`` writes into given tensors.

    ``chunk``: None picks the kernel (CUDA, head size 64: ``wkv7_chunk_choice``, a chunked kernel in chunks of
    ``WKV7_CHUNK`` for long sequences of few batch x heads; otherwise the sequential kernel); 0 forces
    the sequential kernel; 16 or 32 forces the chunked kernel with that chunk length where it applies.
    ``tensor_cores``: the chunked kernel on the tensor cores (``ops.wkv7_chunk``, Triton) where ``wkv7_tc_sound``;
    False (the default: slower so far, H100 T = 1024, 32 heads: 402.6 us against 238.0) takes the CUDA-core one of
    ``csrc/wkv7/wkv7_chunk_cuda.cu`` (also the fallback where the tensor-core one is not sound).
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
        chunk = wkv7_chunk_choice(B, T, H, _triton.multiprocessors(r.device)) if dev == "cuda" else 0
    if chunk in (16, 32) and dev == "cuda" and N == 64:
        if tensor_cores and wkv7_tc_sound(r.device, r.dtype):
            return _wkv7c.wkv7_chunk(r, w, k, v, a, b, s, out=o, chunk=chunk)
        if hasattr(torch.ops.rwkv_chat, "wkv7_chunk_cuda"):
            torch.ops.rwkv_chat.wkv7_chunk_cuda(r, w, k, v, a, b, s.contiguous(), *o, chunk)
            return tuple(o)
    _op(dev, "wkv7")(r, w, k, v, a, b, s.contiguous(), *o)
    return tuple(o)


def mm8(x: torch.Tensor, q: _quant.Int8Weight, *, out=None) -> torch.Tensor:
    """``x @ q.dequantize()`` for an i8 weight; same contract as ``i8.mm8_torch``.

    Args:
        x: [..., N] fp32/fp16/bf16 on q's device.
        q: Int8Weight (logical [N, M]). The compiled ops read the layout of their device: output-major on
            CUDA (GEMV for <= 4 rows: the uint8 GEMV of ``csrc/gemvq`` where ``gemvq_u8_sound`` and it reads the
            weight (``gemvq_u8_ok``), else ``csrc/mm8``'s; more rows: dequantize + cuBLAS), input-major on the
            CPU (up to ``MM8_CPU_ROWS`` rows, decode steps: ``csrc/mm8``'s kernel; more, a prompt: dequantize +
            BLAS, the rows sharing its tiles); a weight in the other layout is served by the torch path
            (``i8.mm8_torch``), correct but slower.
            On CUDA, 5 to
            ``ops.gemv.I8_ROWS`` rows of fp16 / bf16 (decode batches) go to the Triton kernel reading the uint8
            weights as they are (``ops.gemv.i8_gemm``, either layout) where it is probed sound
            (``i8_gemm_sound``), or, for fp16 where ``gemmq_u8_serves``, to the uint8 form of the int4 tensor-core
            GEMM (``kernels.gemmq.gemmq_u8``).
            Scales are cast to x.dtype if they differ.
        out: optional contiguous [..., M] tensor of x.dtype to write.
    Returns: [..., M] in x.dtype (fp32 accumulation in the compiled paths, except the uint8 GEMV with fp16 x: each
    chunk of 16 products summed in half precision first, x scaled by a power of two, then fp32; within half
    rounding of the reference's fp16 product, not bit-equal to it).
    Raises: DeviceError, UnsupportedDtypeError, ShapeMismatchError.
    """
    check_mm8(x, q, out)
    dev = x.device.type
    if gemvq_u8_ok(q, x) and _gemvq_u8_serves(x):
        N, M = q.shape
        y = _gemvq_u8([x.reshape(-1, N)], [q], [0])[0].reshape(*x.shape[:-1], M)
        return y if out is None else out.copy_(y)
    if gemmq_u8_serves(x, q):
        N, M = q.shape
        y = _gemmq.gemmq_u8(x.reshape(-1, N).contiguous(), q).reshape(*x.shape[:-1], M)
        return y if out is None else out.copy_(y)
    if _i8_gemm_serves(x):
        N, M = q.shape
        y = _gemv.i8_gemm(x.reshape(-1, N), q).reshape(*x.shape[:-1], M)
        return y if out is None else out.copy_(y)
    if (not available(dev, "mm8") or q.output_major != _quant.prefers_output_major(x.device)
            or (dev == "cpu" and _rows(x) > MM8_CPU_ROWS)):
        y = _TORCH_MM8(x, q)
        return y if out is None else out.copy_(y)
    N, M = q.shape
    x2 = x.reshape(-1, N).contiguous()
    sc = [t if t.dtype == x.dtype else t.to(x.dtype) for t in (q.mx, q.rx, q.my, q.ry)]
    y = out if out is not None else torch.empty(*x.shape[:-1], M, dtype=x.dtype, device=x.device)
    _op(dev, "mm8")(x2, q.storage.contiguous(), *(t.contiguous() for t in sc), y.view(-1, M))
    return y


#: the most rows the compiled int4 / fp8 GEMVs (``csrc/gemvq``) serve
GEMVQ_ROWS = 4
#: the most rows the compiled mm8 GEMV serves (``csrc/mm8``; more: ``ops.gemv.i8_gemm`` or dequantize + cuBLAS)
MM8_GEMV_ROWS = 4
#: the most rows the compiled CPU mm8 kernel serves (a batched decode step; more rows, a prompt: dequantize + BLAS,
#: as the fused CPU path's prompts above its ``kStepRows``)
MM8_CPU_ROWS = 16


def _i8_gemm_serves(x: torch.Tensor) -> bool:
    rows = _rows(x)
    return (x.is_cuda and MM8_GEMV_ROWS < rows <= _gemv.I8_ROWS and x.dtype in (torch.float16, torch.bfloat16)
            and _triton_ok() and i8_gemm_sound(x.device))


def gemvq_u8_ok(q: _quant.Int8Weight, x: torch.Tensor) -> bool:
    """Whether the compiled uint8 GEMV (``csrc/gemvq``) reads this i8 weight with activations ``x``: fp16 / bf16 x
    (float32 takes ``csrc/mm8``'s GEMV: the uint8 form's row sums cancel beyond float32's tolerance where x is all
    positive), held output-major (the CUDA layout), K % 16 == 0, the matrix contiguous and 16-byte aligned, the four
    scale vectors contiguous in x's dtype (the binding's own checks, so a weight it would refuse takes the mm8
    path)."""
    return (x.dtype in (torch.float16, torch.bfloat16) and q.output_major and q.shape[0] % 16 == 0
            and q.storage.is_contiguous() and q.storage.data_ptr() % 16 == 0
            and all(t.dtype == x.dtype and t.is_contiguous() for t in (q.mx, q.rx, q.my, q.ry)))


def gemmq_u8_serves(x: torch.Tensor, q: _quant.Int8Weight) -> bool:
    """Whether the uint8 form of the tensor-core GEMM (``kernels.gemmq.gemmq_u8``, ``mm8``'s path) takes this product:
    ``gemmq.U8_ENABLED``, CUDA fp16 x of ``gemmq.serves_rows`` rows (at most ``ops.gemv.I8_ROWS``), a weight it reads
    (``gemmq.gemmq_u8_ok``), the op built and the device's probe passed (``gemmq_u8_sound``)."""
    rows = _rows(x)
    return (_gemmq.U8_ENABLED and x.is_cuda and x.dtype == torch.float16 and _gemmq.serves_rows(rows)
            and rows <= _gemv.I8_ROWS and _gemmq.gemmq_u8_ok(q, x) and _gemmq.built() and gemmq_u8_sound(x.device))


def _gemvq_u8_serves(x: torch.Tensor) -> bool:
    rows = _rows(x)
    return x.is_cuda and 1 <= rows <= GEMVQ_ROWS and available("cuda", "gemvq") and gemvq_u8_sound(x.device)


def _gemvq_u8(xs: list[torch.Tensor], qs: list, acts: list[int]) -> list[torch.Tensor]:
    """One launch of ``gemvq_u8_multi_cuda``: ``[act(x) @ q.dequantize() for x, q in zip(xs, qs)]``, xs 2-D."""
    ys = [torch.empty(x.shape[0], q.shape[1], dtype=x.dtype, device=x.device) for x, q in zip(xs, qs)]
    _op("cuda", "gemvq_u8_multi")([x.contiguous() for x in xs], [q.storage for q in qs], [q.mx for q in qs],
                                  [q.rx for q in qs], [q.my for q in qs], [q.ry for q in qs], list(acts), ys)
    return ys


def gemvq_i4_ok(q: Int4Weight) -> bool:
    """Whether the compiled int4 GEMV reads this weight: held output-major (``Int4Weight.output_major``), no
    g_idx, K and the group multiples of 32, float16 scales, contiguous tensors, Np % 8 == 0, 16-byte aligned
    words and 4-byte aligned scales (the binding's own checks, so a weight it would refuse takes the Triton /
    torch path instead)."""
    K = q.shape[0]
    return (q.output_major and q.g_idx is None and K % 32 == 0 and q.qweight.shape[0] * 8 == K
            and q.group_size % 32 == 0 and K % q.group_size == 0 and q.scales.dtype == torch.float16
            and q.storage.is_contiguous() and q.qzeros.is_contiguous() and q.scales.is_contiguous()
            and q.storage.shape[0] % 8 == 0 and q.storage.data_ptr() % 16 == 0 and q.scales.data_ptr() % 4 == 0)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


#: the most rows the compiled CPU int4 product serves (more: dequantized once and multiplied by torch's GEMM; on
#: 2 cores at 2048 x 2048 the two meet near 48 rows)
I4_CPU_ROWS = 32


def _i4_cpu_serves(x: torch.Tensor, q: Int4Weight) -> bool:
    return (x.device.type == "cpu" and 1 <= _rows(x) <= I4_CPU_ROWS and q.qweight.device.type == "cpu"
            and not q.output_major and q.g_idx is None
            and q.group_size % 8 == 0 and (q.qweight.shape[0] * 8) % q.group_size == 0 and q.qweight.is_contiguous()
            and q.qzeros.is_contiguous() and q.scales.is_contiguous() and q.qweight.dtype == torch.int32
            and q.scales.dtype in (torch.float32, torch.float16, torch.bfloat16) and available("cpu", "gemvq"))


#: the most rows the compiled CPU fp8 product serves (more: the matrix dequantized for torch's GEMM)
F8_CPU_ROWS = 32


def _f8_cpu_serves(x: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether the compiled CPU fp8 product serves x with the contiguous e4m3 bytes ``w8`` [N, K]."""
    return (x.device.type == "cpu" and 1 <= _rows(x) <= F8_CPU_ROWS and w8.is_contiguous()
            and available("cpu", "gemvq") and hasattr(torch.ops.rwkv_chat, "gemvq_f8_cpu"))


def _gemvq_serves(x: torch.Tensor) -> bool:
    rows = _rows(x)
    return x.is_cuda and 1 <= rows <= GEMVQ_ROWS and available("cuda", "gemvq") and gemvq_sound(x.device)


#: device -> None (the compiled GEMVs agree with the torch products there) or why they do not serve it
GEMVQ_PROBES: dict[torch.device, str | None] = {}
#: the same for the int4 GEMV with the norm on load (``norm_gemv_i4``)
GEMVQ_NORM_PROBES: dict[torch.device, str | None] = {}
#: the same for the uint8 (i8) GEMV (``gemvq_u8_sound``)
GEMVQ_U8_PROBES: dict[torch.device, str | None] = {}
#: the same for the int4 GEMM on the tensor cores (``gemmq_sound``)
GEMMQ_PROBES: dict[torch.device, str | None] = {}


def _probe_key(device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def gemvq_sound(device: torch.device) -> bool:
    """Whether the compiled int4 / fp8 GEMVs serve ``device``: on first use there, each (one and three rows,
    fp16 and bf16, single and grouped, x as is and relu(x)², x staged whole and in tiles) is run on small random
    weights and compared with the torch products (``i4.mm4_torch``, ``f8.mmf8_torch``) to half-precision rounding;
    a mismatch or an error keeps the other paths for the process (``GEMVQ_PROBES`` says why). During CUDA graph
    capture an unprobed device is not served (no probe runs inside a capture)."""
    return _sound(GEMVQ_PROBES, _probe_gemvq, device)


def gemvq_norm_sound(device: torch.device) -> bool:
    """Whether ``norm_gemv_i4`` serves ``device``: ``gemvq_sound``, then its own probe the same way (LayerNorm and
    RMSNorm, one and three rows, fp16 and bf16, against the norm in float32 then ``i4.mm4_torch``;
    ``GEMVQ_NORM_PROBES`` says why not). A mismatch there leaves the other compiled GEMVs serving."""
    return gemvq_sound(device) and _sound(GEMVQ_NORM_PROBES, _probe_gemvq_norm, device)


def gemvq_u8_sound(device: torch.device) -> bool:
    """Whether the compiled uint8 GEMV serves i8 weights on ``device``: on first use there it is run (one and three
    rows, fp16 and bf16, two products in one launch with x as is and relu(x)², x staged whole and in tiles) on
    small random weights and compared with ``i8.mm8_torch`` to half-precision rounding; a mismatch or an error
    keeps the mm8 GEMV for the process (``GEMVQ_U8_PROBES`` says why). Not probed inside a CUDA graph capture."""
    return _sound(GEMVQ_U8_PROBES, _probe_gemvq_u8, device)


def gemmq_sound(device: torch.device) -> bool:
    """Whether the int4 GEMM on the tensor cores (``kernels.gemmq``) serves decode batches on ``device``: on first use
    there it runs as ``mm4`` launches it (fp16 and bf16; 3, 5, 37 and 70 rows; x as is and relu(x)²; one and two K
    splits; six units of K, groups of one and two units; N a multiple of 8 and not) on small random weights and is
    compared with ``i4.mm4_torch`` to half-precision rounding; a mismatch or an error keeps the Triton kernel for the
    process (``GEMMQ_PROBES`` says why). Not probed inside a CUDA graph capture."""
    return _sound(GEMMQ_PROBES, _probe_gemmq, device)


#: device -> None where the uint8 form of the tensor-core GEMM agrees with the torch product there, else why not
GEMMQ_U8_PROBES: dict[torch.device, str | None] = {}


def gemmq_u8_sound(device: torch.device) -> bool:
    """Whether the uint8 form of the tensor-core GEMM (``kernels.gemmq.gemmq_u8``) serves i8 decode batches on
    ``device``: on first use there it runs (fp16; 5, 37 and 70 rows; x as is and relu(x)²; one and two K splits;
    N a multiple of 8 and not, K above and below N) on small random weights and is compared with ``i8.mm8_torch``
    to half-precision rounding; a mismatch or an error keeps the Triton kernel for the process (``GEMMQ_U8_PROBES``
    says why)."""
    return _sound(GEMMQ_U8_PROBES, _probe_gemmq_u8, device)


def _probe_gemmq_u8(device: torch.device) -> str | None:
    if not _gemmq.built():
        return "not built"
    g = torch.Generator().manual_seed(5)
    # K > N and K < N: the column offsets mx are zero where every column holds some row's minimum (K > N) and not
    # otherwise; x with a nonzero mean, so sum(x) mx counts
    for k, n in ((768, 72), (768, 77), (256, 300)):
        q = _quant.quantize_i8(torch.randn(k, n, generator=g) * 0.05 + 0.01, torch.float16,
                               output_major=True).to(device, output_major=True)
        for rows in (5, 37, 70):
            x = (torch.randn(rows, k, generator=g) + 0.5).to(device, torch.float16)
            if not _gemmq.gemmq_u8_ok(q, x):
                return "the probe's weight is not one it reads"
            why = _gemmq_mismatch("gemmq_u8", lambda x_, s_, r_: _gemmq.gemmq_u8(x_, q, s_, relu2=r_),
                                  lambda x_: _quant.mm8_torch(x_, q), x, f"{rows} rows, N {n}")
            if why:
                return why
    return None


def _gemmq_mismatch(name: str, run, torch_product, x: torch.Tensor, what: str) -> str | None:
    """Why ``run(x, splits, relu2)`` (one and two K splits; x as is and relu(x)²) differs from ``torch_product`` of
    the same input beyond half-precision rounding (``_probe_error`` 2e-2), or None; ``what`` names the case."""
    for relu2 in (False, True):
        want = torch_product(torch.relu(x).square() if relu2 else x)
        for splits in (1, 2):
            err = _probe_error(run(x, splits, relu2), want)
            if not err < 2e-2:
                return (f"{name} differs from the torch product ({what}, {splits} splits"
                        f"{', relu(x)²' if relu2 else ''}: relative error {err:.3g})")
    return None


def _probe_gemmq(device: torch.device) -> str | None:
    if not _gemmq.built():
        return "not built"
    g = torch.Generator().manual_seed(3)
    for n, group in ((72, 128), (77, 256)):       # six units: past the copy ring's warm-up; groups of one and two
        q = _i4.quantize_i4(torch.randn(768, n, generator=g) * 0.05 + 0.01, group).to(device)
        if not _gemmq.gemmq_i4_ok(q):
            return "the probe's weight is not one it reads"
        for dtype in (torch.float16, torch.bfloat16):
            for rows in (3, 5, 37, 70):
                x = torch.randn(rows, 768, generator=g).to(device, dtype)
                why = _gemmq_mismatch("gemmq_i4", lambda x_, s_, r_: _gemmq.gemmq_i4(x_, q, s_, relu2=r_),
                                      lambda x_: _i4.mm4_torch(x_, q), x, f"{dtype}, {rows} rows, N {n}, group {group}")
                if why:
                    return why
    return None


def _sound(table: dict, probe, device) -> bool:
    known = table.get(device, False)                # a tensor's device: one lookup per product once probed
    if known is not False:
        return known is None
    device = _probe_key(device)
    if device in table:
        return table[device] is None
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    try:
        table[device] = probe(device)
    except Exception as e:  # noqa: BLE001 — the Triton / torch products serve; the probe records why
        table[device] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return table[device] is None


def probe_weight_kernels(model) -> None:
    """Probe, at load (outside any CUDA graph capture), on every CUDA device of ``model``: the compiled int4 / fp8
    GEMVs (``gemvq_sound``) where a stage is i4 or f8; where a stage is i8, the compiled uint8 GEMV
    (``gemvq_u8_sound``; fp16 / bf16 stages) and the Triton i8 kernel of batches (``i8_gemm_sound``). The outcomes go
    into ``model.kernels["cuda"]`` ("gemvq probe", "gemmq probe" (i4: the tensor-core GEMM of batches,
    ``gemmq_sound``), "gemvq u8 probe", "i8 gemm probe", "gemmq u8 probe" (fp16 i8 where ``gemmq.U8_ENABLED``:
    ``gemmq_u8_sound``): "ok" or why the other paths serve)."""
    quants = {s.quant for s in model.plan.stages}
    half_i8 = any(s.quant == "i8" and s.dtype in (torch.float16, torch.bfloat16) for s in model.plan.stages)
    for dev in {d for d in model.devices if d.type == "cuda"}:
        if quants & {"i4", "f8"} and available("cuda", "gemvq"):
            why = None if gemvq_sound(dev) else GEMVQ_PROBES.get(_probe_key(dev), "not probed")
            model.kernels.setdefault("cuda", {})["gemvq probe"] = why or "ok"
        if "i4" in quants and _gemmq.ENABLED and available("cuda", "gemvq"):
            why = None if gemmq_sound(dev) else GEMMQ_PROBES.get(_probe_key(dev), "not probed")
            model.kernels.setdefault("cuda", {})["gemmq probe"] = why or "ok"
        if half_i8 and available("cuda", "gemvq"):      # the uint8 GEMV serves fp16 / bf16 activations
            why = None if gemvq_u8_sound(dev) else GEMVQ_U8_PROBES.get(_probe_key(dev), "not probed")
            model.kernels.setdefault("cuda", {})["gemvq u8 probe"] = why or "ok"
        if "i8" in quants and _triton_ok():
            why = None if i8_gemm_sound(dev) else I8_GEMM_PROBES.get(_probe_key(dev), "not probed")
            model.kernels.setdefault("cuda", {})["i8 gemm probe"] = why or "ok"
        fp16_i8 = any(s.quant == "i8" and s.dtype == torch.float16 for s in model.plan.stages)
        if fp16_i8 and _gemmq.U8_ENABLED and available("cuda", "gemvq"):   # the uint8 form: fp16 activations
            why = None if gemmq_u8_sound(dev) else GEMMQ_U8_PROBES.get(_probe_key(dev), "not probed")
            model.kernels.setdefault("cuda", {})["gemmq u8 probe"] = why or "ok"


#: device -> None (the Triton i8 kernel agrees with the torch product there) or why it does not serve it
I8_GEMM_PROBES: dict[torch.device, str | None] = {}


def i8_gemm_sound(device: torch.device) -> bool:
    """Whether the Triton i8 kernel of batches (``ops.gemv.i8_gemm``) serves ``device``: on first use there it runs
    on small random weights (both layouts, fp16 and bf16, 5 and 37 rows, K not a multiple of its tile) and is
    compared with ``i8.mm8_torch`` to half-precision rounding; a mismatch or an error keeps the compiled path
    (dequantize + cuBLAS) for the process (``I8_GEMM_PROBES`` says why). Not probed inside a CUDA graph capture."""
    return _sound(I8_GEMM_PROBES, _probe_i8_gemm, device)


def _probe_i8_gemm(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(200, 72, generator=g) * 0.1 + 0.02
    with _triton.on(device):
        for dtype in (torch.float16, torch.bfloat16):
            for om in (True, False):
                q = _quant.quantize_i8(w, dtype, output_major=om).to(device, output_major=om)
                for rows in (5, 37):
                    x = torch.randn(rows, 200, generator=g).to(device, dtype)
                    err = _probe_error(_gemv.i8_gemm(x, q), _quant.mm8_torch(x, q))
                    if not err < 2e-2:
                        return (f"i8_gemm differs from the torch product ({dtype}, {rows} rows, "
                                f"{'output' if om else 'input'}-major: relative error {err:.3g})")
    return None


def _probe_gemvq(device: torch.device) -> str | None:
    from rwkv_chat.models.formats.f8 import quantize_f8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 72, generator=g) * 0.05
    q4 = _i4.quantize_i4(w, 128).to(device)
    q8 = quantize_f8(w).to(device)
    wl = torch.randn(11264, 16, generator=g) * 0.01
    q4l, q8l = _i4.quantize_i4(wl, 128).to(device), quantize_f8(wl).to(device)
    with _triton.on(device):
        for dtype in (torch.float16, torch.bfloat16):
            for rows in (1, 3):
                x = torch.randn(rows, 256, generator=g).to(device, dtype)
                relu2 = torch.relu(x).square()
                checks = []
                if gemvq_i4_ok(q4):
                    y = torch.empty(rows, 72, dtype=dtype, device=device)
                    _op("cuda", "gemvq_i4")(x, q4.storage, q4.qzeros, q4.scales, q4.group_size, y)
                    checks.append(("gemvq_i4", y, _i4.mm4_torch(x, q4)))
                    ys = [torch.empty(rows, 72, dtype=dtype, device=device) for _ in range(2)]
                    _op("cuda", "gemvq_i4_multi")([x, x], [q4.storage] * 2, [q4.qzeros] * 2, [q4.scales] * 2,
                                                  [q4.group_size] * 2, [0, 3], ys)
                    checks.append(("gemvq_i4_multi", ys[0], checks[-1][2]))
                    checks.append(("gemvq_i4_multi relu²", ys[1], _i4.mm4_torch(relu2, q4)))
                y = torch.empty(rows, 72, dtype=dtype, device=device)
                _op("cuda", "gemvq_f8")(x, q8.w8.view(torch.uint8), q8.scale.contiguous(), y)
                checks.append(("gemvq_f8", y, _f8.mmf8_torch(x, q8)))
                ys = [torch.empty(rows, 72, dtype=dtype, device=device)]
                _op("cuda", "gemvq_f8_multi")([x], [q8.w8.view(torch.uint8)], [q8.scale.contiguous()], [3], ys)
                checks.append(("gemvq_f8_multi relu²", ys[0], _f8.mmf8_torch(relu2, q8)))
                if rows == 3:       # x staged in several tiles of K (rows * K * 2 or 4 bytes > 64 KB)
                    xl = torch.randn(rows, 11264, generator=g).to(device, dtype)
                    y = torch.empty(rows, 16, dtype=dtype, device=device)
                    if gemvq_i4_ok(q4l):
                        _op("cuda", "gemvq_i4")(xl, q4l.storage, q4l.qzeros, q4l.scales, q4l.group_size, y)
                        checks.append(("gemvq_i4 (K in tiles)", y.clone(), _i4.mm4_torch(xl, q4l)))
                    _op("cuda", "gemvq_f8")(xl, q8l.w8.view(torch.uint8), q8l.scale.contiguous(), y)
                    checks.append(("gemvq_f8 (K in tiles)", y, _f8.mmf8_torch(xl, q8l)))
                for name, got, want in checks:
                    err = _probe_error(got, want)
                    if not err < 2e-2:
                        return f"{name} differs from the torch product ({dtype}, {rows} rows: relative error {err:.3g})"
    return None


def _probe_gemvq_u8(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(3)
    w, wl = torch.randn(256, 72, generator=g) * 0.05 + 0.01, torch.randn(11264, 16, generator=g) * 0.01
    for dtype in (torch.float16, torch.bfloat16):
        q, ql = (_quant.quantize_i8(t, dtype, output_major=True).to(device, output_major=True) for t in (w, wl))
        for rows in (1, 3):
            x = torch.randn(rows, 256, generator=g).to(device, dtype)
            checks = list(zip(("gemvq_u8_multi", "gemvq_u8_multi relu²"), _gemvq_u8([x, x], [q, q], [0, 3]),
                              (_quant.mm8_torch(x, q), _quant.mm8_torch(torch.relu(x).square(), q))))
            if rows == 3:           # x staged in several tiles of K (rows * K * 2.25 or 4 bytes > 64 KB)
                xl = torch.randn(rows, 11264, generator=g).to(device, dtype)
                checks.append(("gemvq_u8 (K in tiles)", _gemvq_u8([xl], [ql], [0])[0], _quant.mm8_torch(xl, ql)))
            for name, got, want in checks:
                err = _probe_error(got, want)
                if not err < 2e-2:
                    return f"{name} differs from the torch product ({dtype}, {rows} rows: relative error {err:.3g})"
    return None


def _probe_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """A probe's measure: the largest difference relative to the largest |want| (half-precision rounding ~1e-3)."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


def _probe_gemvq_norm(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(1)
    q4 = _i4.quantize_i4(torch.randn(256, 72, generator=g) * 0.05, 128).to(device)
    if not gemvq_i4_ok(q4):
        return "the int4 weight is not held output-major on this device"
    with _triton.on(device):
        for dtype in (torch.float16, torch.bfloat16):
            for rows in (1, 3):
                x = (torch.randn(rows, 256, generator=g) * 3 + 1).to(device, dtype)
                lw = torch.rand(256, generator=g).to(device, dtype) + 0.5
                lb = (torch.randn(256, generator=g) * 0.1).to(device, dtype)
                for rms in (False, True):
                    b = None if rms else lb
                    y = torch.empty(rows, 72, dtype=dtype, device=device)
                    _op("cuda", "gemvq_i4_norm")(x, q4.storage, q4.qzeros, q4.scales, q4.group_size, lw, b, 1e-5,
                                                 rms, y)
                    err = _probe_error(y, _i4.mm4_torch(norm_rows(x, lw, b, 1e-5, rms), q4))
                    if not err < 2e-2:
                        return (f"gemvq_i4_norm ({'RMS' if rms else 'Layer'}Norm) differs from the torch product "
                                f"({dtype}, {rows} rows: relative error {err:.3g})")
    return None


def norm_gemv_i4(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
                 ln_weight: torch.Tensor, ln_bias: torch.Tensor | None, eps: float, rms: bool) -> torch.Tensor | None:
    """``norm(x) @ W`` for 1..``GEMVQ_ROWS`` rows in one launch of the compiled int4 GEMV (``csrc/gemvq``: the
    row's LayerNorm, or RMSNorm with ``rms``, computed by every block as it stages x, float32 statistics, the
    normed x rounded to x's dtype), or None where it does not serve (the caller takes another path).

    Served: x fp16/bf16 [rows, K] on a CUDA device where the family is built and probed sound; W in the GPTQ
    layout held output-major (``qweight`` int32 [K/8, N] the transposed view of a contiguous [N, K/8], as
    ``Int4Weight.qweight`` of a weight on CUDA), ``qzeros`` int32 [K/group, N/8] (v1 zeros) and ``scales`` float16
    [K/group, N] contiguous, group % 32 == 0, N % 8 == 0; ln_weight (and ln_bias, or None) [K] in x's dtype.
    Returns: [rows, N] in x's dtype. Inputs are not checked beyond what decides serving (the caller's op checks
    them and raises its typed errors).
    """
    rows, K = x.shape if x.dim() == 2 else (0, 0)
    N = qweight.shape[1] if qweight.dim() == 2 else 0
    if not (x.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16) and _gemvq_serves(x)
            and gemvq_norm_sound(x.device) and K % 32 == 0
            and group % 32 == 0 and K % group == 0 and N % 8 == 0 and qweight.dtype == torch.int32
            and qweight.t().is_contiguous() and qweight.shape[0] * 8 == K
            and qweight.data_ptr() % 16 == 0 and qzeros.is_contiguous() and scales.is_contiguous()
            and scales.dtype == torch.float16 and scales.data_ptr() % 4 == 0 and ln_weight.dtype == x.dtype
            and ln_weight.is_contiguous() and ln_weight.data_ptr() % 16 == 0
            and (rms or ln_bias is None or (ln_bias.dtype == x.dtype and ln_bias.is_contiguous()
                                            and ln_bias.data_ptr() % 16 == 0))):
        return None
    y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
    _op("cuda", "gemvq_i4_norm")(x.contiguous(), qweight.t(), qzeros, scales, group, ln_weight,
                                 None if rms else ln_bias, float(eps), bool(rms), y)
    return y


def mm4(x: torch.Tensor, q: Int4Weight) -> torch.Tensor:
    """``x @ q.dequantize()`` for an i4 weight (``formats.i4``); same contract as ``i4.mm4_torch``.

    x [..., K] fp32/fp16/bf16 on q's device -> [..., N] in x's dtype. On CUDA: the int4 GEMM on the tensor cores
    (``kernels.gemmq``) where ``gemmq_serves`` (decode batches from ``gemmq.MIN_ROWS`` to ``ops.gemv.I4_ROWS`` rows
    but ``gemmq.TRITON_ROWS``, and ``gemmq.FEW_ROWS`` rows of large weights); else 1..``GEMVQ_ROWS`` rows with the
    compiled GEMV of ``csrc/gemvq`` where it is built and reads the weight (``gemvq_i4_ok``: output-major, the
    layout a weight takes on CUDA); else, fp16/bf16 and
    at most ``ops.gemv.I4_ROWS`` rows: the Triton kernel (either layout; dequantized in registers, fp32
    accumulation); more rows (prefill):
    dequantized once per call and multiplied by cuBLAS. On the CPU, up to ``I4_CPU_ROWS`` rows: the compiled
    product of ``csrc/gemvq/gemvq_cpu.cpp`` reading the GPTQ words as stored (no g_idx, the group a multiple of 8);
    elsewhere the torch path.
    Raises: DeviceError (x and q on different devices), ShapeMismatchError, UnsupportedDtypeError.
    """
    _check_packed(x, q, "i4")
    rows = _rows(x)
    K, N = q.shape
    if _i4_cpu_serves(x, q):
        y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
        _op("cpu", "gemvq_i4")(x.reshape(rows, K).contiguous(), q.qweight, q.qzeros, q.scales, q.group_size, y)
        return y.reshape(*x.shape[:-1], N)
    if gemmq_serves(x, q):
        return _gemmq.gemmq_i4(x.reshape(rows, K).contiguous(), q).reshape(*x.shape[:-1], N)
    if _gemvq_serves(x) and gemvq_i4_ok(q):
        y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
        _op("cuda", "gemvq_i4")(x.reshape(rows, K).contiguous(), q.storage, q.qzeros, q.scales, q.group_size, y)
        return y.reshape(*x.shape[:-1], N)
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and 1 <= rows <= _gemv.I4_ROWS and _triton_ok():
        return _gemv.i4_gemv(x.reshape(rows, -1), q).reshape(*x.shape[:-1], N)
    return _i4.mm4_torch(x, q)


def gemmq_serves(x: torch.Tensor, q: Int4Weight) -> bool:
    """Whether the int4 GEMM on the tensor cores (``kernels.gemmq``, ``mm4``'s path) takes this product: CUDA,
    fp16/bf16, rows and weight shape as ``gemmq.serves`` gives them (at most ``ops.gemv.I4_ROWS`` rows), a weight it
    reads, the device's probe passed, and ``gemmq.ENABLED``."""
    return (_gemmq.ENABLED and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and _gemmq.serves(_rows(x), *q.shape) and _rows(x) <= _gemv.I4_ROWS and _gemmq.gemmq_i4_ok(q)
            and _gemmq.built() and gemmq_sound(x.device))


def mm4_stack(x: torch.Tensor, qs: list[Int4Weight]) -> torch.Tensor | None:
    """``x[g] @ qs[g].dequantize()`` for G int4 weights that are views of one stack (``formats.i4.stack_i4``) in one
    launch: x [G, M, K] fp16/bf16 on their CUDA device (last dim contiguous), 1..``ops.gemv.I4_ROWS`` rows -> [G, M, N]
    in x's dtype. The int4 GEMM on the tensor cores (``gemmq.gemmq_i4_stack``) for ``gemmq.STACK_ROWS`` rows where
    ``gemmq_serves`` each product, else the Triton kernel (``ops.gemv.i4_gemv_stack``; K and N multiples of 8).
    Returns None (raises nothing) where neither serves: another device or dtype, other shapes, more rows, no Triton,
    weights that are not one stack; the caller then multiplies them one by one."""
    if not qs or not all(isinstance(q, Int4Weight) for q in qs):
        return None
    if x.dim() == 3 and x.shape[0] == len(qs) and x.shape[1] in _gemmq.STACK_ROWS and gemmq_serves(x[0], qs[0]):
        y = _gemmq.gemmq_i4_stack(x.contiguous(), qs)
        if y is not None:
            return y
    K, N = qs[0].shape
    if not (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dim() == 3 and x.shape[0] == len(qs)
            and x.shape[2] == K and x.stride(-1) == 1 and 1 <= x.shape[1] <= _gemv.I4_ROWS
            and x.device == qs[0].qweight.device and K % 8 == 0 and N % 8 == 0 and _triton_ok()):
        return None
    strides = _gemv.i4_stack_strides(qs)
    return None if strides is None else _gemv.i4_gemv_stack(x, qs, strides)


def mm8_stack(x: torch.Tensor, qs: list[_quant.Int8Weight]) -> torch.Tensor | None:
    """``x[g] @ qs[g].dequantize()`` for G i8 weights that are views of one stack (``formats.i8.stack_i8``) in one
    launch of the uint8 tensor-core GEMM (``gemmq.gemmq_u8_stack``): x [G, M, K] fp16 on their CUDA device, M rows
    where ``gemmq_u8_serves`` each product -> [G, M, N] fp16. Returns None (raises nothing) where it does not serve:
    another device or dtype, other rows, weights that are not one stack; the caller then multiplies them one by
    one."""
    if (not qs or len(qs) > 64 or x.dim() != 3 or x.shape[0] != len(qs) or not isinstance(qs[0], _quant.Int8Weight)
            or not gemmq_u8_serves(x[0], qs[0])):
        return None
    return _gemmq.gemmq_u8_stack(x.contiguous(), qs)


def mmf8(x: torch.Tensor, q: Float8Weight) -> torch.Tensor:
    """``x @ q.dequantize()`` for an f8 weight (``formats.f8``); same contract as ``f8.mmf8_torch``.

    x [..., K] fp32/fp16/bf16 on q's device -> [..., N] in x's dtype. On CUDA (compute capability >= 8.9):
    1..``GEMVQ_ROWS`` rows, K % 16 == 0: the compiled weight-only GEMV of ``csrc/gemvq`` where it is built; else
    at most ``ops.gemv.GEMV_ROWS`` rows (fp16/bf16, Triton): the weight-only fp8 GEMV; more rows (K and N
    multiples of 16): the activations quantized per token and the fp8 tensor cores (``torch._scaled_mm``). On the
    CPU, up to ``F8_CPU_ROWS`` rows: the compiled product of ``csrc/gemvq/gemvq_cpu.cpp`` (the e4m3 bytes made
    float32 exactly as they are read, float32 sums, times the channel's scale); elsewhere the exact emulation
    ``f8.mmf8_torch``.
    Raises: DeviceError, ShapeMismatchError, UnsupportedDtypeError.
    """
    _check_packed(x, q, "f8")
    if not x.is_cuda:
        if q.input_major and _f8_cpu_serves(x, q.w8.t()):
            q = q.with_layout(False)      # a transient output-major copy: either layout gives the same product
        if _f8_cpu_serves(x, q.w8):
            rows, (K, N) = _rows(x), q.shape
            y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
            _op("cpu", "gemvq_f8")(x.reshape(rows, K).contiguous(), q.w8.view(torch.uint8),
                                   q.scale.float().contiguous(), y)
            return y.reshape(*x.shape[:-1], N)
        return _f8.mmf8_torch(x, q)
    rows = _rows(x)
    K, N = q.shape
    if q.input_major:               # the GEMVs and _scaled_mm read w8 output-major: a transient copy so laid out
        q = q.with_layout(False)
    if _gemvq_serves(x) and K % 16 == 0 and q.w8.is_contiguous() and q.w8.data_ptr() % 16 == 0 \
            and q.scale.dtype == torch.float32:
        y = torch.empty(rows, N, dtype=x.dtype, device=x.device)
        _op("cuda", "gemvq_f8")(x.reshape(rows, K).contiguous(), q.w8.view(torch.uint8), q.scale.contiguous(), y)
        return y.reshape(*x.shape[:-1], N)
    if x.dtype in (torch.float16, torch.bfloat16) and 1 <= rows <= _gemv.GEMV_ROWS and _triton_ok():
        return _gemv.f8_gemv(x.reshape(rows, K), q).reshape(*x.shape[:-1], N)
    if K % 16 == 0 and N % 16 == 0:
        from rwkv_chat.models.ops.fp8 import fp8_linear

        return fp8_linear(x, q)
    return _f8.mmf8_torch(x, q)


#: input activations of ``gemvq_group`` (``csrc/gemvq/gemvq.h``): none, relu(x)² rounded to the activation dtype
GEMVQ_ACTS = (0, 3)


def gemvq_group(xs: list[torch.Tensor], qs: list, acts: list[int] | None = None) -> list[torch.Tensor] | None:
    """``[act(x) @ q.dequantize() for x, q in zip(xs, qs)]`` in one launch of the compiled GEMV
    (``csrc/gemvq``), or None where it does not serve them all (the caller multiplies one by one); int4 products
    that the int4 GEMM on the tensor cores takes (``gemmq_serves``: 3-4 rows of large weights) run there instead,
    one launch each.

    Served: 1..4 products, every weight i4 (``gemvq_i4_ok``), every weight f8 (K % 16 == 0) or every weight i8
    (``gemvq_u8_ok``, where ``gemvq_u8_sound``), xs 2-D [rows, K_e] of one activation dtype on one CUDA device,
    the same rows (1..``GEMVQ_ROWS``), the family built.
    acts: per product 0 (x as is, the default) or 3 (``torch.relu(x).square()`` in x's dtype, the RWKV
    channel-mix value's input) applied as x is loaded.
    Returns: [rows, N_e] tensors in the activation dtype (fp32 accumulation; fp16 activations: each 32 int4 or
    16 fp8 / uint8 products summed in half precision first, x scaled by a power of two, ``csrc/gemvq``).
    Raises: DeviceError, ShapeMismatchError, UnsupportedDtypeError (as ``mm4`` / ``mmf8``) for a packed weight whose
    x does not fit it.
    """
    acts = [0] * len(xs) if acts is None else list(acts)
    if not 1 <= len(xs) == len(qs) == len(acts) <= 4 or any(a not in GEMVQ_ACTS for a in acts):
        return None
    if all(isinstance(q, _quant.Int8Weight) for q in qs):
        for x, q in zip(xs, qs):
            check_mm8(x, q, None)
        x0 = xs[0]
        if not (all(x.dim() == 2 and x.shape[0] == x0.shape[0] and x.dtype == x0.dtype and x.device == x0.device
                    and gemvq_u8_ok(q, x) for x, q in zip(xs, qs)) and _gemvq_u8_serves(x0)):
            return None
        return _gemvq_u8(list(xs), list(qs), acts)
    for x, q in zip(xs, qs):
        if not isinstance(q, (Int4Weight, Float8Weight)):
            return None
        _check_packed(x, q, "i4" if isinstance(q, Int4Weight) else "f8")
    x0 = xs[0]
    if not _gemvq_serves(x0) or any(x.dim() != 2 or x.shape[0] != x0.shape[0] or x.dtype != x0.dtype
                                    or x.device != x0.device for x in xs):
        return None
    if all(isinstance(q, Int4Weight) for q in qs) and all(gemmq_serves(x, q) for x, q in zip(xs, qs)):
        return [_gemmq.gemmq_i4(x.contiguous(), q, relu2=a == 3) for x, q, a in zip(xs, qs, acts)]   # 3: relu²
    ys = [torch.empty(x.shape[0], q.shape[1], dtype=x.dtype, device=x.device) for x, q in zip(xs, qs)]
    xc = [x.contiguous() for x in xs]
    if all(isinstance(q, Int4Weight) and gemvq_i4_ok(q) for q in qs):
        _op("cuda", "gemvq_i4_multi")(xc, [q.storage for q in qs], [q.qzeros for q in qs], [q.scales for q in qs],
                                      [q.group_size for q in qs], acts, ys)
        return ys
    if all(isinstance(q, Float8Weight) and q.shape[0] % 16 == 0 and q.w8.is_contiguous()
           and q.w8.data_ptr() % 16 == 0 and q.scale.dtype == torch.float32 for q in qs):
        _op("cuda", "gemvq_f8_multi")(xc, [q.w8.view(torch.uint8) for q in qs], [q.scale.contiguous() for q in qs],
                                      acts, ys)
        return ys
    return None


#: the most rows of h ``ffn_rows`` takes (decode batches served by the fused RWKV-7 step's GEMVs)
FFN_ROWS_MAX = 4


def ffn_rows(h: torch.Tensor, w, skip_zeros: bool = True, out_dtype: torch.dtype | None = None,
             blocks_per_sm: int = 2, tile_threads: int = 0, relu2: bool = False) -> torch.Tensor | None:
    """``h @ w`` for h [M, F] (1 <= M <= 4) and input-major w [F, C] (contiguous: row f holds the C weights of input
    f), by the compiled row kernel (``csrc/fused/ffn_rows.cu``): the RWKV channel-mix value product of decode
    steps, h = relu(k)². With ``skip_zeros`` the rows f where h[m, f] == 0 for every m are not read; without, every
    row is (same bits). float32 accumulation in ascending f, rounded once -> [M, C] in ``out_dtype`` (h's dtype
    by default, or float32). ``blocks_per_sm`` sizes the grid and ``tile_threads`` (0: the kernel's choice; 16..256)
    the column tile, 16 bytes of a row per thread (benchmarks sweep both). ``relu2``: h holds the raw k and the
    kernel takes relu(k)² (rounded to h's dtype) as it loads it.

    w: a float tensor of h's dtype, or an input-major ``Int8Weight`` (``output_major`` False; the i8 format's
    (q + 0.5) ry rx + my + mx summed as rx ⊙ ((h ry) @ (q + 0.5)) + h @ my + (Σ h) mx, its scale vectors in h's
    dtype, h fp16 / bf16), or an input-major ``Float8Weight`` (``input_major``; e4m3 rows, the float32 scale per
    output applied to each block's sum; h fp16 / bf16).

    Returns None where the kernel does not serve (family not built, not one CUDA device, h and w not one of
    fp16 / bf16 / fp32, shapes that do not chain or are empty, w not contiguous or its rows not 16-byte multiples,
    CUDA graph capture before the device's split counters exist): the caller multiplies another way.
    """
    scales = (None, None, None, None, None)
    if isinstance(w, _quant.Int8Weight):
        if not (not w.output_major and h.dtype in (torch.float16, torch.bfloat16)
                and all(t.dtype == h.dtype and t.is_contiguous() and t.device == h.device
                        for t in (w.mx, w.rx, w.my, w.ry))):
            return None
        scales = (w.mx, w.rx, w.my.view(-1), w.ry.view(-1), None)
        w = w.storage
    elif isinstance(w, Float8Weight):
        if not (w.input_major and h.dtype in (torch.float16, torch.bfloat16) and w.scale.dtype == torch.float32
                and w.scale.is_contiguous() and w.scale.device == h.device):
            return None
        scales = (None, None, None, None, w.scale)
        w = w.w8.t()
    elif not (isinstance(w, torch.Tensor) and h.dtype == w.dtype):
        return None
    if not (isinstance(h, torch.Tensor) and h.is_cuda and w.device == h.device
            and h.dim() == 2 and w.dim() == 2 and 1 <= h.shape[0] <= FFN_ROWS_MAX and h.shape[1] == w.shape[0]
            and h.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and out_dtype in (None, h.dtype, torch.float32) and w.is_contiguous()
            and w.shape[0] > 0 and w.shape[1] > 0 and (w.shape[1] * w.element_size()) % 16 == 0
            and w.data_ptr() % 16 == 0 and available("cuda", "v7fused")):
        return None
    counters = _gemv._counters(h.device)
    if counters is None:
        return None
    h = h.contiguous()
    y = torch.empty(h.shape[0], w.shape[1], dtype=out_dtype or h.dtype, device=h.device)
    _op("cuda", "ffn_rows")(h, w, *scales, y, counters, bool(relu2), bool(skip_zeros), int(blocks_per_sm),
                            int(tile_threads))
    return y


#: the most products and rows ``gemv_group`` takes in one launch (``csrc/fused/fused_launchers.h``)
GEMV_GROUP_MAX, GEMV_ROWS_MAX = 8, 4
#: the most bytes of normed rows ``norm_gemv_group`` stages in a block's shared memory (the launcher's bound: 48 KiB
#: less the kernel's static arrays, ~5 KiB)
NORM_STAGE_BYTES = 40 * 1024


def gemv_group(xs: list[torch.Tensor], ws: list[torch.Tensor], acts: list[int] | None = None, *,
               biases: list[torch.Tensor | None] | None = None, glu: list[bool] | None = None,
               out_dtype: torch.dtype | None = None,
               copy: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor] | None:
    """Up to 8 products of 1..4 rows in one launch of the compiled grouped GEMV (``csrc/fused/v7_fused.cu``,
    ``gemv_multi``): ``ys[e] = out_act(act(xs[e]) @ ws[e].t() + biases[e])`` with float32 sums rounded once.

    Args:
        xs: [rows, N_e] each, one CUDA device and dtype (fp16, bf16 or fp32), rows 1..4 and the same for all,
            inner stride 1.
        ws: output-major [M_e, N_e] contiguous, x's dtype (nn.Linear's layout; the model's [in, out] view is
            ``ws[e].t()``); with ``glu[e]`` [2M_e, N_e], the gate rows then the up rows.
        acts: per product ``act + 4 * out_act`` (codes 0 none, 1 tanh, 2 sigmoid, 3 relu²; act on x as it is
            loaded, out_act on the rounded result); None: all 0.
        biases: per product None or [M_e] in x's dtype, added before rounding (a GEMM epilogue's bias).
        glu: per product, SwiGLU: ``silu(x @ gate.t()) * (x @ up.t())`` [rows, M_e], each product and the silu
            rounded to x's dtype (Qwen2MLP in transformers); no bias, no out_act.
        out_dtype: x's dtype (default) or float32 (the results unrounded).
        copy: (src, dst), contiguous tensors of x's dtype and device with as many elements, copied by the same
            launch after it has waited for the previous one (``ln_mix_gemv_group``'s shift state, put in place once
            every block of that launch has read the old one). Neither may be an input or output of the products.
    Returns:
        the [rows, M_e] results, or None where the compiled op is not loaded or the inputs are not its kind (the
        caller multiplies another way).
    """
    plan = _gemv_plan(xs, ws, acts, biases, glu, out_dtype)
    if plan is None or not _copy_ok(copy, xs[0]) or (copy is not None and not any(w.shape[0] for w in ws)):
        return None                     # (a launch of empty products runs no thread: nothing would copy)
    ys, acts, biases, glu = plan
    src, dst = copy if copy is not None else (None, None)
    _op("cuda", "gemv_multi")(list(xs), list(ws), ys, acts, biases, glu, [], None, None, None, 0.0, None, None, None, [],
                              src, dst)
    return ys


def gated_gemv(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """SwiGLU of 1..4 rows in one launch of the compiled grouped GEMV: ``silu(x @ gate.t()) * (x @ up.t())``, both
    products and the silu in float32, rounded once to x's dtype (``ops.fused_gated_mlp``'s contract; Shazeer 2020).

    Args:
        x: [rows, H], rows 1..4, float16 / bfloat16 / float32 on a CUDA device, inner stride 1.
        gate, up: [I, H] each (nn.Linear's layout), contiguous, x's dtype and device.
    Returns:
        [rows, I] in x's dtype, or None where the compiled op is not loaded or does not take the inputs (the caller
        multiplies another way).
    """
    if not (isinstance(up, torch.Tensor) and isinstance(gate, torch.Tensor) and up.shape == gate.shape
            and up.dtype == gate.dtype and up.device == gate.device and up.is_contiguous()):
        return None
    plan = _gemv_plan([x], [gate], None, None, None, None)      # (as a plain product: y is [rows, I])
    if plan is None:
        return None
    ys = plan[0]
    _op("cuda", "gemv_multi")([x], [gate], ys, [0], [None], [2], [up], None, None, None, 0.0, None, None, None, [],
                              None, None)
    return ys[0]


def _copy_ok(copy, x: torch.Tensor) -> bool:
    if copy is None:
        return True
    src, dst = copy
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dtype == dst.dtype == x.dtype
            and src.device == dst.device == x.device and src.numel() == dst.numel() and src.is_contiguous()
            and dst.is_contiguous())


def norm_gemv_group(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    ws: list[torch.Tensor], *, biases: list[torch.Tensor | None] | None = None,
                    glu: list[bool] | None = None) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """``gemv_group`` of the products of one RMSNorm'd row block, the norm inside the launch (each block normalizes
    the rows itself, so no launch is spent on it): ``h = x + residual`` (x without a residual),
    ``xn = norm_weight * (h * rsqrt(mean(h²) + eps))`` rounded as transformers' Qwen2RMSNorm rounds it, then
    ``ys[e] = xn @ ws[e].t() (+ biases[e])`` (or SwiGLU with ``glu[e]``).

    Args:
        x, residual: [rows, C] contiguous (rows 1..4), fp16 / bf16 / fp32 on one CUDA device; residual may be None.
        norm_weight: [C] in x's dtype. eps: the norm's epsilon.
        ws, biases, glu: as ``gemv_group``, every N_e == C.
    Returns:
        ``(ys, h)``: the results and h (a new tensor; x itself without a residual), or None where the kernel does
        not take the inputs (not loaded, C not a multiple of 16 bytes, rows * C beyond ``NORM_STAGE_BYTES``,
        misaligned, an empty product): the caller norms and multiplies another way.
    """
    if not (isinstance(norm_weight, torch.Tensor) and _norm_inputs_ok(x, [norm_weight], [residual], ws)):
        return None
    out = _norm_launch(x, residual, norm_weight, eps, ws, None, biases, glu)
    return None if out is None else out[:2]


def _norm_launch(x, residual, weight, eps, ws, acts, biases, glu, ln_bias=None, shift=None, mixes=None):
    """One ``gemv_multi`` launch with the norm inside (RMSNorm; LayerNorm + lerps where ``ln_bias`` is given) on
    checked inputs -> (ys, h, xl: the LayerNorm output or None), or None where ``_gemv_plan`` declines."""
    plan = _gemv_plan([x] * len(ws), ws, acts, biases, glu, None)
    if plan is None:
        return None
    ys, acts, biases, glu = plan
    h = torch.empty_like(x) if residual is not None else None
    xl = torch.empty_like(x) if ln_bias is not None else None
    _op("cuda", "gemv_multi")([x] * len(ws), list(ws), ys, acts, biases, glu, [], residual, weight, h, float(eps),
                              ln_bias, shift, xl, list(mixes or []), None, None)
    return ys, (x if h is None else h), xl


def _rows_ok(x: torch.Tensor, *vectors) -> bool:
    """x [rows, C] contiguous and 16-byte aligned, C a multiple of 16 bytes, rows * C within ``NORM_STAGE_BYTES``,
    and each of ``vectors`` (None or [C]) of x's dtype and device, contiguous and aligned."""
    return (isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_cuda and x.is_contiguous() and x.data_ptr() % 16 == 0
            and (x.shape[1] * x.element_size()) % 16 == 0 and x.numel() * x.element_size() <= NORM_STAGE_BYTES
            and all(v is None or (isinstance(v, torch.Tensor) and v.dtype == x.dtype and v.device == x.device
                                  and v.is_contiguous() and v.numel() == x.shape[1] and v.data_ptr() % 16 == 0)
                    for v in vectors))


def _norm_inputs_ok(x: torch.Tensor, vectors: list, rows: list, ws: list) -> bool:
    """The inputs of a norm inside the grouped GEMV: ``_rows_ok`` for x and ``vectors``; each of ``rows`` None or
    like x (shape, dtype, aligned); every weight a non-empty 16-byte aligned matrix."""
    return (_rows_ok(x, *vectors)
            and all(r is None or (_rows_ok(r) and r.shape == x.shape and r.dtype == x.dtype and r.device == x.device)
                    for r in rows)
            and all(isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] > 0 and w.data_ptr() % 16 == 0
                    for w in ws))


def ln_mix_gemv_group(x: torch.Tensor, dx: torch.Tensor | None, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                      shift: torch.Tensor, mixes: list[torch.Tensor | None], ws: list[torch.Tensor],
                      acts: list[int] | None = None, eps: float = 1e-5
                      ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """The RWKV-7 decode step's residual add + LayerNorm + token-shift lerps inside the launch of the products that
    take them (``csrc/fused/v7_fused.cu``: each block normalizes the rows itself, so ``v7_mix`` needs no launch):
    ``h = x + dx`` (x without dx), ``xl = LayerNorm(h)`` (eps 1e-5), product e takes
    ``xl + (shift - xl) * mixes[e]`` (xl where ``mixes[e]`` is None), each rounded as ``v7_mix`` rounds it, then
    ``ys[e] = out_act(act(.) @ ws[e].t())`` as ``gemv_group``.

    Args:
        x, dx: [rows, C] contiguous (rows 1..4), fp16 / bf16 / fp32 on one CUDA device; dx may be None.
        ln_weight, ln_bias: [C]. shift: [rows, C], the previous token's xl (read, not written).
        mixes: per product [C] or None. ws, acts: as ``gemv_group``, every N_e == C.
    Returns:
        ``(ys, h, xl)``: h a new tensor (x itself without dx) and xl a new [rows, C] tensor: the next shift state,
        for the caller to put in place after this launch (``gemv_group(copy=(xl, shift))`` of a later launch). None
        where the kernel does not take the inputs: the caller runs ``v7_mix`` and the products.
    """
    if not (all(isinstance(t, torch.Tensor) for t in (ln_weight, ln_bias, shift)) and len(mixes) == len(ws)
            and _norm_inputs_ok(x, [ln_weight, ln_bias, *mixes], [dx, shift], ws)):
        return None
    return _norm_launch(x, dx, ln_weight, eps, ws, acts, None, None, ln_bias, shift, mixes)


def _gemv_plan(xs, ws, acts, biases, glu, out_dtype):
    """The checks of ``gemv_group``: None where the op does not take the products, else (outputs, acts, biases, glu
    flags) ready for the op."""
    n = len(xs)
    if not (1 <= n <= GEMV_GROUP_MAX and len(ws) == n and available("cuda", "v7fused")):
        return None
    x0 = xs[0]
    dt = x0.dtype
    if not (dt in (torch.float16, torch.bfloat16, torch.float32) and x0.is_cuda and x0.dim() == 2
            and 1 <= x0.shape[0] <= GEMV_ROWS_MAX and out_dtype in (None, dt, torch.float32)):
        return None
    glu = [bool(g) for g in glu] if glu is not None else [False] * n
    biases = list(biases) if biases is not None else [None] * n
    acts = list(acts) if acts is not None else [0] * n
    if not (len(glu) == len(biases) == len(acts) == n):
        return None
    for x, w, b, g, a in zip(xs, ws, biases, glu, acts):
        if not (isinstance(w, torch.Tensor) and x.device == x0.device and w.device == x0.device and x.dtype == dt
                and w.dtype == dt and x.dim() == 2 and w.dim() == 2 and x.shape[0] == x0.shape[0]
                and x.shape[1] == w.shape[1] and w.is_contiguous() and x.stride(1) == 1 and 0 <= a <= 15
                and (not g or (w.shape[0] % 2 == 0 and b is None and a < 4))
                and (b is None or (b.dtype == dt and b.device == x0.device and b.is_contiguous()
                                   and b.numel() == w.shape[0]))):
            return None
    ys = [torch.empty(x0.shape[0], w.shape[0] // (2 if g else 1), dtype=out_dtype or dt, device=x0.device)
          for w, g in zip(ws, glu)]
    return ys, acts, biases, [int(g) for g in glu]


def _triton_ok() -> bool:
    return _triton.reason() is None


def _check_packed(x, q, fmt: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise UnsupportedDtypeError(f"{fmt} product: x must be a float16/bfloat16/float32 tensor", tensor="x",
                                    expected="float16 | bfloat16 | float32", actual=getattr(x, "dtype", type(x)))
    if x.device != q.device:
        raise DeviceError(f"{fmt} product: x on {x.device}, weight on {q.device}", tensor="x",
                          expected=str(q.device), actual=str(x.device))
    if x.dim() < 1 or x.shape[-1] != q.shape[0]:
        raise ShapeMismatchError(f"{fmt} product: x {tuple(x.shape)} @ w {tuple(q.shape)} do not match",
                                 tensor="x", expected=(..., q.shape[0]), actual=tuple(x.shape))


def gemm(x: torch.Tensor, w: torch.Tensor, output_dtype: torch.dtype | None = None, tuned: bool = False) -> torch.Tensor:
    """``x @ w`` with cuBLAS (fp32 accumulation) for fp16/bf16 on CUDA, ``torch.matmul`` elsewhere.

    Args:
        x: [..., K]; w: [K, M] of x's dtype and device (row-major, or a transposed row-major matrix).
        output_dtype: x.dtype (default) or float32 (e.g. logits without an fp16 round trip).
        tuned: through cuBLASLt with the algorithm timed per shape at its first call (``csrc/gemm/gemm_lt.cpp``)
            where ``gemm_tuned_sound`` says it serves; make the first call of each shape outside CUDA-graph capture.
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
    exact = w.stride() in ((M, 1), (1, K))          # the tuned GEMM reads the strides as they are
    fam = "gemm_tuned" if tuned and exact and gemm_tuned_sound(x.device) else "gemm"
    _op("cuda", fam)(x.reshape(-1, K).contiguous(), w, y.view(-1, M))
    return y


def bgemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Batched ``x @ w`` (``torch.bmm``'s contract) through the per-shape tuned cuBLASLt GEMM where it serves.

    Args:
        x: [B, rows, K] fp16/bf16; w: [B, K, M] of x's dtype, each matrix row-major or a transposed row-major one
            (``W.transpose(1, 2)`` of a contiguous [B, M, K]).
    Returns: [B, rows, M] in x's dtype; ``torch.bmm`` where the tuned GEMM does not serve (another device, dtype or
    layout).
    """
    if x.dim() != 3 or w.dim() != 3:
        return torch.bmm(x, w)                      # torch's own error for the wrong ranks
    B, rows, K = x.shape
    M = w.shape[-1]
    per = w.stride(0) == K * M and ((w.stride(1), w.stride(2)) in ((M, 1), (1, K)))
    if (x.device.type != "cuda" or x.dtype not in (torch.float16, torch.bfloat16) or w.dtype != x.dtype or not per
            or tuple(w.shape[:2]) != (B, K) or not gemm_tuned_sound(x.device)):
        return torch.bmm(x, w)
    y = torch.empty(B, rows, M, dtype=x.dtype, device=x.device)
    torch.ops.rwkv_chat.gemm_tuned_cuda(x.contiguous(), w, y)
    return y


_TUNED_SOUND: dict[torch.device, bool] = {}


def gemm_tuned_sound(device: torch.device) -> bool:
    """Whether the tuned cuBLASLt GEMM (``gemm_tuned_cuda``) is built and agrees with torch on ``device``: checked
    once per device on small products (plain and batched, both weight layouts, fp16 and bf16) against float32
    torch; False on any error. Call it outside CUDA-graph capture first (the fused backend does, at load)."""
    device = torch.device(device)
    if device not in _TUNED_SOUND:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False                            # no probe inside a capture; decided at the next eager call
        _TUNED_SOUND[device] = _probe_tuned(device)
    return _TUNED_SOUND[device]


def _probe_tuned(device: torch.device) -> bool:
    if device.type != "cuda" or not available("cuda", "gemm") or not hasattr(torch.ops.rwkv_chat, "gemm_tuned_cuda"):
        return False
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        for dt in (torch.float16, torch.bfloat16):
            x = torch.randn(3, 7, 96, generator=g).to(device, dt)
            w32 = torch.randn(96, 40, generator=g).to(device, dt)
            y32 = torch.empty(7, 40, dtype=torch.float32, device=device)      # an fp32 output
            torch.ops.rwkv_chat.gemm_tuned_cuda(x[0], w32, y32)
            want32 = x[0].float() @ w32.float()
            if not torch.isfinite(y32).all() or (y32 - want32).norm() > 1e-2 * want32.norm():
                return False
            wm = torch.randn(3, 80, 96, generator=g).to(device, dt)      # [B, M, K]: used transposed
            for w in (wm.transpose(1, 2), wm.transpose(1, 2).contiguous()):
                ref = torch.bmm(x.float(), w.float())
                y = torch.empty(3, 7, 80, dtype=dt, device=device)
                torch.ops.rwkv_chat.gemm_tuned_cuda(x, w, y)
                y2 = torch.empty(7, 80, dtype=dt, device=device)
                torch.ops.rwkv_chat.gemm_tuned_cuda(x[1], w[1], y2)
                for got, want in ((y, ref), (y2, ref[1])):
                    if not torch.isfinite(got).all() or (got.float() - want).norm() > 1e-2 * want.norm():
                        return False
        return True
    except RuntimeError:
        return False


def gemm_tuned_stats() -> list[dict]:
    """The tuned GEMM's kept choices (``gemm_tuned_cuda``): per shape the device, batch, rows, K, M, microseconds of
    cuBLASLt's heuristic first pick and of the kept algorithm (L2 flushed before each timed call), the kept one's
    index in the heuristic's list and how many were timed. Empty where the op is not built."""
    if not hasattr(torch.ops, "rwkv_chat") or not hasattr(torch.ops.rwkv_chat, "gemm_tuned_stats_cuda"):
        return []
    keys = ("device", "batch", "rows", "K", "M", "us_first", "us_best", "index", "timed")
    return [dict(zip(keys, row)) for row in torch.ops.rwkv_chat.gemm_tuned_stats_cuda().tolist()]


def _fill(out, results):
    if out is None:
        return tuple(results)
    for o, r in zip(out, results):
        o.copy_(r)
    return tuple(out)
