"""The quantized Triton kernels (int4 / fp8 GEMV, fused LayerNorm + int4 q/k/v) run in Triton's interpreter on
the CPU against the torch references: their indexing, masking, split-K and GPTQ unpacking, without a GPU (the
CUDA code generation itself is checked by ``tests/gpu/verify_formats.py``).

    pip install triton && python tests/gpu/interpret_quant_kernels.py

Prints one relative error per case and exits 1 when one exceeds 1e-3 (fp16 products of the same values).
"""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"      # Triton's own switch, read at its import: the kernels run in numpy
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.models.formats import f8, i4  # noqa: E402
from rwkv_chat.models.ops import _gemv_kernels as K  # noqa: E402
from rwkv_chat.models.ops import _gptq_kernels as G  # noqa: E402
from rwkv_chat.models.ops.gptq import _shape_out, fused_ln_qkv_gptq_reference  # noqa: E402

def rel(a,b): return ((a.double()-b.double()).norm()/b.double().norm()).item()
torch.manual_seed(0)
ERRS = []
for (Kd, N, M, gidx, splits) in [(256, 128, 1, False, 1), (200, 72, 5, False, 2), (256, 64, 20, True, 3), (512, 64, 3, False, 3), (384, 40, 40, False, 2)]:
    w = torch.randn(Kd, N)
    q = i4.quantize_i4(w)
    if gidx:
        q = i4.Int4Weight(q.qweight, q.qzeros, q.scales, (torch.arange(Kd)//q.group_size).to(torch.int32), q.group_size, q.shape)
    kp, np_ = q.qweight.shape[0]*8, q.qweight.shape[1]
    x = torch.randn(M, Kd).half()
    xp = torch.nn.functional.pad(x, (0, kp-Kd))
    per = -(-kp//splits); per = -(-per//128)*128; splits = -(-kp//per)
    atomic = splits > 1
    y = torch.zeros(M, np_, dtype=torch.float32 if atomic else torch.float16)
    bm = min(64, max(16, 1 << (M-1).bit_length()))
    grid = (-(-np_//64), splits, -(-M//bm))
    K.i4_gemv_kernel[grid](xp, q.qweight, q.qzeros, q.scales, q.g_idx if q.g_idx is not None else q.qweight, y, M, kp, np_, q.group_size, xp.stride(0), y.stride(0), per, HAS_GIDX=q.g_idx is not None, ONE_GROUP=(q.g_idx is None and q.group_size % 128 == 0), ATOMIC=atomic, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128)
    ERRS.append(rel(y[:, :N], x.double() @ q.dequantize(torch.float64)))
    print("i4", Kd, N, M, gidx, splits, rel(y[:, :N], x.double() @ q.dequantize(torch.float64)))
for (Kd, N, M) in [(256, 128, 1), (192, 96, 7)]:
    q = f8.quantize_f8(torch.randn(Kd, N))
    x = torch.randn(M, Kd).half()
    y = torch.empty(M, N, dtype=torch.float16)
    K.f8_gemv_kernel[(-(-N//64), 1, 1)](x, q.w8, q.scale, y, M, Kd, N, x.stride(0), y.stride(0), Kd, ATOMIC=False, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)
    ERRS.append(rel(y, x.double() @ q.dequantize(torch.float64)))
    print("f8", Kd, N, M, rel(y, x.double() @ q.dequantize(torch.float64)))
for (H, widths, rms, B, S) in [(256, None, False, 1, 1), (256, (256, 64, 64), True, 2, 3), (192, None, False, 3, 7)]:
    Nt = 3*H if widths is None else sum(widths)
    q = i4.quantize_i4(torch.randn(H, Nt)*0.05)
    x = (torch.randn(B, S, H)*3+1).half()
    lw = (torch.rand(H)+0.5).half(); lb = None if rms else torch.randn(H).half()
    wd = widths or (Nt//3,)*3
    M = B*S
    out = torch.empty(M*Nt, dtype=torch.float16)
    G.ln_qkv_gptq_kernel[(-(-M//16), -(-Nt//64))](x.reshape(M, H), lw, lb if lb is not None else lw, q.qweight, q.qzeros, q.scales, q.qweight, out, M, H, Nt, wd[0], wd[1], q.group_size, 1e-5, H, RMS=rms, HAS_BIAS=lb is not None, HAS_GIDX=False, ONE_GROUP=(q.group_size % 128 == 0), BLOCK_M=16, BLOCK_N=64, BLOCK_K=128)
    got = _shape_out(out, B, S, wd)
    want = fused_ln_qkv_gptq_reference(x, q.qweight, q.qzeros, q.scales, lw, lb, q.group_size, 1e-5, widths=widths, rms=rms)
    got = got if isinstance(got, tuple) else (got,); want = want if isinstance(want, tuple) else (want,)
    ERRS.append(max(rel(a, b) for a, b in zip(got, want)))
    print("gptq", H, widths, rms, B, S, max(rel(a, b) for a, b in zip(got, want)))

sys.exit(0 if max(ERRS) < 1e-3 else 1)
