"""The Triton operators of ``rwkv_chat.models.ops`` and the compiled grouped GEMV behind ``QwenOps`` (CUDA, fp16/bf16
layers).

``fused_ops(base, device, dtype)`` returns ``(ops, note)``: ``base`` with ``rmsnorm`` (``ops.rmsnorm``: residual
add + RMSNorm), ``rope`` (``ops.rope``: q and k in one launch), ``qk_norm_rope`` (``ops.qk_norm_rope``: Qwen3's
per-head norm + RoPE), ``gated_mlp`` (up to ``FUSED_MLP_ROWS`` rows ``ops.fused_gated_mlp``: SwiGLU on fp16/bf16
tensor cores reading the gate and up halves of the packed [2F, C] matrix; more rows: one cuBLAS GEMM and
``ops.silu_mul``), the decode step's ``rope_store`` and ``decode_attention`` (``ops.decode``) and both in one launch
(``rope_attention``, which the decode step calls), and its products of
1..4 rows (``linear``, ``norm_linear``, ``norm_gated_mlp``) as ``gemv`` says (``GEMV_MODES``): with "compiled"
the grouped GEMV of ``csrc/fused`` (q|k|v's bias and SwiGLU in its epilogue), with "compiled-norm" also the
residual add and RMSNorm inside the q|k|v and gate|up launches, with "triton" the norms inside ``ops.norm_gemv``.
Ops are replaced where each runs: every op is tried once on small inputs of the model's dtype and checked against the torch form; an
op that fails (no Triton, a compile error, a wrong result) keeps the torch form, and ``note`` says which ops serve
and why others do not. Prefill attention stays with ``scaled_dot_product_attention`` (flash kernels on CUDA).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from rwkv_chat.models.qwen2 import layers


def _rmsnorm(fused):
    def rmsnorm(x, weight, eps, residual=None):
        return fused(x, weight, eps, residual)
    return rmsnorm


def _table(t: torch.Tensor) -> torch.Tensor:
    """The model's cos/sin [1, T, D] (shared by the batch) as the ops take it, [T, D]; [B, T, D] unchanged."""
    return t[0] if t.shape[0] == 1 else t


def _rope(fused):
    def rope(q, k, cos, sin):
        return fused(q, k, _table(cos), _table(sin))
    return rope


def _qk_norm_rope(fused):
    def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps):
        return fused(q, k, q_weight, k_weight, _table(cos), _table(sin), eps)
    return qk_norm_rope


#: rows up to which the projections of a step run ``ops.norm_gemv`` (the norm inside the GEMV; ``ops.prenorm``)
GEMV_ROWS = 4

#: rows up to which the gated MLP runs the fused Triton kernel (both products share each loaded x tile; measured on
#: an H200, bench/ops.py: M=1 and M=64 at or near cuBLAS); above, one cuBLAS GEMM over the packed gate|up matrix and
#: ``silu_mul`` (cuBLAS's large-tile GEMM is 9-12% faster at M=8192 there)
FUSED_MLP_ROWS = 64


def _gated(fused, silu_mul, fallback):
    def gated_mlp(x, gate_up, matmul):
        if isinstance(gate_up, torch.Tensor) and gate_up.t().is_contiguous() \
                and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == gate_up.dtype:
            rows = x.numel() // x.shape[-1]
            if rows <= FUSED_MLP_ROWS:
                w = gate_up.t()                                   # [2F, C]: gate rows, then up rows
                f = w.shape[0] // 2
                return fused(x, w[:f], w[f:])
            return silu_mul(x @ gate_up)
        return fallback(x, gate_up, matmul)
    return gated_mlp


def _gemv_ok(x: torch.Tensor, w) -> bool:
    """Whether a decode GEMV (``ops.norm_gemv``, or the compiled grouped GEMV of ``kernels.dispatch``) takes the
    product x @ w: at most its rows, a plain matrix in x's half dtype held output-major (the [in, out] view of a
    contiguous nn.Linear [out, in]: ``weights.pack``), on x's CUDA device."""
    return (isinstance(w, torch.Tensor) and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and w.dtype == x.dtype and w.t().is_contiguous() and w.device == x.device
            and x.numel() <= GEMV_ROWS * x.shape[-1])


def _linear(gemv):
    def linear(x, w, bias, matmul):
        if _gemv_ok(x, w):
            return gemv(x, w.t(), bias=bias)[0]
        return layers.linear(x, w, bias, matmul)
    return linear


def _norm_linear(gemv):
    def norm_linear(x, residual, norm_weight, eps, w, bias, ops):
        if _gemv_ok(x, w):
            return gemv(x, w.t(), norm="rms", norm_weight=norm_weight, eps=eps, residual=residual, bias=bias)
        return layers.norm_linear(x, residual, norm_weight, eps, w, bias, ops)
    return norm_linear


def _norm_gated(gemv):
    def norm_gated_mlp(x, residual, norm_weight, eps, gate_up, ops):
        if _gemv_ok(x, gate_up):
            return gemv(x, gate_up.t(), norm="rms", norm_weight=norm_weight, eps=eps, residual=residual, swiglu=True)
        return layers.norm_gated_mlp(x, residual, norm_weight, eps, gate_up, ops)
    return norm_gated_mlp


def _compiled_linear(dispatch):
    def linear(x, w, bias, matmul):
        if _gemv_ok(x, w) and (bias is None or bias.dtype == x.dtype):
            ys = dispatch.gemv_group([x.reshape(-1, x.shape[-1])], [w.t()], biases=[bias])
            if ys is not None:
                return ys[0].view(*x.shape[:-1], w.shape[1])
        return layers.linear(x, w, bias, matmul)
    return linear


def _compiled_gated(dispatch, fallback):
    def gated_mlp(x, gate_up, matmul):
        if _gemv_ok(x, gate_up):
            ys = dispatch.gemv_group([x.reshape(-1, x.shape[-1])], [gate_up.t()], glu=[True])
            if ys is not None:
                return ys[0].view(*x.shape[:-1], gate_up.shape[1] // 2)
        return fallback(x, gate_up, matmul)
    return gated_mlp


#: the most outputs a product takes with the RMSNorm inside its launch ("compiled-norm"): every block normalizes the
#: rows itself, re-reading them from L2, so a product of many blocks (the head: 151,936 outputs) keeps the norm launch
NORM_INSIDE_MAX_OUTPUTS = 32768


def _norm_product(dispatch, x, residual, norm_weight, eps, w, bias, glu: bool):
    """The residual add, RMSNorm and one product (``glu``: SwiGLU's gate|up) in one launch of
    ``dispatch.norm_gemv_group`` -> (y, x + residual), or None where it does not take them."""
    if not (_gemv_ok(x, w) and (bias is None or bias.dtype == x.dtype)
            and w.shape[1] // (2 if glu else 1) <= NORM_INSIDE_MAX_OUTPUTS):
        return None
    flat = x.reshape(-1, x.shape[-1])
    out = dispatch.norm_gemv_group(flat, None if residual is None else residual.reshape(flat.shape), norm_weight,
                                   eps, [w.t()], biases=[bias], glu=[glu])
    if out is None:
        return None
    (y,), h = out
    return y.view(*x.shape[:-1], y.shape[-1]), h.view(x.shape)


def _compiled_norm_linear(dispatch):
    def norm_linear(x, residual, norm_weight, eps, w, bias, ops):
        out = _norm_product(dispatch, x, residual, norm_weight, eps, w, bias, False)
        return out if out is not None else layers.norm_linear(x, residual, norm_weight, eps, w, bias, ops)
    return norm_linear


def _compiled_norm_gated(dispatch):
    def norm_gated_mlp(x, residual, norm_weight, eps, gate_up, ops):
        out = _norm_product(dispatch, x, residual, norm_weight, eps, gate_up, None, True)
        return out if out is not None else layers.norm_gated_mlp(x, residual, norm_weight, eps, gate_up, ops)
    return norm_gated_mlp


def _probe(name: str, fn, ref, args) -> str | None:
    """None when ``fn(*args)`` runs and agrees with ``ref(*args)`` to half-precision rounding, else the reason."""
    try:
        got, want = fn(*args), ref(*args)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            if g.shape != w.shape or not torch.allclose(g.float(), w.float(), atol=3e-2, rtol=3e-2):
                return f"{name}: differs from the torch form"
    except Exception as e:  # noqa: BLE001 — the torch form serves; the note says why
        return f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _decode_probe(device, dtype, rnd, norm: bool):
    """Inputs of ``rope_store`` (and, from its output, ``decode_attention``): 3 rows at positions 0, 5 and 300 of
    caches of 320 positions (H = 4, K = 2, D = 64; splits along the positions as a long cache takes them)."""
    H, K, D, cap = 4, 2, 64, 320
    cos, sin = (t.to(device, dtype) for t in layers.rope_table(1e4, D, cap))
    lens = torch.tensor([0, 5, 300], device=device)
    kc, vc = rnd(3, K, cap, D), rnd(3, K, cap, D)
    qkv = rnd(3, (H + 2 * K) * D)
    w = (rnd(D) * 0.1 + 1, rnd(D) * 0.1 + 1) if norm else (None, None)
    return qkv, cos, sin, lens, kc, vc, H, *w


def _cache_check(fused, reference):
    """fused vs torch form of an op that writes the caches (``rope_store``, ``rope_attention``) on copies of the same
    caches: its output and both caches compared."""
    def run(fn, qkv, cos, sin, lens, kc, vc, H, qw, kw):
        kc, vc = kc.clone(), vc.clone()
        return fn(qkv, cos, sin, lens, kc, vc, H, qw, kw, 1e-6), kc, vc
    return (lambda *a: run(fused, *a)), (lambda *a: run(reference, *a))


def _prenorm_probes(base: layers.QwenOps, rnd, C: int, F: int, bias: torch.Tensor) -> dict:
    """Inputs of the decode-step products (1 and 3 rows of [b, 1, C]; w, gate|up held output-major) and their
    torch forms on ``base`` (each probe list: (reference, args) pairs)."""
    w, gu = (rnd(bias.numel(), C) * 0.05).t(), (rnd(2 * F, C) * 0.05).t()
    ln = rnd(C) * 0.1 + 1
    out = {"linear": [], "norm_linear": [], "norm_gated_mlp": []}
    for b in (1, 3):
        x, res = rnd(b, 1, C), rnd(b, 1, C)
        out["linear"].append((layers.linear, (x, w, bias, lambda a, m: a @ m)))
        out["norm_linear"].append((layers.norm_linear, (x, res, ln, 1e-6, w, bias, base)))
        out["norm_gated_mlp"].append((layers.norm_gated_mlp, (x, None if b == 1 else res, ln, 1e-6, gu, base)))
    return out


#: the products of 1..GEMV_ROWS rows (``fused_ops(gemv=...)``): "cublas" (RMSNorm, then cuBLAS and
#: ``fused_gated_mlp``), "triton" (``ops.norm_gemv``: the RMSNorm inside each GEMV), "compiled" (RMSNorm, then the
#: compiled grouped GEMV of ``csrc/fused``, ``kernels.dispatch.gemv_group``: q|k|v with its bias in the epilogue,
#: o, gate|up with SwiGLU in the epilogue, down, the head), "compiled-norm" (the same with the residual add and
#: RMSNorm inside the q|k|v and gate|up launches, ``kernels.dispatch.norm_gemv_group``)
GEMV_MODES = ("cublas", "triton", "compiled", "compiled-norm")
#: the mode a Qwen2 on CUDA takes: on an H100 (one call, bench/results/h100.md), Qwen2 1.5B bf16 decoded at 653.3
#: tok/s with "compiled-norm", 636.6 with "compiled" and 546.3 with "cublas"; verify_qwen2 passes with each
DEFAULT_GEMV = "compiled-norm"


def fused_ops(base: layers.QwenOps, device: torch.device, dtype: torch.dtype,
              gemv: str = DEFAULT_GEMV) -> tuple[layers.QwenOps, str]:
    """``base`` with the Triton ops that run on ``device`` in ``dtype`` (see the module docstring), and the products
    of 1..4 rows as ``gemv`` says (``GEMV_MODES``; ``DEFAULT_GEMV`` by default; "triton" decoded at 486 tok/s in an
    earlier H100 call). "compiled" and "compiled-norm" need the compiled CUDA library (``kernels.ensure_built("cuda")``):
    where it is not loaded, or a probe finds it wrong, cuBLAS serves and the note says why. Raises ValueError for
    another ``gemv``."""
    if gemv not in GEMV_MODES:
        raise ValueError(f"gemv must be one of {GEMV_MODES}, not {gemv!r}")
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return base, "torch ops (the Triton ops serve fp16/bf16 on CUDA)"
    try:
        from rwkv_chat.models import ops as triton_ops

        chosen = {"rmsnorm": _rmsnorm(triton_ops.rmsnorm), "rope": _rope(triton_ops.rope),
                  "qk_norm_rope": _qk_norm_rope(triton_ops.qk_norm_rope),
                  "gated_mlp": _gated(triton_ops.fused_gated_mlp, triton_ops.silu_mul, base.gated_mlp),
                  "rope_store": triton_ops.rope_store, "decode_attention": triton_ops.decode_attention,
                  "rope_attention": triton_ops.rope_attention}
        if gemv == "triton":
            chosen.update(linear=_linear(triton_ops.norm_gemv), norm_linear=_norm_linear(triton_ops.norm_gemv),
                          norm_gated_mlp=_norm_gated(triton_ops.norm_gemv))
    except (ImportError, AttributeError) as e:
        return base, f"torch ops (Triton ops unavailable: {e})"
    compiled_problem = None
    if gemv.startswith("compiled"):
        from rwkv_chat.models import kernels
        from rwkv_chat.models.kernels import dispatch

        if kernels.available("cuda", "v7fused"):
            chosen.update(linear=_compiled_linear(dispatch), gated_mlp=_compiled_gated(dispatch, chosen["gated_mlp"]))
            if gemv == "compiled-norm":
                chosen.update(norm_linear=_compiled_norm_linear(dispatch),
                              norm_gated_mlp=_compiled_norm_gated(dispatch))
        else:
            compiled_problem = "compiled GEMV: the compiled CUDA library is not loaded"
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    B, T, H, K, D, C, F = 2, 3, 4, 2, 64, 256, 512
    cos, sin = (t.to(device, dtype)[None] for t in layers.rope_table(1e4, D, T))         # [1, T, D]
    w = rnd(C) * 0.1 + 1
    store_args = _decode_probe(device, dtype, rnd, norm=False)
    writes = {name: _cache_check(chosen[name], getattr(layers, name)) for name in ("rope_store", "rope_attention")}
    q = rnd(3, H, D)
    kc, vc, lens = store_args[4], store_args[5], store_args[3]
    probes = {"rmsnorm": (layers.add_rmsnorm, (rnd(B, T, C), w, 1e-6, rnd(B, T, C))),
              "rope": (layers.rope, (rnd(B, T, H, D), rnd(B, T, K, D), cos, sin)),
              "qk_norm_rope": (layers.qk_norm_rope, (rnd(B, T, H, D), rnd(B, T, K, D), rnd(D) * 0.1 + 1,
                                                     rnd(D) * 0.1 + 1, cos, sin, 1e-6)),
              "gated_mlp": (layers.gated_mlp, (rnd(B, T, C) * 0.1, (rnd(2 * F, C) * 0.05).t(), lambda x, w: x @ w)),
              "rope_store": (writes["rope_store"][1], store_args),
              "decode_attention": (layers.decode_attention, (q, kc, vc, lens)),
              "rope_attention": (writes["rope_attention"][1], store_args)}
    extra: dict[str, list] = {}
    tried = {name: chosen[name] for name in chosen}
    tried.update({name: fused for name, (fused, _) in writes.items()})
    serving, problems = [], [compiled_problem] if compiled_problem else []
    if "norm_linear" in chosen:    # the decode products with their norms: 1 and 3 rows, with and without a residual
        for name, cases in _prenorm_probes(base, rnd, C, F, rnd(2 * C) * 0.1).items():
            probes[name] = cases[0]
            extra[name] = cases[1:]
    if gemv.startswith("compiled") and "linear" in chosen:   # and without a bias; SwiGLU of 1 and 3 rows
        probes.setdefault("linear", (layers.linear, (rnd(1, 1, C), (rnd(2 * C, C) * 0.05).t(), rnd(2 * C) * 0.1,
                                                     lambda a, m: a @ m)))
        extra.setdefault("linear", []).append((layers.linear, (rnd(3, 1, C), (rnd(2 * C, C) * 0.05).t(), None, lambda a, m: a @ m)))
        extra["gated_mlp"] = [(layers.gated_mlp, (rnd(b, 1, C) * 0.1, (rnd(2 * F, C) * 0.05).t(), lambda x, w: x @ w))
                              for b in (1, 3)]
    for name, (ref, args) in probes.items():
        reason = _probe(name, tried[name], ref, args)
        for more_ref, more_args in extra.get(name, ()):
            reason = reason or _probe(name, tried[name], more_ref, more_args)
        if name in writes and reason is None:                # Qwen3's per-head norm through the same op
            reason = _probe(name, *writes[name], _decode_probe(device, dtype, rnd, norm=True))
        if name == "gated_mlp" and reason is None:           # the cuBLAS + silu_mul side of prefill
            reason = _probe(name, tried[name], ref, (rnd(2, 80, C) * 0.1, (rnd(2 * F, C) * 0.05).t(),
                                                      lambda x, w: x @ w))
        if reason is None:
            serving.append(name)
        else:
            problems.append(reason)
            del chosen[name]
    note = f"Triton {', '.join(serving) or 'none'}" + (f" (torch for {'; '.join(problems)})" if problems else "")
    return replace(base, **chosen), note
