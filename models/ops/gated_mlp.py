"""The gated MLP (SwiGLU / GeGLU) with its activation fused into the gate/up GEMM, in Triton.

Formula (Shazeer 2020, "GLU Variants Improve Transformer"; Hugging Face ``Qwen2MLP`` / ``LlamaMLP``)::

    mlp(x)   = down( act(x @ gate^T) * (x @ up^T) )
    act      = silu (SwiGLU: Qwen2, Llama) | gelu (exact, erf) | gelu_tanh (tanh approximation; GeGLU)

``fused_gated_mlp`` computes ``act(x @ gate^T) * (x @ up^T)`` in one kernel: both GEMMs share each loaded
tile of x, run on fp16/bf16 tensor cores (``tl.dot`` on half tiles, fp32 accumulators) and the activation
and product are applied to the fp32 accumulators before the one store of the [M, I] result; the [M, I]
gate and up products never reach memory. M <= 16 (decode) takes narrow-N tiles of 16 rows that stream the
weights with many programs at once (GEMV-like); at 1, 2 or 4 rows the autotuner also weighs CUDA-core tiles of
exactly those rows (the half weights widened to fp32 in registers and summed along K), whichever is faster;
larger M takes 64..128-wide tiles. Each tile config is
autotuned at the first call for a (bucket of M: ``m_bucket``, I, H), the choice kept in Triton's cache dir
where the installed Triton supports it: warm an op up (each bucket) before capturing it in a CUDA graph.
SwiGLU of 1..4 rows may instead take the compiled grouped GEMV of ``csrc/fused`` (``kernels.dispatch.gated_gemv``:
the same float32 sums and one rounding) where the compiled kernels are loaded in the process: the first call of a
(device, dtype, M bucket, I, H) times both and keeps the faster for the process.

``silu_mul`` is the epilogue alone, for a model that computes ``x @ [gate; up]^T`` with one cuBLAS GEMM.
``FusedGatedMLP`` is the whole MLP (``gate_proj``, ``up_proj``, ``down_proj`` as in Hugging Face; the down
projection by torch).

Errors (validated before anything runs: dtypes, shapes, then the device): ``UnsupportedDtypeError``
(only float16 / bfloat16, the same for x and both weights), ``ShapeMismatchError`` (``tensor``,
``expected``, ``actual``), ``DeviceError`` (not on CUDA, two devices, no Triton), ``ValueError`` for an
unknown activation name. ``NumericalOverflowError`` only with ``check_finite=True`` (an fp16 result past
65504 is inf; the check is one reduction and a host sync, never done by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rwkv_chat.models.errors import ShapeMismatchError
from rwkv_chat.models.ops import _checks, _triton

_KERNELS = "rwkv_chat.models.ops._gated_mlp_kernels"
#: activation name -> kernel code (see ``_gated_mlp_kernels``)
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
#: rows up to which the GEMV-like configs serve
SMALL_M = 16
#: rows up to which SwiGLU may take the compiled grouped GEMV (``kernels.dispatch.GEMV_ROWS_MAX``)
COMPILED_ROWS = 4
#: (device, dtype, M bucket, I, H) -> whether the compiled SwiGLU GEMV was measured faster than the Triton kernel
_COMPILED_FASTER: dict[tuple, bool] = {}


def m_bucket(m: int) -> int:
    """The autotune bucket of M rows: 1, 2, 4 (decode: the CUDA-core configs beside the GEMV-like mma ones), 16 (the
    mma ones alone), 128, 1024 or 8192."""
    return next(b for b in (1, 2, 4, SMALL_M, 128, 1024) if m <= b) if m <= 1024 else 8192


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _activation(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def fused_gated_mlp(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, activation: str = "silu",
                    check_finite: bool = False) -> torch.Tensor:
    """``act(x @ gate_weight^T) * (x @ up_weight^T)`` in one kernel.

    x: ``[M, H]`` or ``[..., H]``; gate_weight, up_weight: ``[I, H]`` (nn.Linear layout); all float16 or all
    bfloat16, on one CUDA device, last dims contiguous (else copied). activation: "silu" | "gelu" |
    "gelu_tanh". Returns ``[..., I]`` in x's dtype (fp32 accumulation; the product rounds once).
    Raises as the module says.
    """
    code = _activation(activation)
    for name, t in (("x", x), ("gate_weight", gate_weight), ("up_weight", up_weight)):
        _checks.check_dtype(t, name, _checks.HALF_DTYPES)
    _checks.check_same_dtype({"x": x, "gate_weight": gate_weight, "up_weight": up_weight}, "x")
    _checks.check_dim(x, "x", range(1, 16))
    _checks.check_dim(gate_weight, "gate_weight", (2,))
    hidden = x.shape[-1]
    _checks.check_shape(gate_weight, "gate_weight", (None, hidden))
    _checks.check_shape(up_weight, "up_weight", tuple(gate_weight.shape))
    _checks.check_cuda({"x": x, "gate_weight": gate_weight, "up_weight": up_weight})
    kern = _triton.kernels(_KERNELS, op="fused_gated_mlp")
    inter = gate_weight.shape[0]
    a = x.reshape(-1, hidden)
    a = a if a.stride(-1) == 1 else a.contiguous()
    wg = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    wu = up_weight if up_weight.stride(-1) == 1 else up_weight.contiguous()
    if wu.stride(0) != wg.stride(0):
        wg, wu = wg.contiguous(), wu.contiguous()
    m = a.shape[0]
    out = _compiled_gemv(kern, a, wg, wu) if 0 < m <= COMPILED_ROWS and inter and code == 0 else None
    if out is None:
        out = torch.empty((m, inter), dtype=x.dtype, device=x.device)
        if m and inter:
            _launch(kern, a, wg, wu, out, code)
    out = out.view(*x.shape[:-1], inter)
    if check_finite:
        _checks.check_finite(out, "output", str(x.dtype))
    return out


def _launch(kern, a, wg, wu, out, code: int) -> None:
    """The Triton kernel: out [M, I] = act(a @ wg^T) * (a @ wu^T) on checked, inner-contiguous inputs."""
    m, inter, hidden = a.shape[0], wg.shape[0], wg.shape[1]
    launcher = kern.gated_mlp_small if m <= SMALL_M else kern.gated_mlp

    def grid(meta):
        return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(inter, meta["BLOCK_N"]),)

    launcher[grid](a, wg, wu, out, m, inter, hidden, m_bucket(m), a.stride(0), wg.stride(0), out.stride(0), ACT=code)


def _compiled_gemv(kern, a, wg, wu) -> torch.Tensor | None:
    """SwiGLU of 1..4 rows through the compiled grouped GEMV (``kernels.dispatch.gated_gemv``) where it is loaded,
    takes the inputs and was measured faster than the Triton kernel for this (device, dtype, M bucket, I, H): the
    first call of a key times both (``_compiled_faster``; during a CUDA graph capture, with no decision yet, the
    compiled one serves). None: the Triton kernel serves."""
    from rwkv_chat.models.kernels import dispatch      # (dispatch imports the ops package: imported at first use)
    key = _choice_key(a.device, a.dtype, a.shape[0], wg.shape[0], wg.shape[1])
    faster = _COMPILED_FASTER.get(key)
    if faster is False:
        return None
    y = dispatch.gated_gemv(a, wg, wu)
    if y is None or faster or torch.cuda.is_current_stream_capturing():
        return y
    _COMPILED_FASTER[key] = faster = _compiled_faster(kern, a, wg, wu, y)
    return y if faster else None


def _choice_key(device, dtype, m: int, inter: int, hidden: int) -> tuple:
    return (torch.device(device), dtype, m_bucket(m), inter, hidden)


def compiled_chosen(device, dtype, m: int, inter: int, hidden: int) -> bool:
    """Whether SwiGLU of ``m`` rows (x [m, hidden], weights [inter, hidden], ``dtype`` on ``device``) was measured
    faster through the compiled grouped GEMV in this process (False also where nothing was measured yet)."""
    return bool(_COMPILED_FASTER.get(_choice_key(device, dtype, m, inter, hidden)))


def _compiled_faster(kern, a, wg, wu, y, reps: int = 10, rounds: int = 3) -> bool:
    """Whether the compiled GEMV's best time over ``rounds`` of ``reps`` back-to-back calls is at most the Triton
    kernel's (its autotuning done first). CUDA events on the current stream; synchronizes the device."""
    from rwkv_chat.models.kernels import dispatch
    out = torch.empty_like(y)
    runs = {"compiled": lambda: dispatch.gated_gemv(a, wg, wu), "triton": lambda: _launch(kern, a, wg, wu, out, 0)}
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run()
            stop.record()
            stop.synchronize()
            best[name] = min(best[name], start.elapsed_time(stop))
    return best["compiled"] <= best["triton"]


def silu_mul(gate_up: torch.Tensor, activation: str = "silu", check_finite: bool = False) -> torch.Tensor:
    """``act(gate_up[..., :I]) * gate_up[..., I:]``: the gated MLP's epilogue on a concatenated gate/up GEMM
    output. gate_up: ``[..., 2I]`` float16 / bfloat16 / float32 on CUDA; returns ``[..., I]`` in its dtype
    (fp32 inside). Raises as the module says (float32 allowed here)."""
    code = _activation(activation)
    _checks.check_dtype(gate_up, "gate_up")
    _checks.check_dim(gate_up, "gate_up", range(1, 16))
    if gate_up.shape[-1] % 2:
        raise ShapeMismatchError(f"gate_up has shape {tuple(gate_up.shape)}; its last dim must be even (2I)",
                                 tensor="gate_up", expected="(..., 2I)", actual=tuple(gate_up.shape))
    _checks.check_cuda({"gate_up": gate_up})
    kern = _triton.kernels(_KERNELS, op="silu_mul")
    inter = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * inter)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty((rows.shape[0], inter), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0] and inter:
        block = min(1024, _triton.next_pow2(inter))
        kern.act_mul_kernel[(rows.shape[0], _cdiv(inter, block))](
            rows, out, inter, rows.stride(0), out.stride(0), ACT=code, BLOCK=block, num_warps=4)
    out = out.view(*gate_up.shape[:-1], inter)
    if check_finite:
        _checks.check_finite(out, "output", str(gate_up.dtype))
    return out


class FusedGatedMLP(nn.Module):
    """The gated MLP of a transformer block: ``down_proj(act(gate_proj(x)) * up_proj(x))``.

    Holds ``gate_proj``, ``up_proj`` ([intermediate_dim, hidden_dim]) and ``down_proj`` ([hidden_dim,
    intermediate_dim]) as bias-free ``nn.Linear`` (the keys of Hugging Face's ``Qwen2MLP``, so its state
    dict loads). ``forward(x [..., hidden_dim]) -> [..., hidden_dim]``: ``fused_gated_mlp`` for gate/up and
    the activation, ``torch.nn.functional.linear`` for down; float16/bfloat16 on CUDA, errors as
    ``fused_gated_mlp``. Construction raises ValueError for an unknown activation.
    """

    def __init__(self, hidden_dim: int, intermediate_dim: int, activation: str = "silu", device=None, dtype=None):
        super().__init__()
        _activation(activation)
        self.hidden_dim, self.intermediate_dim, self.activation = hidden_dim, intermediate_dim, activation
        kw = {"bias": False, "device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(hidden_dim, intermediate_dim, **kw)
        self.up_proj = nn.Linear(hidden_dim, intermediate_dim, **kw)
        self.down_proj = nn.Linear(intermediate_dim, hidden_dim, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = fused_gated_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.activation)
        return F.linear(h, self.down_proj.weight)

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, intermediate_dim={self.intermediate_dim}, activation={self.activation}"
