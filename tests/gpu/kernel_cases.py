"""Random inputs and reference comparisons shared by the kernel tests and ``verify_kernels.py``.

Each case draws fresh random inputs with the value ranges a real model produces, runs the dispatch
function of ``rwkv_chat.models.kernels`` into NaN-poisoned output tensors, and compares with the
pure-torch path (``models/rwkv/wkv.py``, ``models/formats/i8.py``) evaluated in float32 (mm8: float64) on the
same (rounded) inputs. Error = ``‖out − ref‖ / ‖ref‖`` per output, the worst output reported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rwkv_chat.models import kernels
from rwkv_chat.models.kernels import dispatch
from rwkv_chat.models.ops import wkv5_chunk as _wkv5c
from rwkv_chat.models.formats import i8 as quant
from rwkv_chat.models.rwkv import wkv

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return math.inf
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan"))


def _gen(seed: int, device) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _randn(g, *shape, scale=1.0):
    return torch.randn(*shape, generator=g) * scale


def case_wkv4(B, T, C, dtype, device, seed):
    g = _gen(seed, device)
    w = -torch.exp(_randn(g, C, scale=0.5))
    u = _randn(g, C, scale=0.5)
    k, v = _randn(g, B, T, C), _randn(g, B, T, C)
    aa, bb, pp = _randn(g, B, C), torch.rand(B, C, generator=g) + 0.5, _randn(g, B, C)
    k, v = k.to(dtype), v.to(dtype)
    dev = lambda t: t.to(device)  # noqa: E731
    out = tuple(_poison(torch.empty(s, dtype=dt, device=device))
                for s, dt in (((B, T, C), dtype), ((B, C), torch.float32), ((B, C), torch.float32), ((B, C), torch.float32)))
    got = kernels.wkv4(*(dev(t) for t in (w, u, k, v, aa, bb, pp)), out=out)
    ref = wkv.wkv4_torch(w, u, k.float(), v.float(), aa, bb, pp)
    return max(rel_err(a, b) for a, b in zip(got, ref))


def case_wkv5(B, T, H, N, dtype, device, seed, per_token=False, chunk=None, parallel=False):
    g = _gen(seed, device)
    r, k, v = (_randn(g, B, T, H, N, scale=0.5).to(dtype) for _ in range(3))
    wshape = (B, T, H, N) if per_token else (H, N)
    w = torch.exp(-torch.exp(_randn(g, *wshape, scale=0.5) - 1.0))
    u = _randn(g, H, N, scale=0.5)
    s = _randn(g, B, H, N, N, scale=0.5)
    dev = lambda t: t.to(device)  # noqa: E731
    out = (_poison(torch.empty(B, T, H, N, dtype=dtype, device=device)),
           _poison(torch.empty(B, H, N, N, device=device)))
    ins = [dev(t) for t in (r, k, v, w, u, s)]
    if chunk and not (_wkv5c.serves(ins[0]) and dispatch._triton_ok()):
        return math.inf                       # the chunked kernel must serve here: a quiet fallback is a failure
    got = _wkv5c.wkv5_chunk(*ins, out=out, parallel=True) if parallel else kernels.wkv5(*ins, out=out, chunk=chunk)
    ref = wkv.wkv5_torch(r.float(), k.float(), v.float(), w, u, s)
    return max(rel_err(a, b) for a, b in zip(got, ref))


def wkv7_inputs(B, T, H, N, dtype, seed):
    """r, w, k, v, a, b, s as RWKV-7 makes them (a = -kk, b = kk * gate, kk unit-norm per head)."""
    g = _gen(seed, "cpu")
    r, k, v = (_randn(g, B, T, H, N) for _ in range(3))
    kk = F.normalize(_randn(g, B, T, H, N), dim=-1)
    gate = torch.sigmoid(_randn(g, B, T, H, N))
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(_randn(g, B, T, H, N) - 1.0))
    s = _randn(g, B, H, N, N, scale=0.3)
    return r.to(dtype), w, k.to(dtype), v.to(dtype), (-kk).to(dtype), (kk * gate).to(dtype), s


def case_wkv7(B, T, H, N, dtype, device, seed, chunk=None, tensor_cores=False):
    ins = wkv7_inputs(B, T, H, N, dtype, seed)
    if chunk and tensor_cores and not dispatch.wkv7_tc_sound(torch.device(device), dtype):
        return math.inf                       # the tensor-core kernel must serve here: a quiet fallback is a failure
    out = (_poison(torch.empty(B, T, H, N, device=device)), _poison(torch.empty(B, H, N, N, device=device)))
    got = kernels.wkv7(*(t.to(device) for t in ins), out=out, chunk=chunk, tensor_cores=tensor_cores)
    ref = wkv.wkv7_torch(*(t.float() for t in ins))
    return max(rel_err(a, b) for a, b in zip(got, ref))


def _i8(g, N, M, dtype, device, scale=0.1):
    """A random i8 weight [N, M] quantized on ``device`` (in the layout that device's kernels read)."""
    return quant.quantize_i8(_randn(g, N, M, scale=scale).to(device), dtype)


def _mm8_ref(x: torch.Tensor, q, act: int = 0) -> torch.Tensor:
    """float64 reference of act(x) @ dequantize(q) on q's device; act 3 = relu² rounded to x's dtype (as
    the unfused path stores it)."""
    x = x.to(q.device)
    if act == 3:
        x = torch.relu(x.float()).square().to(x.dtype)
    return x.double() @ q.dequantize(torch.float64)


def case_mm8(rows, N, M, dtype, device, seed, output_major=None, via_cpu=False, unaligned=False):
    """``kernels.mm8`` with the weight in the layout the device's kernels read unless ``output_major`` says
    otherwise; ``via_cpu``: quantized on the CPU (input-major) and moved, which converts the layout;
    ``unaligned``: x is a contiguous view one element past a 16-byte boundary."""
    g = _gen(seed, device)
    q = _i8(g, N, M, dtype, "cpu" if via_cpu else device)
    x = _randn(g, rows, N).to(dtype)
    qd = q.to(device, output_major=output_major)
    if device == "cuda" and output_major is None and not qd.output_major:
        raise AssertionError("an i8 weight moved to CUDA must be output-major")
    out = _poison(torch.empty(rows, M, dtype=dtype, device=device))
    xd = x.to(device)
    if unaligned:
        buf = torch.empty(rows * N + 1, dtype=dtype, device=device)
        xd = buf[1:].view(rows, N)
        xd.copy_(x)
    got = kernels.mm8(xd, qd, out=out)
    return rel_err(got, _mm8_ref(x, q))


def case_mm8_multi(rows, shapes, acts, dtype, device, seed):
    """The grouped op ``mm8_multi_cuda`` (output-major weights, one launch): worst entry."""
    g = _gen(seed, device)
    qs = [_i8(g, N, M, dtype, device) for N, M in shapes]
    xs = [_randn(g, rows, N).to(dtype).to(device) for N, _ in shapes]
    if not all(q.output_major for q in qs):
        raise AssertionError("i8 weights quantized on CUDA must be output-major")
    ys = [_poison(torch.empty(rows, M, dtype=dtype, device=device)) for _, M in shapes]
    torch.ops.rwkv_chat.mm8_multi_cuda(xs, [q.storage for q in qs], [q.mx for q in qs], [q.rx for q in qs],
                                       [q.my for q in qs], [q.ry for q in qs], ys, list(acts))
    return max(rel_err(y, _mm8_ref(x, q, a)) for y, x, q, a in zip(ys, xs, qs, acts))


def case_mm8_chain(rows, C, dtype, device, seed, links=6, graph=False):
    """``links`` mm8 launches back to back on two ping-pong buffers (each reads what the previous one
    wrote and overwrites what the one before read), eager or as one CUDA graph: checks that the
    programmatic-dependent-launch wait orders the reads and writes. Error of the last output against the same
    launches run one at a time on fresh buffers with a device synchronization after each (each link's own error
    against float64 is the single-launch cases' business; rounded in bf16 through the tensor-core kernel of 5+
    rows it compounds over the links to ~1e-2)."""
    g = _gen(seed, device)
    qd = [_i8(g, C, C, dtype, device, scale=C ** -0.5) for _ in range(links)]
    x0 = _randn(g, rows, C).to(dtype)
    ref = x0.to(device)
    for q in qd:
        ref = kernels.mm8(ref, q, out=_poison(torch.empty(rows, C, dtype=dtype, device=device)))
        torch.cuda.synchronize()
    bufs = [x0.to(device), _poison(torch.empty(rows, C, dtype=dtype, device=device))]

    def run():
        for i, q in enumerate(qd):
            kernels.mm8(bufs[i % 2], q, out=bufs[(i + 1) % 2])

    if graph:
        run()                           # warm-up (builds, first launches) outside the capture
        bufs[0].copy_(x0.to(device))
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            run()
        bufs[0].copy_(x0.to(device))
        bufs[1].fill_(float("nan"))
        gr.replay()
    else:
        run()
    torch.cuda.synchronize()
    return rel_err(bufs[links % 2], ref)


def _gemvq_built(device) -> None:
    if not kernels.available("cuda", "gemvq"):
        raise AssertionError("the gemvq family is not built: the case would test the fallback")


def _replayed(fn):
    """fn() captured in a CUDA graph (after a warm-up outside it), its output poisoned, then the graph replayed."""
    fn()
    torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        out = fn()
    out.fill_(float("nan"))
    gr.replay()
    torch.cuda.synchronize()
    return out


def case_gemvq_i4(rows, K, N, group, dtype, device, seed, graph=False):
    """``kernels.mm4`` through the compiled int4 GEMV (``csrc/gemvq``): a weight quantized in the GPTQ layout and
    placed (held output-major on CUDA), against x (rounded) @ the dequantized weight in float64.
    ``graph``: the launch captured in a CUDA graph and replayed into a poisoned output."""
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.kernels import dispatch

    _gemvq_built(device)
    g = _gen(seed, device)
    q = i4.quantize_i4(_randn(g, K, N, scale=K ** -0.5).to(device), group)     # GPTQ layout
    xd = _randn(g, rows, K).to(dtype).to(device)
    qd = q.to(device)
    if q.output_major or not (qd.output_major and dispatch.gemvq_i4_ok(qd)):
        raise AssertionError("an i4 weight placed on CUDA must be output-major and served by gemvq")
    ref = xd.double() @ q.dequantize(torch.float64)
    return rel_err(_replayed(lambda: kernels.mm4(xd, qd)) if graph else kernels.mm4(xd, qd), ref)


#: shared memory a block of two K groups of 64-row tiles takes (gemmq_smem_bytes<4, 4, 2> + the 16-byte `last` flag)
GEMMQ_K_GROUPS_SMEM = 137_744
#: and of four K groups of 32-row tiles (gemmq_smem_bytes<4, 2, 4> + 16)
GEMMQ_K_GROUPS4_SMEM = 205_840


def case_gemmq_i4(rows, K, N, group, dtype, device, seed, graph=False, warps=4, k_groups=None, splits=None):
    """``kernels.mm4`` at decode-batch rows through the int4 GEMM on the tensor cores (``csrc/gemvq/gemmq_cuda.cu``)
    against x (rounded) @ the dequantized weight in float64; ``warps``, ``k_groups`` or ``splits`` other than the
    launch rule's call the kernel directly. ``graph``: captured in a CUDA graph and replayed into a poisoned
    output."""
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.kernels import dispatch

    _gemvq_built(device)
    g = _gen(seed, device)
    q = i4.quantize_i4(_randn(g, K, N, scale=K ** -0.5).to(device), group).to(device)
    x = _randn(g, rows, K).to(dtype).to(device)
    from rwkv_chat.models.kernels import gemmq

    if not (gemmq.built() and gemmq.gemmq_i4_ok(q)):
        raise AssertionError("the tensor-core int4 GEMM is not built or does not read this weight")
    routed = gemmq.ENABLED and gemmq.serves(rows, K, N)      # mm4 gives this product to it: check that route
    direct = warps != 4 or k_groups is not None or splits is not None
    if routed and not dispatch.gemmq_serves(x, q):
        raise AssertionError(f"kernels.mm4 does not route this product to it ({dispatch.GEMMQ_PROBES})")
    ref = x.double() @ q.dequantize(torch.float64)
    run = ((lambda: kernels.mm4(x, q)) if routed and not direct
           else (lambda: gemmq.gemmq_i4(x, q, splits, warps, k_groups)))
    return rel_err(_replayed(run) if graph else run(), ref)


def case_gemmq_u8(rows, K, N, device, seed, graph=False, k_groups=None, splits=None, relu2=False):
    """The uint8 form of the tensor-core GEMM (``gemmq.gemmq_u8``; through ``kernels.mm8`` where it routes these rows
    there) for an i8 weight of the reference's scheme held output-major, fp16 x, against act(x) (rounded as torch
    rounds it) @ the dequantized weight in float64. ``graph``: captured in a CUDA graph and replayed into a poisoned
    output."""
    from rwkv_chat.models.formats import i8
    from rwkv_chat.models.kernels import gemmq

    _gemvq_built(device)
    g = _gen(seed, device)
    q = i8.quantize_i8(_randn(g, K, N, scale=K ** -0.5).to(device), torch.float16, output_major=True)
    x = _randn(g, rows, K).to(torch.float16).to(device)
    if not (gemmq.built() and gemmq.gemmq_u8_ok(q, x)):
        raise AssertionError("the uint8 tensor-core GEMM is not built or does not read this weight")
    routed = dispatch.gemmq_u8_serves(x, q) and k_groups is None and splits is None and not relu2
    run = ((lambda: kernels.mm8(x, q)) if routed
           else (lambda: gemmq.gemmq_u8(x, q, splits, 4, k_groups, relu2)))
    ins = torch.relu(x).square() if relu2 else x
    return rel_err(_replayed(run) if graph else run(), ins.double() @ q.dequantize(torch.float64))


def case_gemmq_i4_stack(rows, K, N, group, dtype, device, seed, graph=False, k_groups=None, splits=None):
    """``dispatch.mm4_stack``: three int4 weights of one stack (``formats.i4.stack_i4``, as an RWKV-7 layer's r, k,
    v) times their own x in one launch of the int4 GEMM on the tensor cores (``gemmq.gemmq_i4_stack``; directly where
    ``k_groups`` or ``splits`` are given or ``mm4_stack`` gives these rows to the Triton kernel), each against x[g]
    (rounded) @ its dequantized weight in float64; the largest relative error of the three."""
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.kernels import dispatch, gemmq

    _gemvq_built(device)
    g = _gen(seed, device)
    qs = i4.stack_i4([i4.quantize_i4(_randn(g, K, N, scale=K ** -0.5).to(device), group).to(device)
                      for _ in range(3)])
    x = _randn(g, 3, rows, K).to(dtype).to(device)
    if qs is None or gemmq.stack_tensors(qs) is None:
        raise AssertionError("the three weights are not one stack the tensor-core int4 GEMM reads")
    direct = k_groups is not None or splits is not None or rows not in gemmq.STACK_ROWS   # above: Triton's stack
    if not direct and not dispatch.gemmq_serves(x[0], qs[0]):
        raise AssertionError(f"kernels.mm4 does not route {rows} rows to it ({dispatch.GEMMQ_PROBES})")
    run = ((lambda: gemmq.gemmq_i4_stack(x, qs, splits, k_groups)) if direct else (lambda: dispatch.mm4_stack(x, qs)))
    y = _replayed(run) if graph else run()
    return max(rel_err(y[k], x[k].double() @ qs[k].dequantize(torch.float64)) for k in range(3))


def case_gemmq_u8_stack(rows, K, N, device, seed, graph=False, k_groups=None, splits=None):
    """``dispatch.mm8_stack``: three i8 weights of one stack (``formats.i8.stack_i8``, as an RWKV-7 layer's r, k, v)
    times their own fp16 x in one launch of the uint8 tensor-core GEMM (``gemmq.gemmq_u8_stack``; directly where
    ``k_groups`` or ``splits`` are given), each against x[g] @ its dequantized weight in float64; the largest
    relative error of the three. Runs whether or not ``gemmq.U8_STACK_ENABLED`` (the backend's switch) is on."""
    from rwkv_chat.models.formats import i8
    from rwkv_chat.models.kernels import dispatch, gemmq

    _gemvq_built(device)
    g = _gen(seed, device)
    qs = i8.stack_i8([i8.quantize_i8(_randn(g, K, N, scale=K ** -0.5).to(device), torch.float16, output_major=True)
                      for _ in range(3)])
    x = _randn(g, 3, rows, K).to(torch.float16).to(device)
    if qs is None or gemmq.stack_u8_tensors(qs) is None:
        raise AssertionError("the three weights are not one stack the uint8 tensor-core GEMM reads")
    direct = k_groups is not None or splits is not None
    if not direct and not dispatch.gemmq_u8_serves(x[0], qs[0]):
        raise AssertionError(f"kernels.mm8 does not route {rows} rows to it ({dispatch.GEMMQ_U8_PROBES})")
    run = ((lambda: gemmq.gemmq_u8_stack(x, qs, splits, k_groups)) if direct else (lambda: dispatch.mm8_stack(x, qs)))
    y = _replayed(run) if graph else run()
    return max(rel_err(y[k], x[k].double() @ qs[k].dequantize(torch.float64)) for k in range(3))


def case_gemvq_f8(rows, K, N, dtype, device, seed):
    """``kernels.mmf8`` through the compiled fp8 GEMV (``csrc/gemvq``) against x (rounded) @ the exact
    dequantized weight in float64."""
    from rwkv_chat.models.formats import f8

    _gemvq_built(device)
    g = _gen(seed, device)
    q = f8.quantize_f8(_randn(g, K, N, scale=K ** -0.5).to(device))
    x = _randn(g, rows, K).to(dtype).to(device)
    return rel_err(kernels.mmf8(x, q), x.double() @ q.dequantize(torch.float64))


def case_gemvq_u8(rows, K, N, dtype, device, seed, graph=False):
    """``kernels.mm8`` through the compiled uint8 GEMV (``csrc/gemvq``; the reference's i8 weight held output-major
    on CUDA) against x (rounded) @ the dequantized weight in float64. ``graph``: captured in a CUDA graph and
    replayed into a poisoned output."""
    from rwkv_chat.models.formats import i8
    from rwkv_chat.models.kernels import dispatch

    _gemvq_built(device)
    g = _gen(seed, device)
    q = i8.quantize_i8(_randn(g, K, N, scale=K ** -0.5).to(device), dtype)
    x = _randn(g, rows, K).to(dtype).to(device)
    if not (dispatch.gemvq_u8_ok(q, x) and dispatch.gemvq_u8_sound(x.device)):
        raise AssertionError(f"the uint8 GEMV does not serve this weight: {dispatch.GEMVQ_U8_PROBES}")
    ref = x.double() @ q.dequantize(torch.float64)
    return rel_err(_replayed(lambda: kernels.mm8(x, q)) if graph else kernels.mm8(x, q), ref)


def case_gemvq_group(rows, shapes, fmt, dtype, device, seed, acts=None, x_scale=1.0):
    """``dispatch.gemvq_group`` (one launch of ``gemvq_i4_multi_cuda`` / ``gemvq_f8_multi_cuda`` /
    ``gemvq_u8_multi_cuda``; the int4 tensor-core GEMM where ``dispatch.gemmq_serves`` all of them) for weights
    [K_e, N_e] placed on CUDA: worst product against act(x) (rounded as torch rounds it) @ the dequantized weight
    in float64. acts: per product 0 or 3 (relu² on x); x_scale: the magnitude of x (the half-precision form
    scales each row of x by a power of two: rows far from 1 test it)."""
    from rwkv_chat.models.formats import f8, i4, i8
    from rwkv_chat.models.kernels import dispatch

    _gemvq_built(device)
    g = _gen(seed, device)
    acts = acts or [0] * len(shapes)
    ws = [_randn(g, K, N, scale=K ** -0.5).to(device) for K, N in shapes]
    pack = {"i4": lambda w: i4.quantize_i4(w).to(device), "f8": f8.quantize_f8,
            "i8": lambda w: i8.quantize_i8(w, dtype)}[fmt]
    qs = [pack(w) for w in ws]
    xs = [_randn(g, rows, K, scale=x_scale).to(dtype).to(device) for K, _ in shapes]
    ys = dispatch.gemvq_group(xs, qs, acts)
    if ys is None:
        raise AssertionError("gemvq_group did not serve the products")
    ins = [torch.relu(x).square() if a == 3 else x for x, a in zip(xs, acts)]
    return max(rel_err(y, x.double() @ q.dequantize(torch.float64)) for y, x, q in zip(ys, ins, qs))


def case_gemvq_norm(rows, K, N, dtype, device, seed, rms=False, bias=True, shift=0.0):
    """``dispatch.norm_gemv_i4`` (LayerNorm or RMSNorm of x staged by every block, then the int4 GEMV) against the
    norm in float32 rounded to x's dtype (``ops.gptq.fused_ln_qkv_gptq_reference``'s form) @ the dequantized weight
    in float64; shift: a common offset of x (the LayerNorm's mean)."""
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.kernels import dispatch
    from rwkv_chat.models.ops.gptq import norm_rows

    _gemvq_built(device)
    g = _gen(seed, device)
    q = i4.quantize_i4(_randn(g, K, N, scale=K ** -0.5)).to(device)
    x = (_randn(g, rows, K, scale=3.0) + shift).to(dtype).to(device)
    w = (_randn(g, K, scale=0.2) + 1).to(dtype).to(device)
    b = None if rms or not bias else _randn(g, K, scale=0.5).to(dtype).to(device)
    y = dispatch.norm_gemv_i4(x, q.qweight, q.qzeros, q.scales, q.group_size, w, b, 1e-5, rms)
    if y is None:
        raise AssertionError("norm_gemv_i4 did not serve the product")
    return rel_err(y, norm_rows(x, w, b, 1e-5, rms).double() @ q.dequantize(torch.float64))


def case_gemv_group(rows, products, dtype, device, seed, graph=False):
    """``dispatch.gemv_group`` (the compiled grouped GEMV, ``csrc/fused/v7_fused.cu``) on ``products`` = (M, N, kind)
    with kind "plain", "bias" (nn.Linear's bias in the epilogue) or "glu" (SwiGLU over a [2M, N] gate|up matrix),
    all in one launch: against float64 of the same rounded inputs (glu: gate, up and silu(gate) rounded to the dtype
    first, as transformers' Qwen2MLP rounds them). ``graph``: captured and replayed into poisoned outputs."""
    from rwkv_chat.models.kernels import dispatch

    if not kernels.available("cuda", "v7fused"):
        raise AssertionError("the v7fused family is not built: the case would test nothing")
    g = _gen(seed, device)
    xs, ws, biases, glu, refs = [], [], [], [], []
    for M, N, kind in products:
        x = _randn(g, rows, N).to(dtype).to(device)
        w = _randn(g, 2 * M if kind == "glu" else M, N, scale=N ** -0.5).to(dtype).to(device)
        b = _randn(g, M, scale=0.5).to(dtype).to(device) if kind == "bias" else None
        y = x.double() @ w.double().t()
        if kind == "glu":
            gate, up = y[:, :M].to(dtype).double(), y[:, M:].to(dtype).double()
            y = F.silu(gate).to(dtype).double() * up
        elif b is not None:
            y = y + b.double()
        xs.append(x), ws.append(w), biases.append(b), glu.append(kind == "glu"), refs.append(y)

    def run():
        return dispatch.gemv_group(xs, ws, biases=biases, glu=glu)

    ys = run()
    if ys is None:
        raise AssertionError("gemv_group did not take the products")
    if graph:
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            ys = run()
        for y in ys:
            y.fill_(float("nan"))
        gr.replay()
    torch.cuda.synchronize()
    return max(rel_err(y, r) for y, r in zip(ys, refs))


def case_norm_gemv_group(rows, C, products, dtype, device, seed, residual=True):
    """``dispatch.norm_gemv_group``: the residual add and RMSNorm inside the grouped GEMV's launch (Qwen2 decode), on
    products (M, kind) of the normed [rows, C] input, kinds as ``case_gemv_group``. Reference in float64 from the
    same rounded inputs with transformers' Qwen2RMSNorm rounding (h = x + residual and h * rsqrt(mean(h²) + eps)
    rounded to the dtype, then the weight product rounded); h must equal x + residual rounded, exactly."""
    from rwkv_chat.models.kernels import dispatch

    if not kernels.available("cuda", "v7fused"):
        raise AssertionError("the v7fused family is not built: the case would test nothing")
    g = _gen(seed, device)
    eps = 1e-6
    scale = torch.arange(1, rows + 1, dtype=torch.float32)[:, None]     # rows of different RMS
    x = (_randn(g, rows, C) * scale).to(dtype).to(device)
    res = (_randn(g, rows, C, scale=4.0) * scale).to(dtype).to(device) if residual else None
    nw = (1 + _randn(g, C, scale=0.1)).to(dtype).to(device)
    h = x if res is None else (x.double() + res.double()).to(dtype)
    hd = h.double()
    xn = (nw.double() * (hd * torch.rsqrt(hd.square().mean(-1, keepdim=True) + eps)).to(dtype).double()).to(dtype)
    ws, biases, glu, refs = [], [], [], []
    for M, kind in products:
        w = _randn(g, 2 * M if kind == "glu" else M, C, scale=C ** -0.5).to(dtype).to(device)
        b = _randn(g, M, scale=0.5).to(dtype).to(device) if kind == "bias" else None
        y = xn.double() @ w.double().t()
        if kind == "glu":
            y = F.silu(y[:, :M].to(dtype).double()).to(dtype).double() * y[:, M:].to(dtype).double()
        elif b is not None:
            y = y + b.double()
        ws.append(w), biases.append(b), glu.append(kind == "glu"), refs.append(y)
    out = dispatch.norm_gemv_group(x, res, nw, eps, ws, biases=biases, glu=glu)
    if rows * C * x.element_size() > dispatch.NORM_STAGE_BYTES:     # beyond the staged rows' bound: declined
        if out is not None:
            raise AssertionError("norm_gemv_group took rows beyond its shared-memory bound")
        return 0.0
    if out is None:
        raise AssertionError("norm_gemv_group did not take the products")
    ys, h_got = out
    torch.cuda.synchronize()
    if not torch.equal(h_got, h):
        return math.inf
    return max(rel_err(y, r) for y, r in zip(ys, refs))


def case_ln_mix_gemv_group(rows, C, Ms, dtype, device, seed, residual=True):
    """``dispatch.ln_mix_gemv_group`` (RWKV-7 decode: residual add + LayerNorm + token-shift lerps inside the grouped
    GEMV's launch) on products of M outputs each (the first without a lerp, the others with their own mix vector),
    then a ``gemv_group`` launch whose side copy puts xl into the shift state: against float64 of the same rounded
    inputs with v7_mix's rounding. h must equal x + dx rounded exactly, the copied shift state equal xl exactly."""
    from rwkv_chat.models.kernels import dispatch

    if not kernels.available("cuda", "v7fused"):
        raise AssertionError("the v7fused family is not built: the case would test nothing")
    g = _gen(seed, device)
    scale = torch.arange(1, rows + 1, dtype=torch.float32)[:, None]
    x = (_randn(g, rows, C) * scale).to(dtype).to(device)
    dx = _randn(g, rows, C).to(dtype).to(device) if residual else None
    lw, lb = (1 + _randn(g, C, scale=0.1)).to(dtype).to(device), _randn(g, C, scale=0.1).to(dtype).to(device)
    shift = _randn(g, rows, C).to(dtype).to(device)
    mixes = [None] + [torch.rand(C, generator=g).to(dtype).to(device) for _ in Ms[1:]]
    ws = [_randn(g, M, C, scale=C ** -0.5).to(dtype).to(device) for M in Ms]
    h = x if dx is None else (x.double() + dx.double()).to(dtype)
    hd = h.double()
    mean = hd.mean(-1, keepdim=True)
    xl = ((hd - mean) * torch.rsqrt(hd.var(-1, unbiased=False, keepdim=True) + 1e-5) * lw.double()
          + lb.double()).to(dtype)
    refs = []
    for mx, w in zip(mixes, ws):
        xe = xl if mx is None else (xl.double() + (shift.double() - xl.double()) * mx.double()).to(dtype)
        refs.append(xe.double() @ w.double().t())
    out = dispatch.ln_mix_gemv_group(x, dx, lw, lb, shift, mixes, ws)
    if rows * C * x.element_size() > dispatch.NORM_STAGE_BYTES:
        if out is not None:
            raise AssertionError("ln_mix_gemv_group took rows beyond its shared-memory bound")
        return 0.0
    if out is None:
        raise AssertionError("ln_mix_gemv_group did not take the products")
    ys, h_got, xl_got = out
    # a later launch (any products) puts xl into the shift state as its side job, as the decode step does
    dispatch.gemv_group([ys[0]], [torch.zeros(8, Ms[0], dtype=dtype, device=device)], copy=(xl_got, shift))
    torch.cuda.synchronize()
    if not torch.equal(h_got, h) or not torch.equal(shift, xl_got):
        return math.inf
    return max([rel_err(xl_got, xl)] + [rel_err(y, r) for y, r in zip(ys, refs)])


def case_ffn_rows(rows, F, C, dtype, device, seed, dead=0.0, out_f32=False, graph=False, tile_threads=0):
    """``dispatch.ffn_rows`` (the compiled row kernel of the channel-mix value product, ``csrc/fused/ffn_rows.cu``)
    on h = relu(randn)² (``dead``: that share of rows zero in every row of h) and an input-major w [F, C] whose
    rows that h leaves unread are NaN: against h @ w in float64 with those rows zero. The sparse result must be
    finite (the NaN rows were not read) and the dense one (every row read) of the clean w bit-identical to it.
    ``graph``: launched twice in a CUDA graph replay (the split counters reset themselves); ``tile_threads``: the
    kernel's column tile (0: its own choice)."""
    from rwkv_chat.models.kernels import dispatch

    if not kernels.available("cuda", "v7fused"):
        raise AssertionError("the v7fused family is not built: the case would test nothing")
    g = _gen(seed, device)
    h = torch.relu(_randn(g, rows, F)).square()
    if dead:
        h[:, torch.rand(F, generator=g) < dead] = 0
    h = h.to(dtype).to(device)
    w = _randn(g, F, C, scale=F ** -0.5).to(dtype).to(device)
    unread = (h == 0).all(dim=0)
    poisoned = w.clone()
    poisoned[unread] = float("nan")
    od = torch.float32 if out_f32 else None
    ref = h.double() @ torch.where(unread[:, None], torch.zeros_like(w), w).double()
    if graph:
        dispatch.ffn_rows(h, poisoned, out_dtype=od, tile_threads=tile_threads)
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            got = dispatch.ffn_rows(h, poisoned, out_dtype=od, tile_threads=tile_threads)
        for _ in range(2):
            got.fill_(float("nan"))
            gr.replay()
        torch.cuda.synchronize()
    else:
        got = dispatch.ffn_rows(h, poisoned, out_dtype=od, tile_threads=tile_threads)
    if got is None:
        raise AssertionError("dispatch.ffn_rows did not serve the case")
    dense = dispatch.ffn_rows(h, w, skip_zeros=False, out_dtype=od, tile_threads=tile_threads)
    if not torch.equal(got, dense):
        return math.inf
    return rel_err(got, ref)


def case_ffn_rows_i8(rows, F, C, dtype, device, seed, dead=0.0, graph=False, fmt="i8", tile_threads=0,
                     out_f32=False):
    """``dispatch.ffn_rows`` on an input-major i8 weight (``formats.i8``, uint8 rows; the kernel's uint8 kind; ``fmt``
    "f8": an input-major ``formats.f8`` weight, e4m3 rows, the rows relu(k)² leaves unread set to NaN for the sparse
    call, so a read of one shows) with ``relu2``: k = randn (``dead``: that share of columns of k negative in every
    row, so relu(k)² is zero there), against relu(k)² rounded to ``dtype`` times the float64 dequantized matrix; the
    sparse result bit-identical to the dense one (every row read of the clean weight). ``graph``: launched twice in a
    CUDA graph replay; ``tile_threads``, ``out_f32``: as ``case_ffn_rows``."""
    from rwkv_chat.models.formats.f8 import Float8Weight, quantize_f8
    from rwkv_chat.models.formats.i8 import quantize_i8
    from rwkv_chat.models.kernels import dispatch

    if not kernels.available("cuda", "v7fused"):
        raise AssertionError("the v7fused family is not built: the case would test nothing")
    g = _gen(seed, device)
    k = _randn(g, rows, F)
    if dead:
        k[:, torch.rand(F, generator=g) < dead] = -1.0
    k = k.to(dtype).to(device)
    w = _randn(g, F, C, scale=F ** -0.5).to(device)
    if fmt == "f8":
        q = quantize_f8(w).with_layout(True)
        if not q.input_major:
            raise AssertionError("the f8 weight is not held input-major")
        wd = q.w8.double().t() * q.scale.double()
    else:
        q = quantize_i8(w, dtype, output_major=False)
        wd = (q.w.double() + 0.5) * q.ry.double() * q.rx.double() + q.my.double() + q.mx.double()
    h = torch.relu(k).square()
    ref = h.double() @ wd
    read = q
    if fmt == "f8":                           # NaN (0x7F) in the rows that must stay unread
        rows_f = q.w8.t().clone()
        rows_f.view(torch.uint8)[(h == 0).all(dim=0)] = 0x7F
        read = Float8Weight(rows_f.t(), q.scale)
    od = torch.float32 if out_f32 else None
    kw = dict(relu2=True, out_dtype=od, tile_threads=tile_threads)
    if graph:
        dispatch.ffn_rows(k, read, **kw)
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            got = dispatch.ffn_rows(k, read, **kw)
        for _ in range(2):
            got.fill_(float("nan"))
            gr.replay()
        torch.cuda.synchronize()
    else:
        got = dispatch.ffn_rows(k, read, **kw)
    if got is None:
        raise AssertionError("dispatch.ffn_rows did not serve the case")
    dense = dispatch.ffn_rows(k, q, skip_zeros=False, **kw)
    if not torch.equal(got, dense):
        return math.inf
    return rel_err(got, ref)


def case_gemm(rows, K, M, dtype, device, seed, tuned=False, batch=0, transposed=False):
    """``kernels.gemm`` (cuBLAS, or the per-shape tuned cuBLASLt GEMM: ``tuned``), or ``dispatch.bgemm`` over
    ``batch`` matrices; ``transposed``: the weight stored [M, K] and viewed [K, M] (the backend's output-major
    layout). Each tuned call after the first reuses the kept algorithm: run twice, both compared."""
    g = _gen(seed, device)
    n = max(batch, 1)
    x = _randn(g, n, rows, K).to(dtype)
    w = _randn(g, n, M, K, scale=K ** -0.5).to(dtype).transpose(1, 2) if transposed else \
        _randn(g, n, K, M, scale=K ** -0.5).to(dtype)
    ref = x.double() @ w.double()
    xd, wd = x.to(device), w.to(device)
    if batch:
        errs = [rel_err(dispatch.bgemm(xd, wd), ref) for _ in range(2)]
    else:
        errs = [rel_err(kernels.gemm(xd[0], wd[0], output_dtype=torch.float32, tuned=tuned), ref[0]) for _ in range(2)]
    if tuned or batch:
        if not dispatch.gemm_tuned_sound(xd.device):
            return math.inf                   # the tuned GEMM must serve on CUDA: its probe failing is a failure
    return max(errs)


def all_cases(device: str, quick: bool = False):
    """[(family, description, dtype, fn)] covering every op, T = 1 and sequences, batch 1 and > 1."""
    dts = (torch.float32, torch.float16, torch.bfloat16)
    cases = []
    for dt in dts:
        for B, T, C in ((1, 1, 64), (3, 17, 96)) if quick else ((1, 1, 768), (2, 1, 2048), (3, 37, 512)):
            cases.append(("wkv4", f"B={B} T={T} C={C}", dt, lambda B=B, T=T, C=C, dt=dt, s=len(cases):
                          case_wkv4(B, T, C, dt, device, s)))
        for fam, pt in (("wkv5", False), ("wkv6", True)):
            shapes = ((1, 1, 2, 8), (2, 19, 2, 64)) if quick else ((1, 1, 12, 64), (4, 1, 8, 64), (2, 45, 4, 64),
                                                                 (2, 9, 8, 8), (1, 5, 2, 128))
            for B, T, H, N in shapes:
                cases.append((fam, f"B={B} T={T} H={H} N={N}", dt, lambda B=B, T=T, H=H, N=N, dt=dt, pt=pt, s=len(cases):
                              case_wkv5(B, T, H, N, dt, device, s, per_token=pt)))
        if device == "cuda":   # the chunked Triton kernel (ops.wkv5_chunk): partial last chunk, several head sizes
            for fam, pt in (("wkv5", False), ("wkv6", True)):
                for B, T, H, N in ((1, 1, 2, 64), (2, 45, 4, 64), (1, 1024, 32, 64), (3, 33, 2, 32), (1, 20, 2, 128)):
                    for par in (False, True):
                        cases.append((fam, f"chunked L=16 {'three launches' if par else 'one launch'} B={B} T={T} "
                                           f"H={H} N={N}", dt,
                                      lambda B=B, T=T, H=H, N=N, dt=dt, pt=pt, par=par, s=len(cases):
                                      case_wkv5(B, T, H, N, dt, device, s, per_token=pt, chunk=16, parallel=par)))
        shapes = ((1, 1, 1, 64), (2, 21, 2, 64), (1, 3, 3, 16)) if quick else (
            (1, 1, 12, 64), (4, 1, 32, 64), (2, 70, 4, 64), (1, 9, 1, 64), (1, 5, 2, 128), (2, 4, 3, 16),
            (5, 37, 32, 64))   # 160 heads: more than an H100's multiprocessors (the 8-token stages)
        for B, T, H, N in shapes:
            cases.append(("wkv7", f"B={B} T={T} H={H} N={N}", dt, lambda B=B, T=T, H=H, N=N, dt=dt, s=len(cases):
                          case_wkv7(B, T, H, N, dt, device, s)))
        if device == "cuda":   # the chunked prefill kernel: partial last chunk, batch > 1, both chunk lengths
            for B, T, H, L in ((1, 1, 2, 32), (2, 70, 3, 32), (1, 100, 4, 16), (1, 1024, 32, 32), (3, 33, 2, 16),
                               (2, 1024, 64, 32)):
                for tc in (False, True):
                    cases.append(("wkv7", f"chunked L={L} {'tensor' if tc else 'CUDA'} cores B={B} T={T} H={H} N=64",
                                  dt, lambda B=B, T=T, H=H, L=L, dt=dt, tc=tc, s=len(cases):
                                  case_wkv7(B, T, H, 64, dt, device, s, L, tensor_cores=tc)))
        # mm8: 1..4 rows (GEMV on CUDA: one tile, several tiles of N, lane groups < 32 for small N, a
        # partial last block), more rows (dequantize + cuBLAS), N % 16 != 0 (dequantize path)
        shapes = ((1, 64, 48), (5, 96, 80), (1, 33, 37), (2, 70, 1037)) if quick else (
            (1, 2048, 2048), (1, 4096, 4096), (1, 4096, 16384), (1, 16384, 4096), (1, 24576, 256), (2, 4096, 1000),
            (3, 1024, 2048), (4, 2048, 4096), (4, 16384, 512), (1, 64, 48), (2, 96, 40), (4, 16, 24), (1, 1000, 4000),
            (3, 520, 77), (5, 256, 384), (16, 512, 1024), (40, 512, 768), (1, 96, 40),
            (1, 2048, 7168), (1, 512, 1001), (1, 1024, 9))   # bulk-copy kernel: 4 outputs a warp, partial warps
        for rows, N, M in shapes:
            cases.append(("mm8", f"rows={rows} N={N} M={M}", dt, lambda r=rows, N=N, M=M, dt=dt, s=len(cases):
                          case_mm8(r, N, M, dt, device, s)))
        if device == "cuda":
            if dt != torch.bfloat16:   # the torch path rounds every dequantize op to bf16: ~1e-2 by design
                cases.append(("mm8", "rows=2 N=512 M=300, input-major weight on CUDA (torch path)", dt,
                              lambda dt=dt, s=len(cases): case_mm8(2, 512, 300, dt, device, s, output_major=False)))
            cases.append(("mm8", "rows=3 N=1024 M=512, x at an unaligned address", dt,
                          lambda dt=dt, s=len(cases): case_mm8(3, 1024, 512, dt, device, s, unaligned=True)))
            for rows in (1, 7):
                cases.append(("mm8", f"rows={rows} N=1024 M=768, quantized on the CPU and moved (layout converted)", dt,
                              lambda r=rows, dt=dt, s=len(cases): case_mm8(r, 1024, 768, dt, device, s, via_cpu=True)))
            groups = ((1, ((4096, 4096), (4096, 4096), (4096, 4096)), (0, 0, 0)),
                      (1, ((4096, 16384), (16384, 4096)), (0, 3)),
                      (3, ((1024, 1024), (1024, 4096), (4096, 1024)), (0, 0, 3)),
                      (4, ((2048, 512), (64, 96), (16384, 256), (96, 33)), (3, 0, 3, 0)),
                      (2, ((768, 768),), (3,)),
                      (1, ((2048, 2048), (2048, 2048), (2048, 2048)), (0, 0, 0)),   # bulk-copy kernel
                      (1, ((2048, 7168), (1024, 520)), (0, 3)))
            for rows, shp, acts in groups:
                cases.append(("mm8_multi", f"rows={rows} {' '.join(f'{N}x{M}' for N, M in shp)} acts={acts}", dt,
                              lambda r=rows, shp=shp, a=acts, dt=dt, s=len(cases):
                              case_mm8_multi(r, shp, a, dt, device, s)))
            for rows, C, graph in ((1, 2048, False), (1, 2048, True), (4, 1024, True), (8, 512, True)):
                cases.append(("mm8", f"chain of 6 launches rows={rows} C={C} {'CUDA graph' if graph else 'eager'}", dt,
                              lambda r=rows, C=C, gr=graph, dt=dt, s=len(cases): case_mm8_chain(r, C, dt, device, s,
                                                                                                 graph=gr)))
        if device == "cuda":   # the grouped GEMV with a bias and SwiGLU (Qwen2 decode: q|k|v, o, gate|up, down, head)
            for rows, products, graph in ((1, ((2048, 1536, "bias"), (1536, 1536, "plain")), False),
                                          (1, ((8960, 1536, "glu"),), False), (1, ((1536, 8960, "plain"),), False),
                                          (3, ((8960, 1536, "glu"), (4608, 3584, "bias")), False),
                                          (4, ((100, 40, "glu"), (33, 24, "bias"), (7, 1000, "glu")), False),
                                          (2, ((9, 13, "glu"), (5, 13, "bias")), False),   # unaligned: scalar loads
                                          (2, ((18944, 3584, "glu"), (3584, 18944, "plain")), True),
                                          (1, ((151936, 1536, "plain"),), False)):
                desc = " ".join(f"{M}x{N} {kind}" for M, N, kind in products)
                cases.append(("gemv_group", f"rows={rows} {desc}{' CUDA graph' if graph else ''}", dt,
                              lambda r=rows, p=products, gr=graph, dt=dt, s=len(cases):
                              case_gemv_group(r, p, dt, device, s, gr)))
            for rows, C, products, residual in ((1, 1536, ((2048, "bias"),), True), (1, 1536, ((8960, "glu"),), True),
                                                (3, 1536, ((8960, "glu"), (2048, "bias")), True),
                                                (1, 3584, ((151936 // 4, "plain"),), True),
                                                (4, 896, ((1152, "bias"),), False), (2, 64, ((40, "glu"),), True),
                                                (4, 5120, ((512, "glu"), (256, "bias")), True)):   # 40 KiB staged
                desc = " ".join(f"{M} {kind}" for M, kind in products)
                cases.append(("gemv_group", f"RMSNorm inside: rows={rows} C={C} {desc}"
                              f"{'' if residual else ', no residual'}", dt,
                              lambda r=rows, C=C, p=products, res=residual, dt=dt, s=len(cases):
                              case_norm_gemv_group(r, C, p, dt, device, s, res)))
            for rows, C, Ms, residual in ((1, 768, (768, 768, 64), True), (1, 2048, (2048, 96, 2048), False),
                                          (3, 4096, (4096, 4096, 4096, 128, 128, 480, 96), True),
                                          (4, 4096, (16384,), True), (2, 24, (24, 16), True),
                                          (2, 4096, (4096, 64, 480), True),   # within the bound in fp32 too
                                          (4, 5120, (5120, 64), True),        # 40 KiB staged in fp16 / bf16
                                          (4, 6144, (64, 64), True)):   # 6144 x 4 rows: beyond the bound (declined)
                cases.append(("gemv_group", f"LayerNorm + lerps inside: rows={rows} C={C} M={Ms}"
                              f"{'' if residual else ', no residual'}, shift copied by the next launch", dt,
                              lambda r=rows, C=C, M=Ms, res=residual, dt=dt, s=len(cases):
                              case_ln_mix_gemv_group(r, C, M, dt, device, s, res)))
        if device == "cuda":   # the channel-mix value row kernel: 7.2B / 1.5B / 0.1B shapes, odd F and C, dead rows
            for rows, F, C, dead, f32, graph in ((1, 16384, 4096, 0.0, False, False), (4, 16384, 4096, 0.0, False, True),
                                                 (2, 8192, 2048, 0.8, False, False), (3, 3072, 768, 0.0, True, False),
                                                 (1, 4000, 520, 0.5, False, True), (4, 100, 64, 0.0, False, False),
                                                 (1, 1, 8, 0.0, False, False), (2, 2000, 1000, 1.0, True, False),
                                                 (1, 70000, 96, 0.9, False, False)):
                cases.append(("ffn_rows", f"rows={rows} F={F} C={C} dead={dead}{' fp32 out' if f32 else ''}"
                              f"{' CUDA graph' if graph else ''}", dt,
                              lambda r=rows, F=F, C=C, d=dead, f=f32, gr=graph, dt=dt, s=len(cases):
                              case_ffn_rows(r, F, C, dt, device, s, d, f, gr)))
            for rows, F, C, tpr in ((1, 16384, 4096, 16), (4, 8192, 2048, 128), (3, 3000, 1000, 256)):
                cases.append(("ffn_rows", f"rows={rows} F={F} C={C} dead=0.5 tile_threads={tpr}", dt,
                              lambda r=rows, F=F, C=C, t=tpr, dt=dt, s=len(cases):
                              case_ffn_rows(r, F, C, dt, device, s, 0.5, tile_threads=t)))
            if dt != torch.float32:    # i8 weights (uint8 rows) with relu² on load
                for rows, F, C, dead, graph in ((1, 16384, 4096, 0.0, False), (4, 16384, 4096, 0.5, True),
                                                (2, 8192, 2048, 0.8, False), (3, 3000, 1008, 0.0, False),
                                                (1, 100, 16, 1.0, False)):
                    for fmt in ("i8", "f8"):
                        cases.append(("ffn_rows", f"{fmt} rows={rows} F={F} C={C} dead={dead} relu2"
                                      f"{' CUDA graph' if graph else ''}", dt,
                                      lambda r=rows, F=F, C=C, d=dead, gr=graph, dt=dt, s=len(cases), fm=fmt:
                                      case_ffn_rows_i8(r, F, C, dt, device, s, d, gr, fm)))
                for fmt, rows, tpr, f32 in (("i8", 1, 16, False), ("f8", 4, 16, True), ("i8", 3, 128, True),
                                            ("f8", 1, 256, False)):
                    cases.append(("ffn_rows", f"{fmt} rows={rows} F=8192 C=2048 dead=0.5 relu2 tile_threads={tpr}"
                                  f"{' fp32 out' if f32 else ''}", dt,
                                  lambda r=rows, t=tpr, f=f32, dt=dt, s=len(cases), fm=fmt:
                                  case_ffn_rows_i8(r, 8192, 2048, dt, device, s, 0.5, False, fm, t, f)))
        if device == "cuda":   # int4 / fp8 / uint8 decode GEMVs: 1..4 rows, odd N, several tiles of K, groups 32..128
            for rows, K, N, group in ((1, 4096, 4096, 128), (1, 4096, 16384, 128), (1, 16384, 4096, 128),
                                      (2, 2048, 2048, 128), (3, 4096, 1001, 128), (4, 4096, 4096, 128),
                                      (4, 16384, 777, 64), (1, 96, 8, 32), (2, 64, 33, 32), (1, 896, 4864, 128),
                                      (4, 4864, 896, 128), (1, 128, 1, 128)):
                cases.append(("gemvq", f"i4 rows={rows} K={K} N={N} group={group}", dt,
                              lambda r=rows, K=K, N=N, gr=group, dt=dt, s=len(cases):
                              case_gemvq_i4(r, K, N, gr, dt, device, s)))
            for rows in (1, 4):
                cases.append(("gemvq", f"i4 rows={rows} K=2048 N=2048 group=128, CUDA graph", dt,
                              lambda r=rows, dt=dt, s=len(cases): case_gemvq_i4(r, 2048, 2048, 128, dt, device, s,
                                                                                 graph=True)))
            for rows, K, N, group, graph, warps in () if dt == torch.float32 else (
                    (5, 4096, 4096, 128, False, 4), (64, 4096, 4096, 128, False, 4),
                    (64, 4096, 16384, 128, False, 4), (64, 16384, 4096, 128, False, 4),
                    (200, 4096, 1001, 128, False, 4), (37, 2048, 2048, 128, False, 4),
                    (256, 896, 4864, 128, False, 4), (128, 4864, 896, 128, False, 4),
                    (64, 2048, 2048, 128, True, 4), (64, 4096, 4096, 256, False, 4),
                    (70, 4608, 1000, 384, False, 4), (64, 4096, 4096, 128, False, 8),
                    (9, 2048, 777, 128, False, 8)):
                cases.append(("gemvq", f"i4 tensor cores rows={rows} K={K} N={N} group={group} warps={warps}"
                              f"{', CUDA graph' if graph else ''}", dt,
                              lambda r=rows, K=K, N=N, gp=group, dt=dt, s=len(cases), gr=graph, w=warps:
                              case_gemmq_i4(r, K, N, gp, dt, device, s, gr, w)))
            # two K groups a block (where the device has the shared memory: about 135 KiB a block): even and odd unit
            # counts a split (a group idle in the last step, or throughout with one unit), one to five splits, K = 128,
            # a group of three units, odd N, a CUDA graph
            optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
            for rows, K, N, group, graph, splits in () if dt == torch.float32 or optin < GEMMQ_K_GROUPS_SMEM else (
                    (64, 4096, 4096, 128, False, None), (37, 2048, 2048, 128, False, None),
                    (70, 640, 1000, 128, False, 1), (100, 4608, 1001, 384, False, 3),
                    (64, 896, 4864, 128, True, 2), (256, 4096, 4096, 256, False, 4),
                    (64, 1152, 1000, 128, False, 5), (40, 128, 256, 128, False, 1)):
                cases.append(("gemvq", f"i4 tensor cores, 2 K groups, rows={rows} K={K} N={N} group={group} "
                              f"splits={splits or 'rule'}{', CUDA graph' if graph else ''}", dt,
                              lambda r=rows, K=K, N=N, gp=group, dt=dt, s=len(cases), gr=graph, sp=splits:
                              case_gemmq_i4(r, K, N, gp, dt, device, s, gr, 4, 2, sp)))
            # one K group at 64-row tiles (the rule's choice there is two), four at 16- and 32-row tiles (about
            # 201 KiB a block where the device has it)
            for rows, K, N, group, splits in () if dt == torch.float32 else (
                    (64, 4096, 4096, 128, None), (100, 2048, 1001, 256, 3)):
                cases.append(("gemvq", f"i4 tensor cores, 1 K group, rows={rows} K={K} N={N} group={group} "
                              f"splits={splits or 'rule'}", dt,
                              lambda r=rows, K=K, N=N, gp=group, dt=dt, s=len(cases), sp=splits:
                              case_gemmq_i4(r, K, N, gp, dt, device, s, False, 4, 1, sp)))
            for rows, K, N, group, graph, splits in () if dt == torch.float32 or optin < GEMMQ_K_GROUPS4_SMEM else (
                    (8, 4096, 4096, 128, False, None), (16, 2048, 2048, 128, False, 2),
                    (32, 4096, 16384, 128, False, None), (20, 4608, 1001, 384, False, 3),
                    (5, 640, 1000, 128, True, 1), (32, 1152, 1000, 128, False, 5)):
                cases.append(("gemvq", f"i4 tensor cores, 4 K groups, rows={rows} K={K} N={N} group={group} "
                              f"splits={splits or 'rule'}{', CUDA graph' if graph else ''}", dt,
                              lambda r=rows, K=K, N=N, gp=group, dt=dt, s=len(cases), gr=graph, sp=splits:
                              case_gemmq_i4(r, K, N, gp, dt, device, s, gr, 4, 4, sp)))
            # r, k, v of one stack in one launch: the rule's tiles at 8 / 16 / 40 / 64 / 200 rows (two K groups at
            # 33-64), odd N, splits given, a CUDA graph
            for rows, K, N, group, graph, kg, splits in () if dt == torch.float32 else (
                    (8, 4096, 4096, 128, False, None, None), (16, 2048, 2048, 128, True, None, None),
                    (40, 2048, 2048, 128, False, None, None), (64, 4096, 4096, 128, False, None, None),
                    (200, 1024, 1001, 256, False, None, None), (64, 896, 896, 128, False, 1, 3),
                    (64, 1152, 1000, 128, True, 2, 5)):
                cases.append(("gemvq", f"i4 tensor cores, r/k/v stack, rows={rows} K={K} N={N} group={group}"
                              f"{f' K groups={kg}' if kg else ''} splits={splits or 'rule'}"
                              f"{', CUDA graph' if graph else ''}", dt,
                              lambda r=rows, K=K, N=N, gp=group, dt=dt, s=len(cases), gr=graph, kg=kg, sp=splits:
                              case_gemmq_i4_stack(r, K, N, gp, dt, device, s, gr, kg, sp)))
            for rows, K, N in ((1, 4096, 4096), (1, 4096, 16384), (1, 16384, 4096), (2, 2048, 2048), (3, 4096, 1001),
                               (4, 4096, 4096), (4, 16384, 777), (1, 16, 5), (2, 48, 33), (1, 896, 4864)):
                cases.append(("gemvq", f"f8 rows={rows} K={K} N={N}", dt,
                              lambda r=rows, K=K, N=N, dt=dt, s=len(cases): case_gemvq_f8(r, K, N, dt, device, s)))
            for rows, K, N in () if dt == torch.float32 else (
                    (1, 4096, 4096), (1, 4096, 16384), (1, 16384, 4096), (2, 2048, 2048), (3, 4096, 1001),
                    (4, 16384, 777), (1, 16, 5), (2, 48, 33), (4, 20480, 64)):
                cases.append(("gemvq", f"i8 (uint8) rows={rows} K={K} N={N}", dt,
                              lambda r=rows, K=K, N=N, dt=dt, s=len(cases): case_gemvq_u8(r, K, N, dt, device, s)))
            for rows in () if dt == torch.float32 else (1, 4):
                cases.append(("gemvq", f"i8 (uint8) rows={rows} K=2048 N=2048, CUDA graph", dt,
                              lambda r=rows, dt=dt, s=len(cases): case_gemvq_u8(r, 2048, 2048, dt, device, s,
                                                                                 graph=True)))
            # one launch for several products (the fused RWKV-7 decode's r, k, v); i8: fp16 / bf16 (float32: mm8)
            for fmt in ("i4", "f8") + (() if dt == torch.float32 else ("i8",)):
                for rows, shp in ((1, ((4096, 4096), (4096, 4096), (4096, 4096))),
                                  (3, ((2048, 2048), (2048, 520), (4096, 1000), (1024, 4096))),
                                  (4, ((16384, 4096), (64, 40)))):
                    cases.append(("gemvq", f"{fmt} group rows={rows} {' '.join(f'{K}x{N}' for K, N in shp)}", dt,
                                  lambda r=rows, shp=shp, f=fmt, dt=dt, s=len(cases):
                                  case_gemvq_group(r, shp, f, dt, device, s)))
                # relu² on load (the channel-mix value), x far from 1 (the power-of-two scaling of the fp16 form)
                for rows, shp, acts, xsc in ((1, ((4096, 16384), (16384, 4096)), [0, 3], 4.0),
                                             (4, ((4096, 1000), (8192, 2048)), [3, 3], 30.0),
                                             (1, ((2048, 2048), (2048, 520)), [0, 0], 300.0),
                                             (2, ((2048, 2048),), [0], 1e-3)):
                    cases.append(("gemvq", f"{fmt} group rows={rows} {' '.join(f'{K}x{N}' for K, N in shp)} "
                                           f"acts={acts} |x|~{xsc:g}", dt,
                                  lambda r=rows, shp=shp, f=fmt, a=acts, xs_=xsc, dt=dt, s=len(cases):
                                  case_gemvq_group(r, shp, f, dt, device, s, a, xs_)))
            # the uint8 form (i8 weights, fp16 x): the rule's tiles, K groups 1 / 2, splits given, odd N, relu²,
            # a CUDA graph
            for rows, K, N, kg, splits, relu2, graph in () if dt != torch.float16 else (
                    (5, 4096, 4096, None, None, False, False), (16, 2048, 2048, None, None, False, False),
                    (37, 4096, 16384, None, None, False, False), (64, 16384, 4096, None, None, False, False),
                    (64, 4096, 4096, 1, 3, False, False), (128, 4096, 1001, None, None, False, False),
                    (200, 640, 1000, None, None, True, False), (32, 1152, 1000, 2, 5, False, False),
                    (8, 896, 4864, 2, 2, True, True), (70, 128, 256, None, 1, False, False)):
                cases.append(("gemvq", f"i8 (uint8) tensor cores rows={rows} K={K} N={N}"
                                       f"{f' K groups={kg}' if kg else ''} splits={splits or 'rule'}"
                                       f"{' relu²' if relu2 else ''}{', CUDA graph' if graph else ''}", dt,
                              lambda r=rows, K=K, N=N, kg=kg, sp=splits, r2=relu2, gr=graph, s=len(cases):
                              case_gemmq_u8(r, K, N, device, s, gr, kg, sp, r2)))
            # the uint8 form's r/k/v stack in one launch: the rule's tiles, odd N, K groups and splits given, a graph
            for rows, K, N, kg, splits, graph in () if dt != torch.float16 else (
                    (8, 4096, 4096, None, None, False), (16, 2048, 2048, None, None, True),
                    (64, 4096, 4096, None, None, False), (200, 1024, 1001, None, None, False),
                    (64, 1152, 1000, 2, 5, True), (40, 896, 896, 1, 3, False)):
                cases.append(("gemvq", f"i8 (uint8) tensor cores, r/k/v stack, rows={rows} K={K} N={N}"
                                       f"{f' K groups={kg}' if kg else ''} splits={splits or 'rule'}"
                                       f"{', CUDA graph' if graph else ''}", dt,
                              lambda r=rows, K=K, N=N, kg=kg, sp=splits, gr=graph, s=len(cases):
                              case_gemmq_u8_stack(r, K, N, device, s, gr, kg, sp)))
            # 3-4 rows of large int4 weights go to the tensor-core GEMM (gemmq.FEW_ROWS), relu² on load included
            for rows, shp, acts, xsc in () if dt == torch.float32 else (
                    (4, ((16384, 4096),), [3], 4.0), (3, ((4096, 16384),), [0], 1.0),
                    (3, ((16384, 4096),), [3], 30.0), (4, ((4096, 16384),), [0], 1e-2)):
                cases.append(("gemvq", f"i4 group on the tensor cores rows={rows} "
                                       f"{' '.join(f'{K}x{N}' for K, N in shp)} acts={acts} |x|~{xsc:g}", dt,
                              lambda r=rows, shp=shp, a=acts, xs_=xsc, dt=dt, s=len(cases):
                              case_gemvq_group(r, shp, "i4", dt, device, s, a, xs_)))
            for rows, K, N, graph in () if dt == torch.float32 else (
                    (3, 4096, 16384, False), (4, 16384, 4096, False), (4, 4096, 16384, True)):
                cases.append(("gemvq", f"i4 tensor cores rows={rows} K={K} N={N} group=128 (few rows, large weight)"
                                       f"{', CUDA graph' if graph else ''}", dt,
                              lambda r=rows, K=K, N=N, dt=dt, s=len(cases), gr=graph:
                              case_gemmq_i4(r, K, N, 128, dt, device, s, gr)))
            # LayerNorm / RMSNorm on load (fused_ln_qkv_gptq's compiled form; fp16/bf16); K = 20480: x in tiles
            for rows, K, N, rms, bias, shift in () if dt == torch.float32 else ((1, 4096, 12288, False, True, 0.0), (3, 2048, 1000, False, False, 5.0),
                                                 (1, 1536, 2048, True, False, 0.0), (4, 4096, 520, True, False, 2.0),
                                                 (2, 20480, 256, False, True, 1.0)):
                cases.append(("gemvq", f"i4 {'RMSNorm' if rms else 'LayerNorm'}{'' if bias or rms else ' no bias'} "
                                       f"rows={rows} {K}x{N} x+{shift:g}", dt,
                              lambda r=rows, K=K, N=N, rms=rms, b=bias, sh=shift, dt=dt, s=len(cases):
                              case_gemvq_norm(r, K, N, dt, device, s, rms, b, sh)))
        if device == "cuda" and dt != torch.float32:
            for rows, K, M in ((1, 768, 768), (64, 1024, 4096)):
                cases.append(("gemm", f"rows={rows} K={K} M={M}", dt, lambda r=rows, K=K, M=M, dt=dt, s=len(cases):
                              case_gemm(r, K, M, dt, device, s)))
            # the per-shape tuned cuBLASLt GEMM of decode steps above 4 rows: plain and batched, both weight layouts
            for rows, K, M, batch, tr in ((64, 4096, 4096, 0, True), (64, 4096, 16384, 0, True), (5, 2048, 2048, 0, False),
                                          (64, 4096, 4096, 3, True), (64, 2048, 96, 3, False), (256, 96, 2048, 3, False),
                                          (17, 333, 250, 0, True)):
                cases.append(("gemm", f"tuned cuBLASLt rows={rows} K={K} M={M} batch={batch} "
                                      f"{'output-major' if tr else 'row-major'}", dt,
                              lambda r=rows, K=K, M=M, b=batch, tr=tr, dt=dt, s=len(cases):
                              case_gemm(r, K, M, dt, device, s, tuned=True, batch=b, transposed=tr)))
    return cases
