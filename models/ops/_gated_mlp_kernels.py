"""Triton kernels of ``gated_mlp.py`` (imported only through ``_triton.kernels``: this module imports triton).

``gated_mlp_kernel``: O[M, N] = act(X @ WG^T) * (X @ WU^T) with X [M, K], WG/WU [N, K] (nn.Linear layout),
one [BLOCK_M, BLOCK_N] tile of O per program, both products accumulated in fp32 by ``tl.dot`` on fp16/bf16
tiles (tensor cores: mma / wgmma; tiles are never upcast; the CUDA-core configs below excepted), the activation
and the product applied to the fp32 accumulators in the epilogue, one store of O in X's dtype. Tiles run in
groups of GROUP_M rows of tiles so that neighbouring programs share weight tiles in L2.

Two autotuned launchers share the kernel: ``gated_mlp_small`` for M <= 16 (decode: a GEMV in effect,
memory-bound on the 2*N*K weights; BLOCK_M = 16, the smallest mma tile, or 1 / 2 / 4 rows on the CUDA cores, narrow
N tiles so that many programs stream the weights at once) and ``gated_mlp`` (prefill, batches: large tiles for the tensor
cores). The autotune key is (M_KEY, N, K), M_KEY a bucket of M (``gated_mlp.m_bucket``: 1, 2, 4, 16, 128, 1024,
8192), so that a model tunes a few times per weight shape, not once per batch size or prompt length.

For M <= 4 the small launcher also tries CUDA-core configs (``DOT`` = 0, BLOCK_M = the bucket: no padding of the
rows to an mma tile): each program loads [BLOCK_N, BLOCK_K] weight tiles contiguous along K (16-byte vectors),
multiplies them by the x rows in fp32 and sums along K (``tl.sum``); more, smaller programs with no shared-memory
pipeline than the mma configs, and the autotuner keeps whichever is faster for the shape.
"""

from __future__ import annotations

import inspect

import triton
import triton.language as tl

#: activation codes of the kernels (the public names in gated_mlp.ACTIVATIONS)
SILU, GELU, GELU_TANH = 0, 1, 2


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:    # silu(g) = g * sigmoid(g)  (SwiGLU, Shazeer 2020)
        out = g * tl.sigmoid(g)
    elif ACT == 1:  # exact gelu: 0.5 g (1 + erf(g / sqrt 2))  (GeGLU)
        out = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    else:           # tanh gelu: 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) = g sigmoid(2 sqrt(2/pi) (...))
        out = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
    return out


def _config(bm, bn, bk, stages, warps, group=8, dot=1):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "DOT": dot},
                         num_stages=stages, num_warps=warps)


LARGE_CONFIGS = [
    _config(128, 128, 64, 3, 8), _config(128, 128, 64, 4, 8), _config(128, 128, 32, 4, 8),
    _config(128, 64, 64, 4, 4), _config(64, 128, 64, 4, 4), _config(64, 64, 64, 4, 4),
    _config(128, 64, 64, 3, 8), _config(256, 64, 64, 3, 8), _config(64, 32, 64, 4, 4),
]
SMALL_CONFIGS = [_config(16, bn, bk, stages, 4, group=1)
                 for bn in (16, 32, 64) for bk in (128, 256) for stages in (3, 4)]
SMALL_CONFIGS += [_config(16, 16, 512, 3, 4, group=1), _config(16, 32, 512, 2, 4, group=1)]
# deeper pipelines and 8 warps: more bytes in flight per multiprocessor for the narrow matrices of 1.5B-class models
# (H=1536, I=8960: 560 programs of BLOCK_N=16 on 132 multiprocessors read at 2.8 TB/s with the configs above)
SMALL_CONFIGS += [_config(16, 16, 256, 6, 4, group=1), _config(16, 32, 256, 5, 8, group=1),
                  _config(16, 64, 128, 5, 8, group=1), _config(16, 16, 512, 4, 8, group=1)]
#: the CUDA-core configs of 1, 2 or 4 rows (BLOCK_M = the bucket), about 64 fp32 weight elements per thread per tile
GEMV_ROWS = (1, 2, 4)
GEMV_CONFIGS = [_config(bm, bn, bk, stages, max(1, min(8, bm * bn * bk // (32 * 64))), group=1, dot=0)
                for bm in GEMV_ROWS for bn, bk in ((4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256))
                for stages in (2, 3)]


@triton.jit
def gated_mlp_kernel(X, WG, WU, O, M, N, K, M_KEY, sxm, swn, som, ACT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     DOT: tl.constexpr = 1):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows/columns past the end wrap onto valid ones (loads without masks; their results are not stored)
    am = rm % M
    wn = rn % N
    a_ptr = X + am[:, None].to(tl.int64) * sxm + rk[None, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DOT:     # tensor cores: [BLOCK_K, BLOCK_N] weight tiles, half operands, fp32 accumulators
        g_ptr = WG + wn[None, :].to(tl.int64) * swn + rk[:, None]
        u_ptr = WU + wn[None, :].to(tl.int64) * swn + rk[:, None]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            left = K - k * BLOCK_K
            a = tl.load(a_ptr, mask=rk[None, :] < left, other=0.0)
            g = tl.load(g_ptr, mask=rk[:, None] < left, other=0.0)
            u = tl.load(u_ptr, mask=rk[:, None] < left, other=0.0)
            acc_g += tl.dot(a, g)
            acc_u += tl.dot(a, u)
            a_ptr += BLOCK_K
            g_ptr += BLOCK_K
            u_ptr += BLOCK_K
    else:       # CUDA cores (BLOCK_M <= 4 rows): [BLOCK_N, BLOCK_K] tiles contiguous along K, fp32 products summed
        g_ptr = WG + wn[:, None].to(tl.int64) * swn + rk[None, :]
        u_ptr = WU + wn[:, None].to(tl.int64) * swn + rk[None, :]
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = rk[None, :] < K - k * BLOCK_K
            a = tl.load(a_ptr, mask=k_ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr, mask=k_ok, other=0.0).to(tl.float32)
            u = tl.load(u_ptr, mask=k_ok, other=0.0).to(tl.float32)
            acc_g += tl.sum(a[:, None, :] * g[None, :, :], axis=2)
            acc_u += tl.sum(a[:, None, :] * u[None, :, :], axis=2)
            a_ptr += BLOCK_K
            g_ptr += BLOCK_K
            u_ptr += BLOCK_K
    out = _act(acc_g, ACT) * acc_u
    o_ptr = O + rm[:, None].to(tl.int64) * som + rn[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def small_configs(configs, named_args, **kwargs):
    """The configs of the small launcher that serve a bucket of M (``M_KEY``): the mma configs, and the CUDA-core
    configs whose BLOCK_M is that bucket (1, 2 or 4 rows; none above 4)."""
    m_key = named_args["M_KEY"]
    return [c for c in configs if c.kwargs["DOT"] or c.kwargs["BLOCK_M"] == m_key]


def _autotune(configs, prune=None):
    """Autotuned over ``configs`` per (M_KEY, N, K); the choice is kept in Triton's cache dir where this Triton
    can (``cache_results``), so a new process does not benchmark again."""
    kw = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    if prune is not None:
        kw["prune_configs_by"] = {"early_config_prune": prune}
    return triton.autotune(configs=configs, key=["M_KEY", "N", "K"], **kw)


gated_mlp = _autotune(LARGE_CONFIGS)(gated_mlp_kernel)
gated_mlp_small = _autotune(SMALL_CONFIGS + GEMV_CONFIGS, prune=small_configs)(gated_mlp_kernel)


@triton.jit
def act_mul_kernel(GU, O, N, sgm, som, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """O[m, :] = act(GU[m, :N]) * GU[m, N:2N], fp32 inside."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < N
    g = tl.load(GU + row * sgm + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(GU + row * sgm + N + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(O + row * som + cols, (_act(g, ACT) * u).to(O.dtype.element_ty), mask=m)
