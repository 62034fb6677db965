"""The quantized Triton kernels (int4 / fp8 GEMV and the i8 kernel of batches with split-K, fused LayerNorm + int4
q/k/v) run in Triton's interpreter on the CPU, through their Python wrappers, against the torch references (fp16:
the interpreter's bfloat16 is not numpy's): indexing, masking, the
split-K epilogue, GPTQ unpacking (both layouts of ``Int4Weight``) and the q/k/v output regions (tensor-core tiles
above 4 rows, the GEMV form at 1..4), without a GPU (the CUDA code generation itself is
checked by ``tests/gpu/verify_formats.py``).

    pip install triton && python tests/gpu/interpret_quant_kernels.py

The wrappers' CUDA checks are bypassed here (the interpreter takes CPU tensors). Prints one relative error per
case and exits 1 when one exceeds 1e-3 (fp16 products of the same values).
"""

import importlib
import sys

import interpreter  # noqa: E402,F401  (switches Triton's interpreter on before triton is imported)
from interpreter import rel  # noqa: E402

import torch  # noqa: E402

from rwkv_chat.models.formats import f8, i4, i8  # noqa: E402
from rwkv_chat.models.ops import gemv, gptq  # noqa: E402


def main() -> int:
    for mod in (gemv, gptq):
        mod.check_cuda = lambda tensors: None
        mod.triton_kernels = lambda module, op: importlib.import_module(module)
    gemv._sms = lambda device: 4                       # few "multiprocessors": split-K on small matrices
    gptq._sms = lambda device: 4
    torch.cuda.is_current_stream_capturing = lambda: False
    torch.manual_seed(0)
    errs = []
    for K, N, M, act, om in [(256, 128, 1, False, False), (200, 72, 5, False, False), (256, 64, 20, True, False),
                             (512, 64, 3, False, False), (384, 40, 40, False, False), (1024, 256, 2, False, False),
                             (256, 128, 1, False, True), (200, 72, 5, False, True), (256, 64, 20, True, True)]:
        q = i4.quantize_i4(torch.randn(K, N))
        if act:
            q = i4.Int4Weight(q.qweight, q.qzeros, q.scales, torch.randperm(q.qweight.shape[0] * 8).to(torch.int32)
                              // q.group_size, q.group_size, q.shape)
        q = q.with_layout(om)                          # output-major: qweight read through its strides
        x = torch.randn(M, K).half()
        splits = gemv._split(q.qweight.shape[0] * 8, q.qweight.shape[1], None)[0]
        for _ in range(2):                             # twice: the counters must have been reset
            errs.append(rel(gemv.i4_gemv(x, q), x.double() @ q.dequantize(torch.float64)))
        print(f"i4 K={K} N={N} M={M} g_idx={act} output_major={om} splits={splits}: {errs[-1]:.2e}")
    for K, N, M, G, om in [(256, 128, 40, 1, True), (512, 64, 70, 1, False), (256, 128, 5, 3, True),
                           (256, 64, 20, 3, False), (512, 128, 40, 3, True), (256, 64, 70, 2, True)]:
        qs = [i4.quantize_i4(torch.randn(K, N)).with_layout(om) for _ in range(G)]
        qs = i4.stack_i4(qs) if G > 1 else qs
        x = torch.randn(G + 1, M, K).half()[1:]          # x [G, M, K] not at its storage's start
        for _ in range(2):                             # twice: the counters must have been reset
            y = gemv.i4_gemv_stack(x, qs) if G > 1 else gemv.i4_gemv(x[0], qs[0]).unsqueeze(0)
            errs.append(max(rel(y[g], x[g].double() @ qs[g].dequantize(torch.float64)) for g in range(G)))
        print(f"i4 stack of {G}: K={K} N={N} M={M} output_major={om} tiles={gemv.i4_tiles(M, K, N)}: "
              f"{errs[-1]:.2e}")
    tiles = gemv.i4_tiles                              # the 128-wide tile of large matrices, on a small one
    gemv.i4_tiles = lambda rows, K, N: {**tiles(rows, K, N), "BLOCK_N": 128}
    qs = i4.stack_i4([i4.quantize_i4(torch.randn(512, 256)).with_layout(True) for _ in range(3)])
    x = torch.randn(3, 40, 512).half()
    errs.append(max(rel(y, xx.double() @ q.dequantize(torch.float64))
                    for y, xx, q in zip(gemv.i4_gemv_stack(x, qs), x, qs)))
    gemv.i4_tiles = tiles
    print(f"i4 stack of 3 in 128-wide tiles: K=512 N=256 M=40: {errs[-1]:.2e}")
    for K, N, M, om in [(256, 128, 5, True), (200, 72, 17, False), (1000, 64, 64, True), (384, 40, 33, False)]:
        q = i8.quantize_i8(torch.randn(K, N) * 0.1 + 0.02, torch.float16, output_major=om)
        x = torch.randn(M, K).half()
        tiles = gemv.i8_tiles(M)
        splits = gemv._split(K, N, None, tiles["BLOCK_N"], tiles["BLOCK_K"])[0]
        for _ in range(2):                             # twice: the counters must have been reset
            errs.append(rel(gemv.i8_gemm(x, q), x.double() @ q.dequantize(torch.float64)))
        print(f"i8 K={K} N={N} M={M} output_major={om} splits={splits}: {errs[-1]:.2e}")
    for K, N, M in [(256, 128, 1), (192, 96, 7), (1024, 64, 8)]:
        q = f8.quantize_f8(torch.randn(K, N))
        x = torch.randn(M, K).half()
        errs.append(rel(gemv.f8_gemv(x, q), x.double() @ q.dequantize(torch.float64)))
        print(f"f8 K={K} N={N} M={M}: {errs[-1]:.2e}")
    for M, K in [(3, 100), (16, 2048)]:
        x = torch.randn(M, K).half() * 5
        x[0] = 0
        q, s = gemv.fp8_rows(x)
        ref = x.float().abs().amax(-1, keepdim=True) / 448
        ref = torch.where(ref > 0, ref, torch.ones_like(ref))
        want = (x.float() / ref).clamp(-448, 448).to(torch.float8_e4m3fn)
        # the interpreter's e4m3 conversion (numpy) rounds ties away and slips at some binade edges; the GPU's
        # cvt.rn.satfinite does not: the codes are compared loosely here, exactly in verify_formats.py
        same = (q.float() == want.float()).float().mean().item()
        errs.append(rel(s, ref) + (0.0 if same > 0.95 else 1.0))
        print(f"fp8_rows M={M} K={K}: {same:.1%} of codes equal torch's, scale error {rel(s, ref):.1e}")
    for H, widths, rms, B, S, act, om in [(256, None, False, 1, 1, False, False),
                                          (256, (256, 64, 64), True, 2, 3, False, False),
                                          (192, None, False, 3, 7, False, False), (256, None, False, 2, 2, True, False),
                                          (256, (256, 64, 64), True, 2, 3, False, True),
                                          (384, (256, 64, 64), True, 3, 1, False, True),
                                          (256, None, False, 1, 2, True, True), (128, (64, 32, 32), False, 4, 1, False, False)]:
        N = 3 * H if widths is None else sum(widths)
        q = i4.quantize_i4(torch.randn(H, N) * 0.05).with_layout(om)
        g_idx = (torch.randperm(H) // q.group_size).to(torch.int32) if act else None
        x = (torch.randn(B, S, H) * 3 + 1).half()
        lw, lb = (torch.rand(H) + 0.5).half(), None if rms else torch.randn(H).half()
        args = (x, q.qweight, q.qzeros, q.scales, lw, lb, q.group_size, 1e-5)
        kw = dict(widths=widths, rms=rms, g_idx=g_idx)
        got, want = gptq.fused_ln_qkv_gptq(*args, **kw), gptq.fused_ln_qkv_gptq_reference(*args, **kw)
        got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
        errs.append(max(rel(a, b) for a, b in zip(got, want)))
        print(f"fused_ln_qkv_gptq H={H} widths={widths} rms={rms} B={B} S={S} g_idx={act} output_major={om}: "
              f"{errs[-1]:.2e}")
    gemv.torch.cuda.is_current_stream_capturing = lambda: False
    for C, rows, has_dx, om, group in [(256, 1, True, True, 128), (192, 3, False, False, 64), (384, 4, True, False, 128),
                                       (128, 2, True, True, 32)]:
        g = torch.Generator().manual_seed(C + rows)
        rnd = lambda *s: torch.randn(*s, generator=g).half()                  # noqa: E731
        qs = [i4.quantize_i4(torch.randn(C, C, generator=g) * C ** -0.5, group).with_layout(om) for _ in range(3)]
        x, dx, shift = rnd(rows, C), rnd(rows, C) if has_dx else None, rnd(rows, C)
        lw, lb, mix6 = torch.rand(C, generator=g).half() + 0.5, rnd(C) * 0.1, torch.rand(6, C, generator=g).half()
        s_got, s_want = shift.clone(), shift.clone()
        got = gptq.fused_v7_mix_rkv_i4(x, dx, lw, lb, s_got, mix6, qs)
        want = gptq.fused_v7_mix_rkv_i4_reference(x, dx, lw, lb, s_want, mix6, qs)
        e = max([rel(a, b) for a, b in zip(got, want)] + [rel(s_got, s_want)])
        errs.append(e)
        print(f"fused_v7_mix_rkv_i4 C={C} rows={rows} dx={has_dx} output_major={om} group={group}: {e:.2e} "
              f"(counter back to {int(gemv._counters(torch.device('cpu'))[0])})")
        errs.append(float(int(gemv._counters(torch.device("cpu"))[0]) != 0))
    return 0 if max(errs) < 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
