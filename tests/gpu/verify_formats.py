"""The weight formats on a GPU: each format's CUDA product against the torch reference, the fused LayerNorm + int4
q/k/v op against its torch reference, and the logits of a random RWKV-7 0.1B in fp16 against fp16i8 / fp16i4 /
fp16f8 (run on a GPU machine; prints a Markdown table, exits 1 when a check fails).

    python tests/gpu/verify_formats.py [--shape 0.1B] [--out results.md]

Products: x [M, K] for M in 1, 4, 8 (the GEMVs), 16, 64 (GEMM paths), fp16 and bf16, shapes with odd sizes;
``kernels.mm4`` / ``kernels.mmf8`` vs ``x @ q.dequantize()`` in float64 (relative error bound 1e-2 for fp16
activations: the products round once per output). f8 needs compute capability >= 8.9 (skipped below).
Logits: 64 tokens, full output, relative error and top-1 agreement against ``cuda fp16``, the compiled
products (``kernels=True``) against the torch products of the same format (``kernels=False``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.models import RWKV, kernels  # noqa: E402
from rwkv_chat.models.formats import f8, i4, i8  # noqa: E402
from rwkv_chat.models.rwkv import shapes  # noqa: E402
from tests.gpu.report import finish  # noqa: E402

SHAPES = [(4096, 4096), (2048, 8192), (768, 65536), (1000, 776), (64, 40)]
ROWS = [1, 4, 8, 16, 64]


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def products(fp8_ok: bool) -> list[tuple]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for K, N in SHAPES:
        w = torch.randn(K, N, device="cuda", generator=g) / K ** 0.5
        q4 = i4.quantize_i4(w)        # the GPTQ layout (Triton); held output-major once placed (gemvq, Triton)
        packed = {"i4": q4, "i4 output-major": q4.to("cuda"), "i8": i8.quantize_i8(w, torch.float16)}
        if fp8_ok:
            packed["f8"] = f8.quantize_f8(w)
        for name, q in packed.items():
            fn = {"i4": kernels.mm4, "i4 output-major": kernels.mm4, "i8": kernels.mm8, "f8": kernels.mmf8}[name]
            for dt in (torch.float16, torch.bfloat16):
                if name == "i8" and dt == torch.bfloat16:
                    continue
                ref_w = q.dequantize(torch.float64) if name != "i8" else q.dequantize(torch.float64)
                for M in ROWS:
                    x = torch.randn(M, K, device="cuda", generator=g).to(dt)
                    xr = x.double()
                    if name == "f8" and M > 8 and K % 16 == 0 and N % 16 == 0:
                        # the tensor-core path quantizes activations per token (e4m3); other shapes: the emulation
                        s = (x.float().abs().amax(-1, keepdim=True) / 448).clamp(min=1e-30)
                        xr = (x.float() / s).to(torch.float8_e4m3fn).double() * s.double()
                    err = rel(fn(x, q), xr @ ref_w)
                    rows.append((name, f"{K}x{N}", str(dt).replace("torch.", ""), M, err, err < 1e-2))
    for K, N in [(4096, 4096), (2048, 8192)]:       # an RWKV-7 layer's r, k, v stacked: one launch for the three
        qs = i4.stack_i4([i4.quantize_i4(torch.randn(K, N, device="cuda", generator=g) / K ** 0.5).to("cuda")
                          for _ in range(3)])
        for dt in (torch.float16, torch.bfloat16):
            for M in (8, 64, 200):
                x = torch.randn(3, M, K, device="cuda", generator=g).to(dt)
                y = kernels.dispatch.mm4_stack(x, qs)
                err = float("inf") if y is None else max(rel(y[i], x[i].double() @ qs[i].dequantize(torch.float64))
                                                         for i in range(3))
                rows.append(("i4 stack of 3", f"{K}x{N}", str(dt).replace("torch.", ""), M, err, err < 1e-2))
    return rows


def fused_op() -> list[tuple]:
    from rwkv_chat.models.ops import fused_ln_qkv_gptq
    from rwkv_chat.models.ops.gptq import fused_ln_qkv_gptq_reference

    out = []
    cases = [(4096, None, False, 1, 1, False, False), (4096, None, False, 2, 7, False, False),
             (3584, (3584, 512, 512), True, 1, 1, False, False), (1024, None, True, 3, 5, True, False),
             (4096, None, False, 2, 7, False, True), (4096, None, False, 1, 1, False, True),
             (3584, (3584, 512, 512), True, 4, 1, False, True), (1024, None, False, 1, 3, True, False)]
    for H, widths, rms, B, S, act, om in cases:
        N = 3 * H if widths is None else sum(widths)
        q = i4.quantize_i4(torch.randn(H, N, device="cuda") * 0.02).with_layout(om)   # om: qweight strided
        g_idx = None
        if act:
            g_idx = (torch.randperm(H, device="cuda") // q.group_size).to(torch.int32)
        x = torch.randn(B, S, H, device="cuda", dtype=torch.float16)
        lw = torch.rand(H, device="cuda", dtype=torch.float16) + 0.5
        lb = None if rms else torch.randn(H, device="cuda", dtype=torch.float16)
        args = (x, q.qweight, q.qzeros, q.scales, lw, lb, q.group_size, 1e-6)
        kw = dict(widths=widths, rms=rms, g_idx=g_idx)
        got, want = fused_ln_qkv_gptq(*args, **kw), fused_ln_qkv_gptq_reference(*args, **kw)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        err = max(rel(a, b) for a, b in zip(got, want))
        out.append((f"H={H} widths={widths or 'equal'} rms={rms} B={B} S={S} g_idx={act}"
                    f"{' output-major' if om else ''}", err, err < 1e-2))
    return out


def fp8_rows_exact() -> tuple:
    """The per-token quantization kernel against torch's cast (round to nearest even): equal codes and scales."""
    from rwkv_chat.models.ops.gemv import fp8_rows

    x = torch.randn(64, 4096, device="cuda", dtype=torch.float16) * 7
    q, s = fp8_rows(x)
    ref = x.float().abs().amax(-1, keepdim=True) / 448
    want = (x.float() / ref).clamp(-448, 448).to(torch.float8_e4m3fn)
    same = (q.float() == want.float()).float().mean().item()
    # a code may differ by one step where the kernel's fp32 division rounds across a tie of torch's cast
    return same, rel(s, ref), same >= 0.9999 and rel(s, ref) < 1e-6


def _one_by_one(model, tokens: list[int]) -> torch.Tensor:
    """float32 [T, vocab]: the logits after each token, fed one at a time (decode steps)."""
    out, state = [], None
    for t in tokens:
        lo, state = model.forward([t], state)
        out.append(lo.float())
    return torch.stack(out)


def logits(shape: str, fp8_ok: bool) -> list[tuple]:
    """Per format: logits against fp16's, top-1 agreement, and the compiled path against the torch path of the same
    format: the whole sequence in one forward, except f8, fed token by token (its sequence path quantizes the
    activations per token for the fp8 tensor cores, by design, which the torch emulation does not)."""
    ckpt = shapes.random_checkpoint(shape, dtype=torch.float16, device="cuda")
    tokens = [(i * 7919) % 65536 for i in range(64)]
    base = RWKV(ckpt, "cuda fp16").forward(tokens, None, full_output=True)[0].float()
    rows = []
    for fmt in ("i8", "i4") + (("f8",) if fp8_ok else ()):
        comp_model = RWKV(ckpt, f"cuda fp16{fmt}")
        torch_model = RWKV(ckpt, f"cuda fp16{fmt}", kernels=False)
        if fmt == "f8":
            comp, torch_ = _one_by_one(comp_model, tokens), _one_by_one(torch_model, tokens)
        else:
            comp = comp_model.forward(tokens, None, full_output=True)[0].float()
            torch_ = torch_model.forward(tokens, None, full_output=True)[0].float()
        agree = (comp.argmax(-1) == base.argmax(-1)).float().mean().item()
        rows.append((fmt, rel(comp, base), agree, rel(comp, torch_), rel(comp, torch_) < 2e-2))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.1B")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("verify_formats.py needs a CUDA GPU", file=sys.stderr)
        return 2
    kernels.ensure_built("cuda")
    fp8_ok = torch.cuda.get_device_capability() >= f8.MIN_CAPABILITY
    lines = [f"# Weight formats on {torch.cuda.get_device_name()}", "", "| format | K×N | x dtype | rows | rel err | ok |",
             "|---|---|---|---:|---:|---|"]
    ok = True
    for name, shape, dt, M, err, good in products(fp8_ok):
        lines.append(f"| {name} | {shape} | {dt} | {M} | {err:.2e} | {'yes' if good else 'NO'} |")
        ok &= good
    lines += ["", "| fused_ln_qkv_gptq case | rel err vs torch | ok |", "|---|---:|---|"]
    for case, err, good in fused_op():
        lines.append(f"| {case} | {err:.2e} | {'yes' if good else 'NO'} |")
        ok &= good
    if fp8_ok:
        same, serr, good = fp8_rows_exact()
        lines += ["", f"fp8 per-token quantization: {same:.2%} of codes equal torch's cast, scale error {serr:.1e} "
                      f"({'ok' if good else 'NO'})"]
        ok &= good
    lines += ["", f"| {args.shape} cuda fp16 vs | logits rel err | top-1 agreement | compiled vs torch | ok |",
              "|---|---:|---:|---:|---|"]
    for fmt, err, agree, kt, good in logits(args.shape, fp8_ok):
        lines.append(f"| fp16{fmt} | {err:.3e} | {agree:.3f} | {kt:.2e} | {'yes' if good else 'NO'} |")
        ok &= good
    if fp8_ok:
        lines.append("\ncompiled vs torch: f8 compared token by token (decode steps); its sequence path quantizes "
                     "activations per token for the fp8 tensor cores, which the torch emulation does not")
    else:
        lines.append("\nf8 skipped: compute capability below 8.9")
    return finish(lines, args.out, ok)


if __name__ == "__main__":
    sys.exit(main())
