"""The Triton operators of ``rwkv_chat.models.ops`` against plain torch references (run on a GPU machine).

    python tests/gpu/verify_ops.py [--out results.md] [--groups ops decode prenorm compiled]

Fresh random inputs (seeded) over the shapes of Qwen2 0.5B / 1.5B / 7B and Qwen3 heads, in float32, float16 and
bfloat16 (the GEMM in the half dtypes only). The reference (``tests/models/ops/reference.py``) computes in fp32;
the error is the largest |ours - reference| / (atol + rtol |reference|) over the output (<= 1 passes, the
tolerances of an output rounded to its dtype). The decode step's ``rope_store`` and ``decode_attention`` are checked
against the torch forms of ``models/qwen2/layers.py`` (``decode_cases``), ``norm_gemv`` against its torch reference
(``prenorm_cases``); SwiGLU of 1..4 rows through the compiled grouped GEMV (``compiled_gated_cases``, after the
rest: it loads the compiled kernels). Prints a Markdown table; exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.app.bench import provenance  # noqa: E402
from rwkv_chat.models import ops  # noqa: E402
from rwkv_chat.models.ops.decode import splits_for  # noqa: E402
from rwkv_chat.models.qwen2 import layers  # noqa: E402
from tests.models.ops.reference import (ref_cos_sin, ref_gated_mlp, ref_qk_norm_rope, ref_rmsnorm,  # noqa: E402
                                        ref_rmsnorm_rope, ref_rope, ref_silu_mul)

TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
HALVES = (torch.float16, torch.bfloat16)


def score(out: torch.Tensor, ref: torch.Tensor, dtype, scale: float = 1.0) -> float:
    """max |out - ref| / (atol*scale + rtol |ref|): <= 1 within tolerance; inf for a non-finite output."""
    out, ref = out.double(), ref.double()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    rtol, atol = TOL[dtype]
    return ((out - ref).abs() / (atol * scale + rtol * ref.abs())).max().item()


def rand(gen, *shape, dtype, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to("cuda", dtype)


def tables(gen, b, t, d):
    pos = torch.randint(0, 30000, (b, 1), generator=gen) + torch.arange(t)
    cos, sin = ref_cos_sin(pos, d, 1e6)
    return cos.cuda(), sin.cuda()


def cases():
    """(op, shape text, dtype, ours, reference, error scale) for every checked case."""
    gen = torch.Generator().manual_seed(2024)
    for dtype in FLOATS:
        for b, t, h, d in ((1, 1, 14, 64), (4, 1, 28, 128), (1, 1024, 12, 128), (2, 37, 28, 128)):
            x, w = rand(gen, b, t, h * d, dtype=dtype), rand(gen, h * d, dtype=dtype)
            cos, sin = tables(gen, b, t, d)
            yield ("fused_rmsnorm_rope", f"B={b} T={t} H={h} D={d}", dtype,
                   lambda: ops.fused_rmsnorm_rope(x, w, cos, sin, 1e-6), lambda: ref_rmsnorm_rope(x, w, cos, sin, 1e-6, h), 4)
        for rows, hidden in ((1, 896), (64, 1536), (1024, 3584), (3, 100)):
            x, r, w = rand(gen, rows, hidden, dtype=dtype), rand(gen, rows, hidden, dtype=dtype), rand(gen, hidden, dtype=dtype)
            yield ("rmsnorm (+residual)", f"rows={rows} hidden={hidden}", dtype,
                   lambda: ops.rmsnorm(x, w, 1e-6, r)[0], lambda: ref_rmsnorm(x, w, 1e-6, r)[0], 4)
        for b, t, hq, hkv, d in ((1, 1, 14, 2, 64), (8, 1, 12, 2, 128), (1, 512, 28, 4, 128)):
            qkv = rand(gen, b, t, (hq + 2 * hkv) * d, dtype=dtype)
            q, k = qkv[..., :hq * d].view(b, t, hq, d), qkv[..., hq * d:(hq + hkv) * d].view(b, t, hkv, d)
            cos, sin = tables(gen, b, t, d)
            yield ("rope q,k", f"B={b} T={t} Hq={hq} Hkv={hkv} D={d}", dtype,
                   lambda: torch.cat([o.flatten() for o in ops.rope(q, k, cos, sin)]),
                   lambda: torch.cat([o.flatten() for o in ref_rope(q, k, cos, sin)]), 1)
        for b, t, hq, hkv, d in ((1, 1, 16, 8, 128), (2, 64, 32, 8, 128)):
            q, k = rand(gen, b, t, hq, d, dtype=dtype), rand(gen, b, t, hkv, d, dtype=dtype)
            qw, kw = rand(gen, d, dtype=dtype), rand(gen, d, dtype=dtype)
            cos, sin = tables(gen, b, t, d)
            yield ("qk_norm_rope", f"B={b} T={t} Hq={hq} Hkv={hkv} D={d}", dtype,
                   lambda: torch.cat([o.flatten() for o in ops.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)]),
                   lambda: torch.cat([o.flatten() for o in ref_qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)]), 4)
        gu = rand(gen, 64, 2 * 8960, dtype=dtype, scale=3)
        yield "silu_mul", "M=64 I=8960", dtype, lambda: ops.silu_mul(gu), lambda: ref_silu_mul(gu), 4
    for dtype in HALVES:
        for m, hidden, inter in ((1, 896, 4864), (1, 1536, 8960), (1, 3584, 18944), (7, 1536, 8960),
                                 (16, 3584, 18944), (64, 1536, 8960), (1024, 896, 4864), (333, 200, 333)):
            x = rand(gen, m, hidden, dtype=dtype)
            g, u = rand(gen, inter, hidden, dtype=dtype, scale=hidden ** -0.5), rand(gen, inter, hidden, dtype=dtype,
                                                                                   scale=hidden ** -0.5)
            for act in (("silu", "gelu", "gelu_tanh") if m == 7 else ("silu",)):
                yield (f"fused_gated_mlp {act}", f"M={m} H={hidden} I={inter}", dtype,
                       lambda: ops.fused_gated_mlp(x, g, u, act), lambda: ref_gated_mlp(x, g, u, act), 2)


def _rope_store(fn, qkv, cos, sin, lens, kc, vc, H, qw, kw):
    """q, and the written cache rows, of ``fn`` (ours or the torch form) on fresh copies of the caches."""
    kc, vc = kc.clone(), vc.clone()
    q = fn(qkv, cos, sin, lens, kc, vc, H, qw, kw, 1e-6)
    return torch.cat([q.flatten(), kc.flatten(), vc.flatten()])      # whole caches: no write past the slots


def decode_cases():
    """The decode step's ops against the torch forms of ``models/qwen2/layers.py`` in fp32 (the path they replace:
    gathered cos/sin, rope, scatter, SDPA with each row's mask), the shapes of Qwen2 1.5B / 7B and Qwen3; caches
    from 256 positions (one pass) to 32768 (split along the positions, then combined), rows at random lengths."""
    gen = torch.Generator().manual_seed(7)
    for dtype in FLOATS:
        for b, hq, hkv, d, cap, norm in ((1, 12, 2, 128, 1024, False), (8, 28, 4, 128, 4096, False),
                                         (4, 16, 8, 128, 512, True), (3, 14, 2, 64, 300, False)):
            cos, sin = (t.to("cuda", dtype) for t in layers.rope_table(1e6, d, cap + 1))
            lens = torch.randint(0, cap, (b,), generator=gen).cuda()
            qkv = rand(gen, b, (hq + 2 * hkv) * d, dtype=dtype)
            kc, vc = rand(gen, b + 1, hkv, cap, d, dtype=dtype), rand(gen, b + 1, hkv, cap, d, dtype=dtype)
            w = (rand(gen, d, dtype=dtype, scale=0.1) + 1, rand(gen, d, dtype=dtype, scale=0.1) + 1) if norm else (None,) * 2
            f32 = [t.float() if t is not None else None for t in (qkv, cos, sin, lens, kc, vc)]
            f32[3] = lens
            yield ("rope_store", f"b={b} Hq={hq} Hkv={hkv} D={d} cap={cap}{' norm' if norm else ''}", dtype,
                   lambda: _rope_store(ops.rope_store, qkv, cos, sin, lens, kc, vc, hq, *w),
                   lambda: _rope_store(layers.rope_store, *f32, hq, *(t.float() if t is not None else None for t in w)),
                   4)
    for dtype in HALVES:
        for b, hq, hkv, d, cap, splits in ((1, 12, 2, 128, 256, None), (1, 12, 2, 128, 4096, None),
                                           (1, 28, 4, 128, 32768, None), (16, 28, 4, 128, 2048, None),
                                           (64, 12, 2, 128, 1024, None), (3, 7, 1, 64, 300, 1), (5, 16, 8, 128, 999, 3)):
            q = rand(gen, b, hq, d, dtype=dtype)
            kc, vc = rand(gen, b, hkv, cap, d, dtype=dtype), rand(gen, b, hkv, cap, d, dtype=dtype)
            lens = torch.randint(0, cap, (b,), generator=gen).cuda()
            lens[0] = cap - 1
            n = splits or splits_for(b, hkv, cap, q.device)
            yield ("decode_attention", f"b={b} Hq={hq} Hkv={hkv} D={d} cap={cap} splits={n}", dtype,
                   lambda: ops.decode_attention(q, kc, vc, lens, splits=splits),
                   lambda: layers.decode_attention(q.float(), kc.float(), vc.float(), lens), 2)
        for m, hidden, inter in ((1, 1536, 8960), (64, 3584, 18944), (300, 1536, 8960)):
            x = rand(gen, m, hidden, dtype=dtype)
            gu = rand(gen, 2 * inter, hidden, dtype=dtype, scale=hidden ** -0.5)        # packed gate|up [2F, C]
            yield ("fused_gated_mlp (packed halves)", f"M={m} H={hidden} I={inter}", dtype,
                   lambda: ops.fused_gated_mlp(x, gu[:inter], gu[inter:]),
                   lambda: ref_gated_mlp(x, gu[:inter], gu[inter:]), 2)
            yield ("cuBLAS + silu_mul (packed)", f"M={m} H={hidden} I={inter}", dtype,
                   lambda: ops.silu_mul(x @ gu.t()), lambda: ref_gated_mlp(x, gu[:inter], gu[inter:]), 2)


def compiled_gated_cases():
    """SwiGLU of 1..4 rows through the compiled grouped GEMV (``kernels.dispatch.gated_gemv``: gate and up as two
    matrices, float32 inside, one rounding) and ``fused_gated_mlp`` once the compiled kernels are loaded (the op then
    times both forms per shape and keeps the faster), against ``ref_gated_mlp``. Built here (``ensure_built``)."""
    from rwkv_chat.models import kernels
    from rwkv_chat.models.kernels import dispatch

    kernels.ensure_built("cuda")
    gen = torch.Generator().manual_seed(12)
    for dtype in HALVES:
        for m, hidden, inter in ((1, 896, 4864), (1, 1536, 8960), (2, 1536, 8960), (4, 3584, 18944), (3, 1000, 77)):
            x = rand(gen, m, hidden, dtype=dtype)
            g, u = (rand(gen, inter, hidden, dtype=dtype, scale=hidden ** -0.5) for _ in range(2))
            yield ("gated_gemv (compiled)", f"M={m} H={hidden} I={inter}", dtype, lambda: dispatch.gated_gemv(x, g, u),
                   lambda: ref_gated_mlp(x, g, u), 2)
            yield ("fused_gated_mlp, compiled loaded", f"M={m} H={hidden} I={inter}", dtype,
                   lambda: ops.fused_gated_mlp(x, g, u), lambda: ref_gated_mlp(x, g, u), 2)


def prenorm_cases():
    """``norm_gemv`` on the products of Qwen2 decode steps (1.5B, 7B; 1 and 4 rows; odd sizes) against
    ``norm_gemv_reference`` (float32 inside) on the same inputs."""
    from rwkv_chat.models.ops.prenorm import norm_gemv_reference

    gen = torch.Generator().manual_seed(11)
    for dtype in HALVES:
        for rows, k, n, norm, bias, swiglu in ((1, 1536, 2048, "rms", True, False), (4, 1536, 1536, None, False, False),
                                               (1, 1536, 8960, "rms", False, True), (4, 8960, 1536, None, False, False),
                                               (1, 3584, 4608, "rms", True, False), (3, 18944, 3584, None, False, False),
                                               (2, 3584, 18944, "rms", False, True), (3, 1000, 77, "layer", True, False)):
            x, r = rand(gen, rows, k, dtype=dtype), rand(gen, rows, k, dtype=dtype)
            w = rand(gen, 2 * n if swiglu else n, k, dtype=dtype, scale=k ** -0.5)
            kw = dict(norm=norm, norm_weight=rand(gen, k, dtype=dtype, scale=0.1) + 1 if norm else None,
                      norm_bias=rand(gen, k, dtype=dtype, scale=0.1) if norm == "layer" else None,
                      residual=r if norm else None, bias=rand(gen, n, dtype=dtype) if bias else None, swiglu=swiglu)
            yield ("norm_gemv", f"rows={rows} K={k} N={n} norm={norm} bias={bias} swiglu={swiglu}", dtype,
                   lambda: torch.cat([t.flatten() for t in ops.norm_gemv(x, w, **kw)]),
                   lambda: torch.cat([t.flatten() for t in norm_gemv_reference(x, w, **kw)]), 2)


#: the case groups, in the order they run (``compiled`` last: it loads the compiled kernels)
GROUPS = {"ops": cases, "decode": decode_cases, "prenorm": prenorm_cases, "compiled": compiled_gated_cases}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--groups", nargs="+", choices=sorted(GROUPS), default=list(GROUPS),
                    help="case groups to run (default: all, in this order: %(default)s)")
    args = ap.parse_args()
    rows = [*provenance(), "", "| op | shape | dtype | error / tolerance | result |", "|---|---|---|---|---|"]
    ok = True
    import itertools

    for op, shape, dtype, ours, ref, scale in itertools.chain(*(GROUPS[g]() for g in args.groups)):
        try:
            s = score(ours(), ref(), dtype, scale)
            verdict = "pass" if s <= 1 else "FAIL"
        except Exception as e:  # a crash is a failure of that row, the table goes on
            s, verdict = float("nan"), f"FAIL ({type(e).__name__}: {str(e)[:80]})"
        ok &= verdict == "pass"
        rows.append(f"| {op} | {shape} | {str(dtype).replace('torch.', '')} | {s:.3f} | {verdict} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
