"""Random inputs and reference comparisons shared by the kernel tests and ``verify_kernels.py``.

Each case draws fresh random inputs with the value ranges a real model produces, runs the dispatch
function of ``rwkv_chat.models.kernels`` into NaN-poisoned output tensors, and compares with the
pure-torch path (``models/wkv.py``, ``models/quant.py``) evaluated in float32 on the same (rounded)
inputs. Error = ``‖out − ref‖ / ‖ref‖`` per output, the worst output reported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rwkv_chat.models import kernels, quant, wkv

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


def case_wkv5(B, T, H, N, dtype, device, seed, per_token=False):
    g = _gen(seed, device)
    r, k, v = (_randn(g, B, T, H, N, scale=0.5).to(dtype) for _ in range(3))
    wshape = (B, T, H, N) if per_token else (H, N)
    w = torch.exp(-torch.exp(_randn(g, *wshape, scale=0.5) - 1.0))
    u = _randn(g, H, N, scale=0.5)
    s = _randn(g, B, H, N, N, scale=0.5)
    dev = lambda t: t.to(device)  # noqa: E731
    out = (_poison(torch.empty(B, T, H, N, dtype=dtype, device=device)),
           _poison(torch.empty(B, H, N, N, device=device)))
    got = kernels.wkv5(*(dev(t) for t in (r, k, v, w, u, s)), out=out)
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


def case_wkv7(B, T, H, N, dtype, device, seed, chunk=None):
    ins = wkv7_inputs(B, T, H, N, dtype, seed)
    out = (_poison(torch.empty(B, T, H, N, device=device)), _poison(torch.empty(B, H, N, N, device=device)))
    got = kernels.wkv7(*(t.to(device) for t in ins), out=out, chunk=chunk)
    ref = wkv.wkv7_torch(*(t.float() for t in ins))
    return max(rel_err(a, b) for a, b in zip(got, ref))


def case_mm8(rows, N, M, dtype, device, seed):
    g = _gen(seed, device)
    q = quant.quantize_i8(_randn(g, N, M, scale=0.1), dtype)
    x = _randn(g, rows, N).to(dtype)
    out = _poison(torch.empty(rows, M, dtype=dtype, device=device))
    got = kernels.mm8(x.to(device), q.to(device), out=out)
    ref = x.float() @ q.dequantize(torch.float32)
    return rel_err(got, ref)


def case_gemm(rows, K, M, dtype, device, seed):
    g = _gen(seed, device)
    x, w = _randn(g, rows, K).to(dtype), _randn(g, K, M, scale=K ** -0.5).to(dtype)
    got = kernels.gemm(x.to(device), w.to(device), output_dtype=torch.float32)
    return rel_err(got, x.double() @ w.double())


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
        shapes = ((1, 1, 1, 64), (2, 21, 2, 64), (1, 3, 3, 16)) if quick else (
            (1, 1, 12, 64), (4, 1, 32, 64), (2, 70, 4, 64), (1, 9, 1, 64), (1, 5, 2, 128), (2, 4, 3, 16))
        for B, T, H, N in shapes:
            cases.append(("wkv7", f"B={B} T={T} H={H} N={N}", dt, lambda B=B, T=T, H=H, N=N, dt=dt, s=len(cases):
                          case_wkv7(B, T, H, N, dt, device, s)))
        if device == "cuda":   # the chunked prefill kernel: partial last chunk, batch > 1, both chunk lengths
            for B, T, H, L in ((1, 1, 2, 32), (2, 70, 3, 32), (1, 100, 4, 16), (1, 1024, 32, 32), (3, 33, 2, 16)):
                cases.append(("wkv7", f"chunked L={L} B={B} T={T} H={H} N=64", dt,
                              lambda B=B, T=T, H=H, L=L, dt=dt, s=len(cases): case_wkv7(B, T, H, 64, dt, device, s, L)))
        shapes = ((1, 64, 48), (5, 96, 80), (1, 33, 37)) if quick else (
            (1, 2048, 2048), (1, 4096, 4096), (1, 1000, 4000), (3, 1024, 2048), (16, 512, 1024), (40, 512, 768),
            (1, 96, 40))
        for rows, N, M in shapes:
            cases.append(("mm8", f"rows={rows} N={N} M={M}", dt, lambda r=rows, N=N, M=M, dt=dt, s=len(cases):
                          case_mm8(r, N, M, dt, device, s)))
        if device == "cuda" and dt != torch.float32:
            for rows, K, M in ((1, 768, 768), (64, 1024, 4096)):
                cases.append(("gemm", f"rows={rows} K={K} M={M}", dt, lambda r=rows, K=K, M=M, dt=dt, s=len(cases):
                              case_gemm(r, K, M, dt, device, s)))
    return cases
