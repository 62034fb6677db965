"""``fused_ln_qkv_gptq``: LayerNorm (or RMSNorm) and the q/k/v projections with int4 GPTQ weights, one launch.

    out = fused_ln_qkv_gptq(x, qweight, qzeros, scales, ln_weight, ln_bias, groupsize, eps)

computes ``norm(x) @ W`` for the concatenated projection W [H, Nq + Nk + Nv] (input × output) stored in the
GPTQ int4 layout of ``rwkv_chat.models.formats.i4`` (``qweight`` int32 [H/8, N] packed along the input,
``qzeros`` int32 [H/group, N/8] packed along the output with AutoGPTQ "v1" zeros, ``scales`` float16
[H/group, N]), where ``norm`` is LayerNorm (``(x - mean) / sqrt(var + eps) * ln_weight + ln_bias``, biased
variance, Welford in float32) or, with ``rms=True`` (Qwen2), RMSNorm (``x / sqrt(mean(x²) + eps) *
ln_weight``, no bias). The weights are dequantized in registers; nothing of W is written to memory.

Returns ``[3, B, S, W]`` when the three widths are equal (W = N / 3; the layout of the design documents), or
a ``(q [B, S, Nq], k [B, S, Nk], v [B, S, Nv])`` tuple for grouped-query widths (``widths=(Nq, Nk, Nv)``).

``fused_ln_qkv_gptq_reference`` is the same computation in plain torch (any device): the golden reference
of the tests and the path for machines without CUDA/Triton. ``fused_v7_mix_rkv_i4`` is its RWKV-7 form for a
decode step: LayerNorm + the six token-shift mixes + the r, k, v int4 products in one launch (with its reference).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import DeviceError, ShapeMismatchError, UnsupportedDtypeError
from rwkv_chat.models.formats.i4 import Int4Weight
from rwkv_chat.models.ops._checks import HALF_DTYPES, check_cuda, check_dtype, check_shape
from rwkv_chat.models.ops._triton import kernels as triton_kernels, next_pow2
from rwkv_chat.models.ops._triton import multiprocessors as _sms
from rwkv_chat.models.ops.prenorm import _TILE, pick_blocks

_BLOCK_M, _BLOCK_N, _BLOCK_K = 16, 64, 128
#: rows up to which the product runs as a GEMV (``ln_qkv_gptq_gemv_kernel``; more rows: tensor-core tiles)
GEMV_ROWS = 4


def _check(x, qweight, qzeros, scales, ln_weight, ln_bias, groupsize, eps, widths, g_idx, rms):
    check_dtype(x, "input", HALF_DTYPES)
    check_dtype(qweight, "qweight", (torch.int32,))
    check_dtype(qzeros, "qzeros", (torch.int32,))
    check_dtype(scales, "scales", (torch.float16, torch.bfloat16, torch.float32))
    check_dtype(ln_weight, "ln_weight", (x.dtype, torch.float32))
    if ln_bias is not None:
        check_dtype(ln_bias, "ln_bias", (x.dtype, torch.float32))
    if g_idx is not None:
        check_dtype(g_idx, "g_idx", (torch.int32,))
    check_shape(x, "input", (None, None, None))
    H = x.shape[-1]
    if H % 8:
        raise ShapeMismatchError(f"hidden size {H} is not a multiple of 8 (GPTQ packs 8 rows per int32)",
                                 tensor="input", expected="H % 8 == 0", actual=H)
    check_shape(qweight, "qweight", (H // 8, None))
    N = qweight.shape[1]
    if not isinstance(groupsize, int) or isinstance(groupsize, bool) or groupsize <= 0 or H % groupsize:
        raise ShapeMismatchError(f"groupsize {groupsize!r} must be a positive divisor of H={H}", tensor="groupsize",
                                 expected=f"divisor of {H}", actual=groupsize)
    if N % 8:
        raise ShapeMismatchError(f"output width {N} is not a multiple of 8", tensor="qweight",
                                 expected="N % 8 == 0", actual=N)
    check_shape(qzeros, "qzeros", (H // groupsize, N // 8))
    check_shape(scales, "scales", (H // groupsize, N))
    check_shape(ln_weight, "ln_weight", (H,))
    if ln_bias is not None:
        check_shape(ln_bias, "ln_bias", (H,))
    if g_idx is not None:
        check_shape(g_idx, "g_idx", (H,))
    if widths is None:
        if N % 3:
            raise ShapeMismatchError(f"output width {N} is not three equal widths; pass widths=(Nq, Nk, Nv)",
                                     tensor="qweight", expected="N % 3 == 0", actual=N)
        widths = (N // 3,) * 3
    if len(widths) != 3 or sum(widths) != N or min(widths) <= 0:
        raise ShapeMismatchError(f"widths {tuple(widths)} must be three positive widths summing to {N}",
                                 tensor="widths", expected=f"sum {N}", actual=tuple(widths))
    if not (isinstance(eps, float) and eps > 0):
        raise UnsupportedDtypeError(f"eps must be a positive float, got {eps!r}", tensor="eps",
                                    expected="float > 0", actual=eps)
    return tuple(int(w) for w in widths)


def _shape_out(flat: torch.Tensor, B: int, S: int, widths):
    if widths[0] == widths[1] == widths[2]:
        return flat.view(3, B, S, widths[0])
    nq, nk, _ = widths
    M = B * S
    q, k, v = flat[:M * nq], flat[M * nq:M * (nq + nk)], flat[M * (nq + nk):]
    return tuple(t.view(B, S, w) for t, w in zip((q, k, v), widths))


def norm_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
              rms: bool = False) -> torch.Tensor:
    """LayerNorm (``bias`` may be None) or, with ``rms``, RMSNorm of x's last dim in float32, rounded to x's
    dtype: the norm of ``fused_ln_qkv_gptq_reference`` (and of the compiled form's checks)."""
    xf = x.float()
    if rms:
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return torch.nn.functional.layer_norm(xf, (x.shape[-1],), weight.float(), None if bias is None else bias.float(),
                                          eps).to(x.dtype)


def _regroup(y: torch.Tensor, B: int, S: int, widths):
    """The op's result from the products y [B*S, N] of the concatenated q|k|v: each projection's rows together."""
    if y.shape[0] == 1:
        return _shape_out(y.view(-1), B, S, widths)
    nq, nk, _ = widths
    return _shape_out(torch.cat([y[:, :nq].reshape(-1), y[:, nq:nq + nk].reshape(-1), y[:, nq + nk:].reshape(-1)]),
                      B, S, widths)


def fused_ln_qkv_gptq(input: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      ln_weight: torch.Tensor, ln_bias: torch.Tensor | None, groupsize: int, eps: float = 1e-5, *,
                      widths: tuple[int, int, int] | None = None, g_idx: torch.Tensor | None = None,
                      rms: bool = False, blocks: tuple[int, ...] | None = None):
    """LayerNorm/RMSNorm + q/k/v int4 projections in one launch (module docstring): for 1..4 rows with W held
    output-major (``Int4Weight.qweight`` of a weight on CUDA), no g_idx and the norm's parameters in input's dtype,
    the compiled int4 GEMV of ``csrc/gemvq`` (``kernels.dispatch.norm_gemv_i4``: every block computes the row's
    norm as it stages x; a copy regroups q/k/v for 2..4 rows) where it is built; else Triton.

    Args:
        input: [B, S, H] float16/bfloat16 on CUDA.
        qweight: int32 [H/8, N], any strides (the GPTQ layout, or the output-major view ``Int4Weight.qweight`` of
            a weight held output-major); qzeros: int32 [H/groupsize, N/8]; scales: float [H/groupsize, N].
        ln_weight, ln_bias: [H] (input's dtype or float32); ln_bias None for no bias (and with ``rms``).
        groupsize: input rows per quantization group (divides H). eps: the norm's epsilon (> 0).
        widths: (Nq, Nk, Nv) summing to N; default three equal widths.
        g_idx: optional int32 [H] group of each input row (GPTQ act-order).
        rms: RMSNorm instead of LayerNorm (Qwen2).
        blocks: for 1..4 rows (the GEMV form), (BLOCK_N, BLOCK_K[, num_warps]) powers of two (BLOCK_K a multiple
            of 8) instead of the default (benchmark sweeps).
    Returns:
        [3, B, S, N/3] in input's dtype for equal widths, else a (q, k, v) tuple of [B, S, width].
    Raises:
        UnsupportedDtypeError: a dtype above (or eps not a positive float). ShapeMismatchError: a shape above.
        DeviceError: an input not on CUDA, inputs on several devices, or no Triton where the compiled form does
            not serve.
    """
    widths = _check(input, qweight, qzeros, scales, ln_weight, ln_bias, groupsize, eps, widths, g_idx, rms)
    check_cuda({"input": input, "qweight": qweight, "qzeros": qzeros, "scales": scales, "ln_weight": ln_weight,
                "ln_bias": ln_bias, "g_idx": g_idx})
    B, S, H = input.shape
    M, N = B * S, qweight.shape[1]
    x = input.reshape(M, H)
    if x.stride(1) != 1:
        x = x.contiguous()
    qzeros, scales, ln_weight = qzeros.contiguous(), scales.contiguous(), ln_weight.contiguous()
    ln_bias = ln_bias.contiguous() if ln_bias is not None else None
    if M <= GEMV_ROWS and blocks is None and g_idx is None:
        from rwkv_chat.models.kernels import dispatch      # the compiled form (csrc/gemvq), where it serves

        y = dispatch.norm_gemv_i4(x, qweight, qzeros, scales, groupsize, ln_weight, ln_bias, eps, rms)
        if y is not None:
            return _regroup(y, B, S, widths)
    k = triton_kernels("rwkv_chat.models.ops._gptq_kernels", "fused_ln_qkv_gptq")
    out = torch.empty(M * N, dtype=input.dtype, device=input.device)
    bias = ln_bias if ln_bias is not None and not rms else ln_weight
    gi = g_idx if g_idx is not None else qweight
    if M <= GEMV_ROWS:
        r_pad = next_pow2(M)
        if blocks is None:
            block_n, _ = pick_blocks(M, N, _BLOCK_K, _sms(input.device))
            block_n, block_k, warps = max(8, min(block_n, _TILE // (r_pad * _BLOCK_K))), _BLOCK_K, 4
        else:
            block_n, block_k, warps = (*blocks, 4)[:3]
        k.ln_qkv_gptq_gemv_kernel[(-(-N // block_n),)](
            x, ln_weight, bias, qweight, qzeros, scales, gi, out, M, H, N, widths[0], widths[1], groupsize, eps,
            x.stride(0), qweight.stride(0), qweight.stride(1), NORM=1 if rms else 2,
            HAS_BIAS=ln_bias is not None and not rms, HAS_GIDX=g_idx is not None,
            ONE_GROUP=g_idx is None and groupsize % block_k == 0, R_PAD=r_pad, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps)
        return _shape_out(out, B, S, widths)
    grid = (-(-M // _BLOCK_M), -(-N // _BLOCK_N))
    k.ln_qkv_gptq_kernel[grid](x, ln_weight, bias, qweight, qzeros, scales, gi,
                               out, M, H, N, widths[0], widths[1], groupsize, eps, x.stride(0), qweight.stride(0),
                               qweight.stride(1), NORM=1 if rms else 2,
                               HAS_BIAS=ln_bias is not None and not rms, HAS_GIDX=g_idx is not None,
                               ONE_GROUP=g_idx is None and groupsize % _BLOCK_K == 0,
                               BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K)
    return _shape_out(out, B, S, widths)


def fused_ln_qkv_gptq_reference(input, qweight, qzeros, scales, ln_weight, ln_bias, groupsize, eps=1e-5, *,
                                widths=None, g_idx=None, rms=False, blocks=None):
    """``fused_ln_qkv_gptq`` in plain torch on any device (float32 norm, the weight dequantized by
    ``formats.i4.Int4Weight.dequantize``, the product in input's dtype); same arguments, results and input
    errors (no DeviceError: it runs anywhere)."""
    widths = _check(input, qweight, qzeros, scales, ln_weight, ln_bias, groupsize, eps, widths, g_idx, rms)
    B, S, H = input.shape
    w = Int4Weight(qweight, qzeros, scales, g_idx, groupsize).dequantize(input.dtype)
    return _regroup((norm_rows(input, ln_weight, ln_bias, eps, rms) @ w).reshape(B * S, -1), B, S, widths)


def _v7_check(x, dx, ln_weight, ln_bias, shift, mix6, weights):
    check_dtype(x, "x", HALF_DTYPES)
    check_shape(x, "x", (None, None))
    rows, C = x.shape
    if not 1 <= rows <= GEMV_ROWS:
        raise ShapeMismatchError(f"x has {rows} rows; the fused RWKV-7 mix + r/k/v serves 1..{GEMV_ROWS}",
                                 tensor="x", expected=f"(1..{GEMV_ROWS}, C)", actual=tuple(x.shape))
    for name, t, shape in (("dx", dx, (rows, C)), ("shift", shift, (rows, C)), ("ln_weight", ln_weight, (C,)),
                           ("ln_bias", ln_bias, (C,)), ("mix6", mix6, (6, C))):
        if t is None and name == "dx":
            continue
        check_dtype(t, name, (x.dtype,))
        check_shape(t, name, shape)
    if len(weights) != 3 or not all(isinstance(q, Int4Weight) for q in weights):
        raise UnsupportedDtypeError("weights must be the three Int4Weight of r, k, v", tensor="weights",
                                    expected="(Int4Weight,) * 3", actual=tuple(type(q).__name__ for q in weights))
    q0 = weights[0]
    for name, q in zip("rkv", weights):
        if tuple(q.shape) != (C, C) or q.qweight.shape != q0.qweight.shape or q.qweight.stride() != q0.qweight.stride() \
                or q.group_size != q0.group_size or q.g_idx is not None:
            raise ShapeMismatchError(f"weight {name}: [C, C] int4 weights of one layout and group, no g_idx, are "
                                     f"served (C={C})", tensor=name, expected=(C, C), actual=tuple(q.shape))
    return rows, C


def fused_v7_mix_rkv_i4(x: torch.Tensor, dx: torch.Tensor | None, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                        shift: torch.Tensor, mix6: torch.Tensor, weights, eps: float = 1e-5):
    """The RWKV-7 form of ``fused_ln_qkv_gptq`` for a decode step, one launch: h = x + dx (rounded to x's dtype; x
    alone without dx), xl = LayerNorm(h) (ln1, rounded), the six token-shift mixes ``round(xl + (shift - xl) *
    mix6[m])`` (r, w, k, v, a, g: ChatRWKV ``RWKV_x070_TMix_one``'s ``xr .. xg``), the r, k, v products with their
    int4 weights, and the new shift state: ``shift`` is overwritten with xl.

    Args:
        x, dx: [rows, C] float16/bfloat16 on CUDA, 1..4 rows (dx may be None). ln_weight, ln_bias: [C].
        shift: [rows, C] the previous token's xl (updated in place). mix6: [6, C].
        weights: (r, k, v) ``Int4Weight`` [C, C] of one layout and group size, no g_idx.
        eps: LayerNorm epsilon (ChatRWKV: 1e-5).
    Returns:
        ``(mix [6, rows, C], r, k, v [rows, C], h [rows, C])`` in x's dtype.
    Raises:
        UnsupportedDtypeError, ShapeMismatchError: an input above. DeviceError: not on CUDA, or no Triton.
    """
    rows, C = _v7_check(x, dx, ln_weight, ln_bias, shift, mix6, weights)
    q0 = weights[0]
    check_cuda({"x": x, "dx": dx, "ln_weight": ln_weight, "shift": shift, "mix6": mix6, "qweight": q0.qweight})
    k = triton_kernels("rwkv_chat.models.ops._gptq_kernels", "fused_v7_mix_rkv_i4")
    from rwkv_chat.models.ops.gemv import _counters

    counters = _counters(x.device)
    if counters is None:
        raise DeviceError("fused_v7_mix_rkv_i4: its counter is made outside CUDA graph capture; call it once before "
                          "capturing", expected="a first call outside capture", actual="capturing")
    if shift.stride(-1) != 1:
        raise ShapeMismatchError("shift is updated in place: its last dim must be contiguous", tensor="shift",
                                 expected="stride 1 in the last dim", actual=tuple(shift.stride()))
    x = x.contiguous()
    dx = dx.contiguous() if dx is not None else None
    ln_weight, ln_bias, mix6 = ln_weight.contiguous(), ln_bias.contiguous(), mix6.contiguous()
    N = q0.qweight.shape[1]
    r_pad = next_pow2(rows)
    block_n = max(8, min(pick_blocks(rows, 3 * N, _BLOCK_K, _sms(x.device))[0], _TILE // (r_pad * _BLOCK_K)))
    out = torch.empty(3, rows, N, dtype=x.dtype, device=x.device)
    mix = torch.empty(6, rows, C, dtype=x.dtype, device=x.device)
    h = torch.empty_like(x) if dx is not None else x
    r, kk, v = weights
    k.v7_mix_rkv_i4_kernel[(3 * (-(-N // block_n)),)](
        x, dx if dx is not None else x, h, ln_weight, ln_bias, shift, mix6, mix,
        r.qweight, r.qzeros, r.scales, kk.qweight, kk.qzeros, kk.scales, v.qweight, v.qzeros, v.scales,
        out[0], out[1], out[2], counters, rows, C, N, q0.group_size, float(eps), x.stride(0),
        (dx if dx is not None else x).stride(0), shift.stride(0), q0.qweight.stride(0), q0.qweight.stride(1),
        HAS_DX=dx is not None, ONE_GROUP=q0.group_size % _BLOCK_K == 0, R_PAD=r_pad, BLOCK_N=block_n,
        BLOCK_K=_BLOCK_K, num_warps=4)
    ys = out[:, :, :C].contiguous() if N != C else out
    return mix, ys[0], ys[1], ys[2], h


def fused_v7_mix_rkv_i4_reference(x, dx, ln_weight, ln_bias, shift, mix6, weights, eps=1e-5):
    """``fused_v7_mix_rkv_i4`` in plain torch (any device; float32 inside, each stage rounded as the kernel rounds):
    same arguments, results (``shift`` updated in place) and input errors (no DeviceError)."""
    rows, C = _v7_check(x, dx, ln_weight, ln_bias, shift, mix6, weights)
    h = x if dx is None else (x.float() + dx.float()).to(x.dtype)
    xl = torch.nn.functional.layer_norm(h.float(), (C,), ln_weight.float(), ln_bias.float(), eps).to(x.dtype)
    mix = (xl.float()[None] + (shift.float() - xl.float())[None] * mix6.float()[:, None]).to(x.dtype)
    ys = [(mix[m].float() @ q.dequantize(x.dtype).float()).to(x.dtype) for m, q in zip((0, 2, 3), weights)]
    shift.copy_(xl)
    return mix, ys[0], ys[1], ys[2], h
