"""Every Triton kernel of ``rwkv_chat.models.ops`` compiled for an NVIDIA GPU on a machine without one: the ops are
called through their Python wrappers on CPU tensors (the shapes of the models' decode steps and prefills, so each
specialization the wrappers make is built), and Triton's own compiler lowers each launch to PTX and, with its bundled
``ptxas``, to a cubin for the target (default sm_90: H100 / H200) instead of launching it. Where Triton's
``ptxas-blackwell`` is there, ``ptxas -v`` on the PTX reports each kernel's registers and spills.

    pip install triton && python tests/gpu/compile_triton.py [--arch 90] [--quick] [--out FILE.md]

The interpreter scripts (``interpret_*.py``) check what the kernels compute; this checks that the real code
generation accepts them (types, layouts, shapes the interpreter does not check). The autotuned gated-MLP kernel is
compiled once per config. Prints one row per compiled kernel; exit status 1 when a launch fails to compile.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import jit  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

COMPILED: list[tuple[str, str, object]] = []


class CompileOnly:
    """A stand-in for the CUDA driver: device 0, stream 0 and the chosen target; no launches."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("compile only: nothing is timed")


def install(arch: int, case: list) -> None:
    """Compile instead of launching; make the ops' CUDA checks and device queries accept CPU tensors."""
    driver.set_active(CompileOnly(arch))
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kw):
        kernel = run(self, *args, grid=grid, warmup=True, **kw)
        COMPILED.append((case[0], self.fn.__name__, kernel))
        return kernel

    jit.JITFunction.run = compile_only
    from rwkv_chat.models.ops import _checks, _triton, decode, gemv, gptq, prenorm, sparse_ffn

    _checks.check_cuda = lambda tensors: None
    _triton.kernels = lambda module, op: importlib.import_module(module)
    for mod in (gemv, gptq, prenorm, sparse_ffn):
        if hasattr(mod, "check_cuda"):
            mod.check_cuda = _checks.check_cuda
        if hasattr(mod, "triton_kernels"):
            mod.triton_kernels = _triton.kernels
    for mod in (decode, gemv, prenorm):
        mod._sms = lambda device: 132
    gptq._sms = lambda device: 132
    torch.cuda.is_current_stream_capturing = lambda: False


def cases(quick: bool = False):
    """(name, thunk) for every op and the specializations the models use (``quick``: two gated-MLP configs)."""
    from rwkv_chat.models import ops
    from rwkv_chat.models.formats import f8, i4, i8
    from rwkv_chat.models.ops import _gated_mlp_kernels as gk, gemv, gptq, sparse_ffn
    from rwkv_chat.models.qwen2 import layers

    bf, hf = torch.bfloat16, torch.float16

    def r(*shape, dt=bf):
        return torch.randn(*shape).to(dt)

    for dt in (bf, hf):
        yield f"rmsnorm {dt}", lambda dt=dt: ops.rmsnorm(r(4, 1536, dt=dt), r(1536, dt=dt), 1e-6, r(4, 1536, dt=dt))
        cos, sin = (t.to(dt) for t in layers.rope_table(1e6, 128, 16))
        yield f"rope {dt}", lambda dt=dt, c=cos, s=sin: ops.rope(r(1, 16, 12, 128, dt=dt), r(1, 16, 2, 128, dt=dt), c, s)
        yield f"qk_norm_rope {dt}", lambda dt=dt, c=cos, s=sin: ops.qk_norm_rope(
            r(1, 16, 16, 128, dt=dt), r(1, 16, 8, 128, dt=dt), r(128, dt=dt), r(128, dt=dt), c, s, 1e-6)
        yield f"fused_rmsnorm_rope {dt}", lambda dt=dt, c=cos, s=sin: ops.fused_rmsnorm_rope(
            r(1, 16, 12 * 128, dt=dt), r(12 * 128, dt=dt), c, s, 1e-6)
        yield f"silu_mul {dt}", lambda dt=dt: ops.silu_mul(r(4, 2 * 8960, dt=dt))
    for cfg in ([gk.SMALL_CONFIGS[-1], gk.GEMV_CONFIGS[-1], gk.LARGE_CONFIGS[0]] if quick
                else gk.SMALL_CONFIGS + gk.GEMV_CONFIGS + gk.LARGE_CONFIGS):
        meta = dict(cfg.kwargs)

        def gated(meta=meta, cfg=cfg):
            x, g, u = r(16, 1536), r(8960, 1536), r(8960, 1536)
            o = torch.empty(16, 8960, dtype=bf)
            gk.gated_mlp_kernel[(1,)](x, g, u, o, 16, 8960, 1536, 16, x.stride(0), g.stride(0), o.stride(0), ACT=0,
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages, **meta)
        yield f"fused_gated_mlp config {meta} w{cfg.num_warps} s{cfg.num_stages}", gated
    for b, cap, norm in ((1, 256, False), (1, 8192, False), (4, 4096, True)):
        H, K, D = (16, 8, 128) if norm else (12, 2, 128)
        cos, sin = (t.to(bf) for t in layers.rope_table(1e6, D, cap + 1))
        w = (r(D), r(D)) if norm else (None, None)

        def store(b=b, cap=cap, H=H, K=K, D=D, c=cos, s=sin, w=w):
            kc, vc = torch.zeros(2, b, K, cap, D, dtype=bf)
            lens = torch.zeros(b, dtype=torch.long)
            qkv = r(b, (H + 2 * K) * D)
            q = ops.rope_store(qkv, c, s, lens, kc, vc, H, *w)
            ops.decode_attention(q, kc, vc, lens)
            ops.rope_attention(qkv, c, s, lens, kc, vc, H, *w)
        yield f"rope_store / decode_attention / rope_attention b={b} cap={cap} norm={norm}", store
    for rows in (1, 2, 4):
        for k, n, norm, bias, swiglu in ((1536, 2048, "rms", True, False), (1536, 1536, None, False, False),
                                         (1536, 8960, "rms", False, True), (8960, 1536, None, False, False),
                                         (3584, 18944, "rms", False, True), (1000, 77, "layer", True, False)):
            yield f"norm_gemv rows={rows} K={k} N={n} {norm} bias={bias} swiglu={swiglu}", \
                lambda rows=rows, k=k, n=n, norm=norm, bias=bias, swiglu=swiglu: ops.norm_gemv(
                    r(rows, k), r(2 * n if swiglu else n, k), norm=norm, norm_weight=r(k) if norm else None,
                    norm_bias=r(k) if norm == "layer" else None, residual=r(rows, k) if norm else None,
                    bias=r(n) if bias else None, swiglu=swiglu)
    for H, B, S, om, act in ((4096, 1, 1, False, False), (4096, 1, 1, True, False), (4096, 4, 1, False, False),
                             (4096, 2, 7, False, False), (1024, 1, 3, False, True)):
        q = i4.quantize_i4(torch.randn(H, 3 * H) * 0.02).with_layout(om)
        g_idx = (torch.randperm(H) // q.group_size).to(torch.int32) if act else None
        yield f"fused_ln_qkv_gptq H={H} B={B} S={S} output_major={om} g_idx={act}", \
            lambda H=H, B=B, S=S, q=q, g_idx=g_idx: ops.fused_ln_qkv_gptq(
                r(B, S, H, dt=hf), q.qweight, q.qzeros, q.scales, r(H, dt=hf), r(H, dt=hf), q.group_size, 1e-5,
                g_idx=g_idx)
    for C, rows, has_dx in ((2048, 1, True), (4096, 4, False)):
        qs = [i4.quantize_i4(torch.randn(C, C) * 0.02).with_layout(True) for _ in range(3)]
        yield f"fused_v7_mix_rkv_i4 C={C} rows={rows} dx={has_dx}", lambda C=C, rows=rows, d=has_dx, qs=qs: \
            gptq.fused_v7_mix_rkv_i4(r(rows, C, dt=hf), r(rows, C, dt=hf) if d else None, r(C, dt=hf), r(C, dt=hf),
                                     r(rows, C, dt=hf), r(6, C, dt=hf), qs)
    for M, K, N in ((1, 4096, 4096), (4, 2048, 8192), (64, 4096, 4096), (64, 4096, 8192)):
        q = i4.quantize_i4(torch.randn(K, N) * 0.02).with_layout(True)
        yield f"i4_gemv M={M} K={K} N={N}", lambda M=M, K=K, q=q: gemv.i4_gemv(r(M, K, dt=hf), q)
        if M == 64:
            qs = i4.stack_i4([q, q, q])
            yield f"i4_gemv_stack G=3 M={M} K={K} N={N}", \
                lambda M=M, K=K, qs=qs: gemv.i4_gemv_stack(r(3, M, K, dt=hf), qs)
        if M > 1:
            yield f"i4_gemv M={M} K={K} N={N} bf16", lambda M=M, K=K, q=q: gemv.i4_gemv(r(M, K, dt=bf), q)
            q8 = i8.quantize_i8(torch.randn(K, N) * 0.02, hf, output_major=True)
            for dt in (hf, bf):
                yield f"i8_gemm M={M} K={K} N={N} {dt}", lambda M=M, K=K, q8=q8, dt=dt: gemv.i8_gemm(r(M, K, dt=dt), q8)
        w8 = f8.quantize_f8(torch.randn(K, N) * 0.02)
        if M <= gemv.GEMV_ROWS:
            yield f"f8_gemv M={M} K={K} N={N}", lambda M=M, K=K, w8=w8: gemv.f8_gemv(r(M, K, dt=hf), w8)
    yield "fp8_rows", lambda: gemv.fp8_rows(r(16, 2048))
    for rows in (1, 4):
        yield f"ffn_value rows={rows}", lambda rows=rows: sparse_ffn.ffn_value(
            torch.relu(r(rows, 8192, dt=hf)) ** 2, r(8192, 2048, dt=hf))
    from rwkv_chat.models.ops import wkv5_chunk
    for per_token, N, dt in ((True, 64, hf), (False, 64, bf), (True, 128, torch.float32), (True, 32, hf)):
        B, T, H = 1, 40, 2
        w = torch.rand(B, T, H, N) if per_token else torch.rand(H, N)
        for par in (False, True):
            yield (f"wkv5_chunk {'v6' if per_token else 'v5'} N={N} {dt} {'three launches' if par else 'one launch'}",
                   lambda B=B, T=T, H=H, N=N, dt=dt, w=w, par=par:
                   wkv5_chunk.wkv5_chunk(*(r(B, T, H, N, dt=dt) for _ in range(3)), w, torch.randn(H, N),
                                         torch.randn(B, H, N, N), parallel=par))
    from rwkv_chat.models.ops import wkv7_chunk
    for L, dt, prec in ((32, hf, "tf32x3"), (16, bf, "tf32x3"), (32, hf, "mixed"), (32, torch.float32, "ieee")):
        B, T, H, N = 1, 70, 2, 64
        yield (f"wkv7_chunk L={L} {dt} {prec}",
               lambda B=B, T=T, H=H, N=N, L=L, dt=dt, prec=prec:
               wkv7_chunk.wkv7_chunk(r(B, T, H, N, dt=dt), torch.rand(B, T, H, N) * 0.4 + 0.55,
                                     *(r(B, T, H, N, dt=dt) for _ in range(4)), torch.randn(B, H, N, N),
                                     chunk=L, precision=prec))


def ptxas_info(ptx: str, arch: int) -> str:
    """'N registers, S bytes spilled' from ``ptxas -v`` (Triton's newest bundled ptxas), or '' where it is missing."""
    from triton.backends.nvidia import compiler

    tool = Path(compiler.__file__).parent / "bin" / "ptxas-blackwell"
    if not tool.exists():
        return ""
    path = Path("/tmp") / f"rwkv_chat_{abs(hash(ptx))}.ptx"
    path.write_text(ptx)
    out = subprocess.run([str(tool), f"-arch=sm_{arch}a" if arch >= 90 else f"-arch=sm_{arch}", "-v", str(path),
                          "-o", "/dev/null"], capture_output=True, text=True)
    path.unlink()
    regs = re.findall(r"Used (\d+) registers", out.stderr)
    spill = re.findall(r"(\d+) bytes spill stores", out.stderr)
    return f"{max(map(int, regs))} registers, {max(map(int, spill or ['0']))} bytes spilled" if regs else ""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100 / H200)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true",
                    help="two of the gated MLP's autotune configs, not all, and no ptxas -v report")
    args = ap.parse_args()
    case = [""]
    install(args.arch, case)
    rows = [f"Triton {triton.__version__}, target sm_{args.arch}", "", "| case | kernel | warps | shared bytes | ptxas |",
            "|---|---|---|---|---|"]
    failed = 0
    for name, thunk in cases(args.quick):
        case[0] = name
        start = len(COMPILED)
        try:
            thunk()
        except Exception as e:  # noqa: BLE001 — a kernel that does not compile is this script's finding
            failed += 1
            rows.append(f"| {name} | - | - | - | FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]} |")
            print(rows[-1], flush=True)
            traceback.print_exc(limit=3)
            continue
        seen = set()
        for _, kernel_name, k in COMPILED[start:]:
            if k.hash in seen:
                continue
            seen.add(k.hash)
            rows.append(f"| {name} | {kernel_name} | {k.metadata.num_warps} | {k.metadata.shared} | "
                        f"{'' if args.quick else ptxas_info(k.asm['ptx'], args.arch)} |")
            print(rows[-1], flush=True)
    rows.append("")
    rows.append(f"{len(COMPILED)} launches compiled, {failed} cases failed")
    print(rows[-1])
    if args.out:
        Path(args.out).write_text("\n".join(rows) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
