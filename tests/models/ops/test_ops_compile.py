"""Every Triton kernel of ``rwkv_chat.models.ops`` compiles to PTX and a cubin for Hopper (sm_90) and Ampere (sm_86)
ahead of time, without a GPU (``triton.compile`` of the kernel's source with its constexprs), and the gated MLP's
large tiles run on wgmma with pipelined (cp.async) loads on Hopper. Needs only the ``triton`` package (skipped
with the reason where it is missing: torch's CPU wheels do not bring it)."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (torch's CPU wheels do not bring it)")
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # pragma: no cover - depends on the installed Triton
    pytest.skip(f"this Triton has no ahead-of-time compile API ({e})", allow_module_level=True)

from rwkv_chat.models.ops import _gated_mlp_kernels as G  # noqa: E402
from rwkv_chat.models.ops import _rmsnorm_rope_kernels as R  # noqa: E402

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm86": GPUTarget("cuda", 86, 32)}


def compile_kernel(fn, pointers: dict, ints: list, consts: dict, target: str, floats=(), **options):
    """triton.compile of fn with the given pointer dtypes, i32 and fp32 args, constexprs; pointers and i32 args
    (but a row count M) marked 16-divisible as the runtime marks aligned tensors and strides."""
    sig = {**{n: f"*{t}" for n, t in pointers.items()}, **{n: "i32" for n in ints}, **{n: "fp32" for n in floats}}
    order = list(fn.arg_names)
    sig = {n: sig.get(n, "constexpr") for n in order}
    attrs = {(order.index(n),): [["tt.divisibility", 16]] for n in (*pointers, *ints) if n != "M"}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    except TypeError as e:  # pragma: no cover - older Triton signatures
        pytest.skip(f"this Triton's ASTSource differs ({e})")
    return triton.compile(src, target=TARGETS[target], options=options)


@pytest.mark.parametrize("target", list(TARGETS))
def test_row_kernels_compile(target):
    half = {n: "bf16" for n in ("X", "O", "W", "C", "S")}
    k = compile_kernel(R.rmsnorm_rope_kernel, half, ["T", "sxr", "sor", "scb", "sct", "n_heads", "n_row"],
                       {"HALF": 64, "BLOCK_H": 32, "BLOCK_HALF": 64}, target, floats=["eps"], num_warps=8)
    assert "ld.global" in k.asm["ptx"]
    for norm in (0, 1):
        ptrs = {**{n: "fp16" for n in ("Q", "K", "QO", "KO", "QW", "KW")}, "C": "fp32", "S": "fp32"}
        ints = ["T", "sqb", "sqt", "sqh", "skb", "skt", "skh", "sob", "sot", "soh", "skob", "skot", "skoh", "scb",
                "sct", "n_q", "n_k"]
        compile_kernel(R.rope_qk_kernel, ptrs, ints, {"HALF": 64, "BLOCK_HQ": 32, "BLOCK_HK": 4, "BLOCK_HALF": 64,
                                                      "NORM": norm}, target, floats=["eps"], num_warps=8)
    for has_res in (False, True):
        compile_kernel(R.rmsnorm_kernel, {n: "bf16" for n in ("X", "R", "W", "O", "H")},
                       ["n_cols", "sx", "sr", "so", "sh"], {"HAS_RES": has_res, "BLOCK": 4096}, target, floats=["eps"],
                       num_warps=8)
    for act in (G.SILU, G.GELU, G.GELU_TANH):
        compile_kernel(G.act_mul_kernel, {"GU": "fp16", "O": "fp16"}, ["N", "sgm", "som"], {"ACT": act, "BLOCK": 1024},
                       target, num_warps=4)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_gated_mlp_compiles_on_tensor_cores(target, dtype):
    large, small = G.LARGE_CONFIGS[0], G.SMALL_CONFIGS[0]
    for cfg in (large, small):
        k = compile_kernel(G.gated_mlp_kernel, {n: dtype for n in ("X", "WG", "WU", "O")},
                           ["M", "N", "K", "M_KEY", "sxm", "swn", "som"], dict(cfg.kwargs, ACT=G.SILU), target,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        ptx = k.asm["ptx"]
        assert "mma" in ptx and "cp.async" in ptx
        one_stage = (cfg.kwargs["BLOCK_M"] + 2 * cfg.kwargs["BLOCK_N"]) * cfg.kwargs["BLOCK_K"] * 2
        assert k.metadata.shared >= 2 * one_stage           # multi-buffered: loads overlap the MMAs
        if target == "sm90" and cfg is large:
            assert "wgmma" in ptx


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("rows", G.GEMV_ROWS)
def test_gated_mlp_cuda_core_configs_compile_to_vector_loads_without_mma(target, rows):
    """The small launcher's CUDA-core configs (1, 2, 4 rows): weight tiles read in 16-byte vectors along K, fp32 FMAs,
    no tensor-core instruction and no padding of the rows to an mma tile."""
    cfgs = [c for c in G.GEMV_CONFIGS if c.kwargs["BLOCK_M"] == rows]
    assert cfgs and all(c.kwargs["DOT"] == 0 for c in cfgs)
    for cfg in cfgs[:2]:
        k = compile_kernel(G.gated_mlp_kernel, {n: "bf16" for n in ("X", "WG", "WU", "O")},
                           ["M", "N", "K", "M_KEY", "sxm", "swn", "som"], dict(cfg.kwargs, ACT=G.SILU), target,
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        ptx = k.asm["ptx"]
        assert "mma" not in ptx
        assert any("ld.global" in line and ".v4." in line for line in ptx.splitlines())
    kept = G.small_configs(G.SMALL_CONFIGS + G.GEMV_CONFIGS, {"M_KEY": rows})
    assert {c.kwargs["BLOCK_M"] for c in kept if not c.kwargs["DOT"]} == {rows} and any(c.kwargs["DOT"] for c in kept)
    assert all(c.kwargs["DOT"] for c in G.small_configs(G.SMALL_CONFIGS + G.GEMV_CONFIGS, {"M_KEY": 16}))


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sparse_ffn_kernel_compiles_with_predicated_vector_loads_of_weight_rows(target, dtype):
    """The row-sparse value product (``ops.sparse_ffn``) for 1..4 batch rows: the weight tile is read in 16-byte
    vectors, each load predicated (a skipped row's lanes issue no load), and dense / sparse share one kernel
    (``skip_zeros`` a runtime argument)."""
    from rwkv_chat.models.ops import _sparse_ffn_kernels as S
    from rwkv_chat.models.ops import sparse_ffn

    ptrs = {"h_ptr": dtype, "w_ptr": dtype, "y_ptr": dtype, "ws_ptr": "fp32", "cnt_ptr": "i32"}
    ints = ["F", "C", "stride_hm", "stride_ym", "f_per_split", "n_splits", "skip_zeros"]
    for rows in (1, 2, 3, 4):
        k = compile_kernel(S.sparse_rows_kernel, ptrs, ["M", *ints],
                           {"ROWS": rows, "SPLIT": True, "BLOCK_F": sparse_ffn.BLOCK_F, "BLOCK_C": sparse_ffn.BLOCK_C},
                           target, num_warps=sparse_ffn.NUM_WARPS)
        ptx = k.asm["ptx"]
        vector_loads = [line for line in ptx.splitlines() if "ld.global" in line and ".v4." in line]
        assert vector_loads and all(line.strip().startswith("@%p") for line in vector_loads)
