"""Benchmark of the Triton operators of ``rwkv_chat.models.ops`` on a GPU, against torch eager and torch.compile of
the same computation in the same run, with the ceilings measured in that run.

    python bench/ops.py [--out FILE.md] [--quick]

Ceilings: the device-to-device copy bandwidth (``bench/kernels.py``'s ``peak_copy_bw``: best of 512 MiB and
2 GiB moved) and the bf16 ``torch.matmul`` peak (best TFLOP/s of 8192^3 and of each GEMM shape below).
Method: ``bench/kernels.py``'s ``time_ms``: a CUDA graph of back-to-back calls, median of 7 replays, inputs
rotating among sets whose total exceeds 3x L2 so that weights and activations come from device memory.
Bytes = every input read once + every output written once; FLOPs of the gated MLP = 2 GEMMs x 2 M H I.
Peers: "eager" is the unfused torch of Hugging Face's modules in the input dtype (``Qwen2RMSNorm`` then
``apply_rotary_pos_emb``; ``act(x @ gate^T) * (x @ up^T)``), "compile" is ``torch.compile`` of that function;
"cuBLAS+silu_mul" is one cuBLAS GEMM on the concatenated [gate; up] weight followed by our ``silu_mul``.
Also reported (no mark): the model's forms ``rmsnorm`` with a residual and ``rope`` of q and k (GQA 7:1), and the
decode step's ``decode_attention`` (each row at the full length) against its torch form, the masked SDPA it replaces
(in the "eager" column). ``--prenorm [--sweep]``: only ``norm_gemv`` on the products of a Qwen2 decode step (1.5B and
7B; 1 and 4 rows) against the torch composition and the model's path before it (see ``prenorm_rows``).
Pass marks: fused_rmsnorm_rope >= 80% of copy bandwidth at 8192 tokens (64 tokens, a decode batch, is only
reported); fused_gated_mlp >= 60% of the matmul peak at M=8192 and >= 75% of copy bandwidth at M=1 (Qwen2 7B:
H=3584, I=18944; 1.5B: H=1536, I=8960). Exit status 2 when a mark is missed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.kernels import peak_copy_bw, sets_for, time_ms  # noqa: E402
from rwkv_chat.app.bench import provenance  # noqa: E402
from rwkv_chat.models import ops  # noqa: E402
from rwkv_chat.models.qwen2.layers import decode_attention as decode_attention_torch  # noqa: E402

DT = torch.bfloat16
GEMM_SHAPES = ((8192, 3584, 18944), (1, 3584, 18944), (64, 3584, 18944),
               (8192, 1536, 8960), (1, 1536, 8960), (64, 1536, 8960))
NORM_SHAPES = ((8192, 28, 128), (8192, 12, 128), (64, 28, 128))   # tokens, heads, head_dim (q of 7B, 1.5B; decode)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]), dim=-1)


def eager_rmsnorm_rope(x, w, cos, sin, eps, heads):
    """Hugging Face Qwen2RMSNorm then apply_rotary_pos_emb, in x's dtype (the unfused peer)."""
    xf = x.float()
    n = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    n = n.view(*n.shape[:-1], heads, -1)
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return (n * c + rotate_half(n) * s).view(x.shape)


def eager_add_rmsnorm(x, r, w, eps):
    """Hugging Face's residual add then Qwen2RMSNorm, in x's dtype."""
    h = x + r
    hf = h.float()
    return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), h


def eager_rope(q, k, cos, sin):
    """Hugging Face's apply_rotary_pos_emb on [B, T, H, D] (unsqueeze_dim=2), in q's dtype."""
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def eager_gated(x, g, u):
    return F.silu(x @ g.T) * (x @ u.T)


def matmul_peak(shapes) -> float:
    """Best bf16 torch.matmul TFLOP/s over 8192^3 and the given (M, K, N) shapes."""
    best = 0.0
    for m, k, n in ((8192, 8192, 8192), *shapes):
        a = torch.randn(m, k, device="cuda", dtype=DT)
        b = torch.randn(k, n, device="cuda", dtype=DT)
        c = torch.empty(m, n, device="cuda", dtype=DT)
        ms = time_ms(lambda i: torch.matmul(a, b, out=c), 1, iters=10)
        best = max(best, 2 * m * k * n / ms / 1e9)
    return best


def timed(fn, sets) -> float | str:
    """ms per call of fn(*sets[i]) (see time_ms), or the error's type name when it cannot be timed."""
    try:
        return time_ms(lambda i: fn(*sets[i]), len(sets), iters=20)
    except Exception as e:  # a peer that fails (e.g. compile) is reported, the table goes on
        return type(e).__name__


def row(name, shape, ms_ours, peers, work, unit, ceiling, mark):
    """A Markdown row: ours, each peer's time and our speed-up over it, % of the ceiling and the pass mark.
    work: bytes (unit "GB/s") or FLOPs (unit "TFLOP/s"); ceiling in the same unit."""
    per_ms = {"GB/s": 1e6, "TFLOP/s": 1e9}[unit]
    rate = work / ms_ours / per_ms if isinstance(ms_ours, float) else float("nan")
    pct = 100 * rate / ceiling
    cells = [name, shape, f"{ms_ours * 1e3:.1f}" if isinstance(ms_ours, float) else ms_ours, f"{rate:.1f} {unit}",
             f"{pct:.0f}%"]
    for ms in peers:
        cells.append(f"{ms * 1e3:.1f} ({ms / ms_ours:.2f}x)" if isinstance(ms, float) and isinstance(ms_ours, float)
                     else str(ms))
    verdict = "" if mark is None else ("pass" if pct >= mark else "FAIL") + f" (>= {mark}%)"
    return "| " + " | ".join(cells + [verdict]) + " |", (mark is None or pct >= mark)


def eager_prenorm(x, r, ln, w, b, swiglu):
    h = x + r
    hf = h.float()
    hn = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * ln
    if swiglu:
        y = hn @ w.t()
        f = y.shape[-1] // 2
        return F.silu(y[..., :f]) * y[..., f:], h
    return F.linear(hn, w, b), h


def model_path_before(x, r, ln, w, b, swiglu):
    """The Qwen2 decode step's products before ``norm_gemv``: Triton residual add + RMSNorm, then cuBLAS (with the
    bias in its epilogue) or, for SwiGLU, ``fused_gated_mlp``."""
    hn, h = ops.rmsnorm(x, ln, 1e-6, r)
    if swiglu:
        f = w.shape[0] // 2
        return ops.fused_gated_mlp(hn, w[:f], w[f:]), h
    return (torch.addmm(b, hn, w.t()) if b is not None else hn @ w.t()), h


def prenorm_rows(shapes, bw, sweep) -> list[str]:
    """``norm_gemv`` on a decode step's products (residual add + RMSNorm inside the q|k|v GEMV with its bias and inside
    the gate|up GEMV with SwiGLU; o and down plain) at 1 and 4 rows, against the torch composition (eager, compile)
    and the model's path before it (column "cuBLAS+silu_mul": ``ops.rmsnorm`` + cuBLAS / ``fused_gated_mlp``).
    With ``sweep``: every (BLOCK_N, BLOCK_K, warps) within the register budget, and the best, after each row."""
    from rwkv_chat.models.ops.prenorm import pick_blocks

    lines = []
    compiled = torch.compile(eager_prenorm)
    for model, name, rows, k, n, norm, bias, swiglu in shapes:
        n_w = 2 * n if swiglu else n
        nbytes = (n_w * k + 3 * rows * k + rows * n) * 2
        sets = []
        for _ in range(sets_for(nbytes)):
            sets.append((torch.randn(rows, k, device="cuda", dtype=DT), torch.randn(rows, k, device="cuda", dtype=DT),
                         torch.rand(k, device="cuda", dtype=DT) + 0.5,
                         torch.randn(n_w, k, device="cuda", dtype=DT) * k ** -0.5,
                         torch.randn(n, device="cuda", dtype=DT) if bias else None))

        def ours(x, r, ln, w, b, blocks=None):
            if norm:
                return ops.norm_gemv(x, w, norm="rms", norm_weight=ln, residual=r, bias=b, swiglu=swiglu,
                                     blocks=blocks)
            return ops.norm_gemv(x, w, bias=b, blocks=blocks)

        def peer(fn):
            if norm:
                return lambda x, r, ln, w, b: fn(x, r, ln, w, b, swiglu)
            return lambda x, r, ln, w, b: F.linear(x, w, b)

        t = timed(ours, sets)
        cells = [timed(peer(eager_prenorm), sets), timed(peer(compiled), sets), timed(peer(model_path_before), sets)]
        blocks = pick_blocks(rows, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
        line, _ = row("norm_gemv", f"{model} {name} rows={rows} K={k} N={n} blocks={blocks}", t, cells, nbytes, "GB/s",
                      bw, None)
        lines.append(line)
        print(line, flush=True)
        if sweep:
            r_pad = 1 << (rows - 1).bit_length()
            found = {}
            for bn in (1, 2, 4, 8, 16, 32):
                for bk in (64, 128, 256, 512, 1024):
                    for warps in (4, 8):
                        if r_pad * bn * bk <= 2048 * warps and bk <= 2 * k:
                            found[(bn, bk, warps)] = timed(lambda *a, bl=(bn, bk, warps): ours(*a, blocks=bl), sets)
            good = {b: ms for b, ms in found.items() if isinstance(ms, float)}
            best = min(good, key=good.get) if good else None
            text = ", ".join(f"{b}: {ms * 1e3:.1f}" for b, ms in sorted(good.items()))
            line = f"| sweep | {model} {name} rows={rows} | best {best}: {good[best] * 1e3:.1f} us | {text} |" \
                if best else f"| sweep | {model} {name} rows={rows} | none ran |"
            lines.append(line)
            print(line, flush=True)
    return lines


#: (model, product, rows, K, N, with RMSNorm + residual, bias, SwiGLU) of Qwen2 decode steps (N: outputs; SwiGLU F)
PRENORM_SHAPES = [(m, name, rows, k, n, norm, bias, sw) for rows in (1, 4)
                  for m, shapes in (("1.5B", (("qkv", 1536, 2048, True, True, False), ("o", 1536, 1536, False, False, False),
                                              ("gate_up", 1536, 8960, True, False, True),
                                              ("down", 8960, 1536, False, False, False))),
                                    ("7B", (("qkv", 3584, 4608, True, True, False), ("o", 3584, 3584, False, False, False),
                                            ("gate_up", 3584, 18944, True, False, True),
                                            ("down", 18944, 3584, False, False, False))))
                  for name, k, n, norm, bias, sw in shapes]


def load_compiled() -> str:
    """Build / load the compiled kernels (``models.kernels``) so that the ops may take them: "loaded" or why not."""
    from rwkv_chat.models import kernels
    try:
        kernels.ensure_built("cuda")
    except Exception as e:  # the Triton forms still serve; the header says why
        return f"not loaded ({type(e).__name__}: {str(e)[:80]})"
    return "loaded" if kernels.available("cuda", "v7fused") else "not loaded"


def served_by(m: int, h: int, i: int) -> str:
    """" (compiled)" where fused_gated_mlp of these rows chose the compiled grouped GEMV, else ""."""
    from rwkv_chat.models.ops import gated_mlp
    chosen = gated_mlp.compiled_chosen(torch.device("cuda", torch.cuda.current_device()), DT, m, i, h)
    return " (compiled)" if chosen else ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="only the 1.5B GEMM shapes and the first norm shape")
    ap.add_argument("--prenorm", action="store_true", help="only the norm_gemv rows (decode products of Qwen2)")
    ap.add_argument("--sweep", action="store_true", help="with --prenorm: every block shape of norm_gemv")
    args = ap.parse_args()
    if args.prenorm:
        bw, bw_label = peak_copy_bw()
        md = [*provenance(), "", f"Copy bandwidth {bw:.0f} GB/s ({bw_label}). Times in us per call (CUDA graph); a "
              "peer's cell: its time (our speed-up over it); the last peer is the model's path before norm_gemv "
              "(ops.rmsnorm + cuBLAS, or + fused_gated_mlp).", "",
              "| op | shape (bf16) | ours us | ours | % of ceiling | eager us | compile us | rmsnorm+cuBLAS us | mark |",
              "|---|---|---|---|---|---|---|---|---|"]
        md += prenorm_rows(PRENORM_SHAPES, bw, args.sweep)
        text = "\n".join(md)
        print("\n" + text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    compiled = load_compiled()
    gemms = [s for s in GEMM_SHAPES if s[1] == 1536] if args.quick else list(GEMM_SHAPES)
    norms = NORM_SHAPES[:1] if args.quick else NORM_SHAPES
    bw, bw_label = peak_copy_bw()
    peak = matmul_peak([(m, h, 2 * i) for m, h, i in gemms if m >= 4096])
    md = [*provenance(), "", f"Copy bandwidth {bw:.0f} GB/s ({bw_label}); bf16 matmul peak {peak:.0f} TFLOP/s. "
          "Times in us per call (CUDA graph); a peer's cell: its time (our speed-up over it). Compiled kernels: "
          f"{compiled} (SwiGLU of 1..4 rows takes the compiled grouped GEMV where the op measured it faster: "
          "\"compiled\" after the shape).", "",
          "| op | shape (bf16) | ours us | ours | % of ceiling | eager us | compile us | cuBLAS+silu_mul us | mark |",
          "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(md), flush=True)
    ok = True
    compiled_norm = torch.compile(eager_rmsnorm_rope)
    for tokens, heads, d in norms:
        hidden = heads * d
        nbytes = 2 * tokens * hidden * 2 + hidden * 2 + 2 * tokens * d * 2
        sets = []
        for _ in range(sets_for(nbytes)):
            cos, sin = torch.randn(2, tokens, d, device="cuda", dtype=DT)
            sets.append((torch.randn(1, tokens, hidden, device="cuda", dtype=DT),
                         torch.randn(hidden, device="cuda", dtype=DT), cos, sin))
        ours = timed(lambda x, w, c, s: ops.fused_rmsnorm_rope(x, w, c, s, 1e-6), sets)
        eager = timed(lambda x, w, c, s: eager_rmsnorm_rope(x, w, c, s, 1e-6, heads), sets)
        comp = timed(lambda x, w, c, s: compiled_norm(x, w, c, s, 1e-6, heads), sets)
        line, good = row("fused_rmsnorm_rope", f"T={tokens} {heads}x{d}", ours, [eager, comp, "-"], nbytes,
                         "GB/s", bw, 80 if tokens >= 4096 else None)
        md.append(line)
        ok &= good
        print(line, flush=True)
    for tokens, heads, d in norms:     # the model's forms: residual add + RMSNorm; RoPE of q and k (GQA 7:1)
        hidden, kv = heads * d, max(1, heads // 7) * d
        nbytes = 4 * tokens * hidden * 2 + hidden * 2
        sets = [(torch.randn(tokens, hidden, device="cuda", dtype=DT), torch.randn(tokens, hidden, device="cuda", dtype=DT),
                 torch.randn(hidden, device="cuda", dtype=DT)) for _ in range(sets_for(nbytes))]
        compiled = torch.compile(eager_add_rmsnorm)
        cells = [timed(lambda x, r, w: ops.rmsnorm(x, w, 1e-6, r), sets),
                 timed(lambda x, r, w: eager_add_rmsnorm(x, r, w, 1e-6), sets),
                 timed(lambda x, r, w: compiled(x, r, w, 1e-6), sets)]
        line, _ = row("rmsnorm (+residual)", f"T={tokens} H={hidden}", cells[0], [*cells[1:], "-"], nbytes, "GB/s", bw,
                      None)
        md.append(line)
        print(line, flush=True)
        nbytes = 2 * tokens * (hidden + 2 * kv) * 2 + 2 * tokens * d * 2
        sets = []
        for _ in range(sets_for(nbytes)):
            qkv = torch.randn(1, tokens, hidden + 2 * kv, device="cuda", dtype=DT)
            cos, sin = torch.randn(2, tokens, d, device="cuda", dtype=DT)
            sets.append((qkv[..., :hidden].view(1, tokens, heads, d),
                         qkv[..., hidden:hidden + kv].view(1, tokens, kv // d, d), cos, sin))
        compiled = torch.compile(eager_rope)
        cells = [timed(fn, sets) for fn in (ops.rope, eager_rope, compiled)]
        line, _ = row("rope q,k", f"T={tokens} Hq={heads} Hkv={kv // d} D={d}", cells[0], [*cells[1:], "-"], nbytes,
                      "GB/s", bw, None)
        md.append(line)
        print(line, flush=True)
    compiled_gated = torch.compile(eager_gated)
    for m, h, i in gemms:
        nbytes = (2 * i * h + m * h + m * i) * 2
        sets = []
        for _ in range(sets_for(nbytes)):
            g, u = torch.randn(2, i, h, device="cuda", dtype=DT) * h ** -0.5
            sets.append((torch.randn(m, h, device="cuda", dtype=DT), g, u, torch.cat([g, u])))
        ours = timed(lambda x, g, u, gu: ops.fused_gated_mlp(x, g, u), sets)
        eager = timed(lambda x, g, u, gu: eager_gated(x, g, u), sets)
        comp = timed(lambda x, g, u, gu: compiled_gated(x, g, u), sets)
        cublas = timed(lambda x, g, u, gu: ops.silu_mul(x @ gu.T), sets)
        if m >= 4096:
            line, good = row("fused_gated_mlp", f"M={m} H={h} I={i}", ours, [eager, comp, cublas], 4 * m * h * i,
                             "TFLOP/s", peak, 60)
        else:
            line, good = row("fused_gated_mlp", f"M={m} H={h} I={i}{served_by(m, h, i)}", ours, [eager, comp, cublas],
                             nbytes, "GB/s", bw, 75 if m == 1 else None)
        md.append(line)
        ok &= good
        print(line, flush=True)
    for b, hq, hkv, d, length in ((1, 12, 2, 128, 1024), (1, 12, 2, 128, 8192), (1, 28, 4, 128, 8192),
                                  (1, 28, 4, 128, 32768), (16, 28, 4, 128, 2048)):
        nbytes = 2 * b * hkv * length * d * 2 + 2 * b * hq * d * 2       # keys and values up to each length, q, out
        sets = []
        for _ in range(sets_for(nbytes)):
            kc, vc = torch.randn(2, b, hkv, length, d, device="cuda", dtype=DT)
            sets.append((torch.randn(b, hq, d, device="cuda", dtype=DT), kc, vc,
                         torch.full((b,), length - 1, device="cuda", dtype=torch.long)))
        cells = [timed(ops.decode_attention, sets), timed(decode_attention_torch, sets)]
        line, _ = row("decode_attention", f"b={b} Hq={hq} Hkv={hkv} len={length}", cells[0], [cells[1], "-", "-"],
                      nbytes, "GB/s", bw, None)
        md.append(line)
        print(line, flush=True)
    text = "\n".join(md)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
