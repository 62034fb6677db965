"""The compiled CPU kernels: build once per session, match the torch paths, typed errors, build cache
reuse, reported fallback on a failed build, and engine integration on the real tiny models."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rwkv_chat.models import kernels
from rwkv_chat.models.formats import i8 as quant
from rwkv_chat.models.rwkv import wkv
from rwkv_chat.models.errors import DeviceError, ShapeMismatchError, UnsupportedDtypeError
from tests.gpu.kernel_cases import TOL, all_cases, case_wkv7, wkv7_inputs

CPU_OPS = ("wkv4", "wkv5", "wkv6", "wkv7", "mm8", "gemvq")


@pytest.fixture(scope="session")
def kernel_cache():
    """The session's kernel cache (shared with the engine and the test daemons: one build per session)."""
    from ..conftest import KERNEL_CACHE

    KERNEL_CACHE.mkdir(mode=0o700, exist_ok=True)
    return KERNEL_CACHE


@pytest.fixture(scope="session")
def cpu_loader(kernel_cache):
    """One CPU build for the whole session (about 20-30 s on 2 cores)."""
    messages: list[str] = []
    loader = kernels.KernelLoader(cache_dir=kernel_cache, progress=messages.append)
    status = loader.ensure_built("cpu")
    loader.messages = messages
    return loader, status


def test_cpu_build_reports_every_op(cpu_loader):
    loader, status = cpu_loader
    assert {f: status[f] for f in CPU_OPS} == {f: "ok" for f in CPU_OPS}, status
    assert status["gemm"] != "ok" and "torch.matmul" in status["gemm"]
    rep = loader.report()
    assert set(rep) == {"cpu", "cuda"} and set(rep["cpu"]) == set(kernels.FAMILIES)
    build = loader.builds["cpu"]
    assert build["key"] in build["dir"] and torch.__version__.replace("+", "_") in build["key"]
    assert loader.messages, "build progress was not reported"
    for op in CPU_OPS:
        assert kernels.available("cpu", op)


@pytest.mark.parametrize("family,desc,dtype,fn", all_cases("cpu", quick=True),
                         ids=lambda v: str(v).replace("torch.", "") if not callable(v) else "")
def test_cpu_kernel_matches_torch_path(cpu_loader, family, desc, dtype, fn):
    err = fn()   # fresh random inputs, NaN-poisoned outputs, float32 torch reference
    assert err <= TOL[dtype], f"{family} {desc} {dtype}: relative error {err:.3e}"


def test_a_row_of_the_cpu_mm8_is_the_same_alone_or_with_other_rows(cpu_loader):
    """The compiled CPU mm8 gives each row the same bits whatever rows share the call (decode steps of any batch
    size), across several column chunks with a partial last one."""
    from rwkv_chat.models.formats.i8 import quantize_i8

    g = torch.Generator().manual_seed(4)
    q = quantize_i8(torch.randn(70, 1037, generator=g), torch.float32, output_major=False)
    x = torch.randn(6, 70, generator=g)
    together = kernels.mm8(x, q)
    for i in range(6):
        assert torch.equal(kernels.mm8(x[i:i + 1], q)[0], together[i])
    assert torch.equal(kernels.mm8(x[2:5], q), together[2:5])


def test_non_contiguous_inputs_are_served(cpu_loader):
    r, w, k, v, a, b, s = wkv7_inputs(2, 6, 2, 16, torch.float32, seed=11)
    rt = r.transpose(0, 1).contiguous().transpose(0, 1)     # same values, non-contiguous
    assert not rt.is_contiguous()
    y, s2 = kernels.wkv7(rt, w, k, v, a, b, s)
    yr, sr = wkv.wkv7_torch(r, w, k, v, a, b, s)
    assert torch.allclose(y, yr, rtol=1e-5, atol=1e-6) and torch.allclose(s2, sr, rtol=1e-5, atol=1e-6)


def test_state_is_not_modified_in_place(cpu_loader):
    r, w, k, v, a, b, s = wkv7_inputs(1, 3, 2, 16, torch.float32, seed=12)
    s0 = s.clone()
    _, s2 = kernels.wkv7(r, w, k, v, a, b, s)
    assert torch.equal(s, s0) and not torch.equal(s2, s0)


def test_sequence_equals_token_by_token(cpu_loader):
    r, w, k, v, a, b, s = wkv7_inputs(2, 9, 2, 16, torch.float32, seed=13)
    y_seq, s_seq = kernels.wkv7(r, w, k, v, a, b, s)
    st, ys = s, []
    for t in range(9):
        y, st = kernels.wkv7(*(x[:, t:t + 1] for x in (r, w, k, v, a, b)), st)
        ys.append(y)
    assert torch.allclose(torch.cat(ys, 1), y_seq, rtol=1e-6, atol=1e-6)
    assert torch.allclose(st, s_seq, rtol=1e-6, atol=1e-6)


def _wkv5_args(**over):
    B, T, H, N = 2, 3, 2, 8
    args = dict(r=torch.randn(B, T, H, N), k=torch.randn(B, T, H, N), v=torch.randn(B, T, H, N),
                w=torch.rand(H, N), u=torch.randn(H, N), s=torch.randn(B, H, N, N))
    args.update(over)
    return args


@pytest.mark.parametrize("over,err", [
    (dict(r=torch.randint(0, 3, (2, 3, 2, 8))), UnsupportedDtypeError),       # integer activations
    (dict(k=torch.randn(2, 3, 2, 8, dtype=torch.float16)), UnsupportedDtypeError),  # mixed activation dtypes
    (dict(s=torch.randn(2, 2, 8, 8, dtype=torch.float16)), UnsupportedDtypeError),  # state must be fp32
    (dict(w=torch.rand(2, 8, dtype=torch.float64)), UnsupportedDtypeError),
    (dict(v=torch.randn(2, 3, 2, 7)), ShapeMismatchError),
    (dict(s=torch.randn(2, 2, 8, 9)), ShapeMismatchError),
    (dict(w=torch.rand(3, 8)), ShapeMismatchError),
    (dict(r=torch.randn(2, 3, 16)), ShapeMismatchError),
    (dict(u=torch.randn(2, 8, device="meta")), DeviceError),
    (dict(w="decay"), UnsupportedDtypeError),
])
def test_wkv5_typed_errors(cpu_loader, over, err):
    with pytest.raises(err):
        kernels.wkv5(**_wkv5_args(**over))


def test_chunked_wkv5_request_falls_back_off_cuda_and_its_op_raises_typed_errors(cpu_loader):
    """``kernels.wkv5(chunk=16)`` on the CPU takes the compiled sequential kernel (the chunked one is Triton, CUDA
    only) and gives the reference's numbers; ``ops.wkv5_chunk`` itself refuses CPU tensors and a head size it does not
    take with typed errors, after the same input checks as ``kernels.wkv5``."""
    from rwkv_chat.models.ops import wkv5_chunk
    from rwkv_chat.models.rwkv.wkv import wkv5_torch

    a = _wkv5_args()
    y, s = kernels.wkv5(**a, chunk=16)
    y_ref, s_ref = wkv5_torch(**a)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(s, s_ref, atol=1e-5)
    with pytest.raises(DeviceError):
        wkv5_chunk.wkv5_chunk(**_wkv5_args(r=torch.randn(2, 3, 2, 16), k=torch.randn(2, 3, 2, 16),
                                           v=torch.randn(2, 3, 2, 16), w=torch.rand(2, 16), u=torch.randn(2, 16),
                                           s=torch.randn(2, 2, 16, 16)))
    with pytest.raises(ShapeMismatchError):
        wkv5_chunk.wkv5_chunk(**a)                              # head size 8
    with pytest.raises(UnsupportedDtypeError):
        wkv5_chunk.wkv5_chunk(**_wkv5_args(s=torch.randn(2, 2, 8, 8, dtype=torch.float16)))
    with pytest.raises(ValueError, match="chunk must be"):
        kernels.wkv5(**a, chunk=32)                              # a chunk length no kernel takes


def test_tuned_gemm_requests_fall_back_to_torch_off_cuda(cpu_loader):
    """``gemm(tuned=True)`` and ``bgemm`` off CUDA give torch's products (the tuned cuBLASLt GEMM is CUDA only and
    says it does not serve there); bgemm keeps torch.bmm's errors for the wrong ranks."""
    from rwkv_chat.models.kernels import dispatch

    x, w = torch.randn(5, 12), torch.randn(9, 12)
    assert torch.equal(kernels.gemm(x, w.t(), tuned=True), x @ w.t())
    xb, wb = torch.randn(3, 5, 12), torch.randn(3, 9, 12).transpose(1, 2)
    assert torch.equal(dispatch.bgemm(xb, wb), torch.bmm(xb, wb))
    assert dispatch.gemm_tuned_sound(torch.device("cpu")) is False
    with pytest.raises(RuntimeError):
        dispatch.bgemm(x, wb)


def test_typed_errors_of_every_dispatch(cpu_loader):
    C = 8
    k = torch.randn(1, 2, C)
    st = [torch.zeros(1, C) for _ in range(3)]
    with pytest.raises(UnsupportedDtypeError):
        kernels.wkv4(torch.rand(C).half(), torch.rand(C), k, k, *st)
    with pytest.raises(ShapeMismatchError):
        kernels.wkv4(torch.rand(C + 1), torch.rand(C), k, k, *st)
    with pytest.raises(DeviceError):
        kernels.wkv4(torch.rand(C), torch.rand(C), k, k.to("meta"), *st)
    r, w, kk, v, a, b, s = wkv7_inputs(1, 2, 1, 16, torch.float32, seed=3)
    with pytest.raises(UnsupportedDtypeError):
        kernels.wkv7(r, w.half(), kk, v, a, b, s)
    with pytest.raises(ShapeMismatchError):
        kernels.wkv7(r, w, kk, v, a, b, s[..., :8])
    bad_out = (torch.empty(1, 2, 1, 16).transpose(1, 2), torch.empty(1, 1, 16, 16))
    with pytest.raises(ShapeMismatchError):
        kernels.wkv7(r, w, kk, v, a, b, s, out=bad_out)
    q = quant.quantize_i8(torch.randn(32, 16), torch.float32)
    with pytest.raises(ShapeMismatchError):
        kernels.mm8(torch.randn(3, 31), q)
    with pytest.raises(UnsupportedDtypeError):
        kernels.mm8(torch.randn(3, 32, dtype=torch.float64), q)
    with pytest.raises(DeviceError):
        kernels.mm8(torch.randn(3, 32, device="meta"), q)
    with pytest.raises(ShapeMismatchError):
        kernels.gemm(torch.randn(2, 5), torch.randn(4, 3))


def test_direct_op_call_rejects_bad_input_without_crashing(cpu_loader):
    r = torch.randn(1, 1, 1, 8)
    with pytest.raises(RuntimeError, match="wkv5_cpu"):
        torch.ops.rwkv_chat.wkv5_cpu(r, r, r, torch.rand(1, 8), torch.rand(1, 8), torch.zeros(1, 1, 8, 8),
                                     torch.empty(1, 1, 1, 8), torch.empty(1, 1, 8, 7))


def test_second_ensure_built_is_instant(cpu_loader):
    loader, status = cpu_loader
    t0 = time.perf_counter()
    assert loader.ensure_built("cpu") == status
    assert time.perf_counter() - t0 < 0.05


def test_build_cache_reused_by_a_new_process(cpu_loader, kernel_cache):
    code = ("import json, sys; from rwkv_chat.models import kernels; "
            "L = kernels.KernelLoader(cache_dir=sys.argv[1]); s = L.ensure_built('cpu'); "
            "print(json.dumps({'status': s, 'build': L.builds['cpu']}))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, str(kernel_cache)], capture_output=True, text=True,
                         timeout=120, check=True)
    took = time.perf_counter() - t0
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["build"]["cached"] is True and res["build"]["seconds"] < 2.0, res
    assert res["status"]["wkv7"] == "ok"
    assert took < 15, f"a cached load took {took:.1f} s (a rebuild?)"


def test_failed_build_falls_back_with_reported_reason(cpu_loader, tmp_path, caplog):
    broken = tmp_path / "csrc"
    shutil.copytree(kernels.default_source_dir(), broken, ignore=shutil.ignore_patterns("__pycache__"))
    ops = broken / "bindings" / "cpu_ops.cpp"
    ops.write_text("#error deliberately broken kernel source\n" + ops.read_text())
    loader = kernels.KernelLoader(source_dir=broken, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="rwkv_chat.kernels"):
        status = loader.ensure_built("cpu")
    for fam in kernels.FAMILIES:
        assert status[fam].startswith("build failed") and "torch path" in status[fam], status[fam]
    assert "deliberately broken" in status["wkv7"]
    assert loader.report()["cpu"] == status
    assert any("build failed" in rec.getMessage() for rec in caplog.records)
    # Nothing of the broken build was loaded: the process still serves the working ops.
    assert case_wkv7(1, 2, 1, 16, torch.float32, "cpu", seed=5) <= 1e-5


def test_cuda_report_on_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CUDA build is exercised by tests/gpu/verify_kernels.py")
    loader = kernels.KernelLoader(cache_dir=tmp_path)
    status = loader.ensure_built("cuda")
    assert all(v.startswith("CUDA unavailable") for v in status.values()), status
    assert loader.report()["cuda"] == status
    cpu = loader.report()["cpu"]                       # not built yet, but what has no CPU kernel says so now
    assert all(cpu[f].startswith("not built") for f in kernels.CPU_FAMILIES), cpu
    assert cpu["gemm"] == kernels.CPU_GEMM_REASON and "CUDA only" in cpu["v7fused"]


def test_ops_are_chosen_per_model(cpu_loader, model_path, monkeypatch):
    """A model loaded with kernels=True calls the dispatch functions; one loaded with kernels=False the torch
    paths, whatever else the process has loaded, and nothing is rebound process-wide."""
    from rwkv_chat.models import RWKV

    torch_paths = (wkv.wkv4_torch, wkv.wkv5_auto, wkv.wkv7_auto, quant.mm8_torch)
    plain = RWKV(str(model_path("5.2")), "cpu fp32i8", kernels=False)
    fast = RWKV(str(model_path("5.2")), "cpu fp32i8")
    again = RWKV(str(model_path("5.2")), "cpu fp32i8", kernels=False)
    for m in (plain, again):
        assert (m.backend.ops.wkv4, m.backend.ops.wkv5, m.backend.ops.wkv7) == torch_paths[:3]
        assert m.backend.name == "torch" and "Backend: torch" in str(m.plan)
    assert (fast.backend.ops.wkv4, fast.backend.ops.wkv5, fast.backend.ops.wkv7) == (kernels.wkv4, kernels.wkv5,
                                                                                      kernels.wkv7)
    assert fast.backend.name == "fused-cpu" and "Backend: fused-cpu" in str(fast.plan)
    assert (wkv.wkv4_torch, wkv.wkv5_auto, wkv.wkv7_auto, quant.mm8_torch) == torch_paths
    assert not hasattr(kernels, "install") and not hasattr(wkv, "wkv7") and not hasattr(quant, "mm8")
    q = quant.quantize_i8(torch.randn(64, 48), torch.float32)
    x = torch.randn(3, 64)
    ref = x @ q.dequantize()
    for m in (plain, fast):
        y = m.backend.ops.matmul(x, q)
        # relative error by norm, as the other kernel checks: the compiled sum may be split across threads
        assert ((y - ref).norm() / ref.norm()).item() <= 1e-5
    # the ops took their functions at load: rebinding a module global later reaches no model
    from rwkv_chat.models.kernels import dispatch

    monkeypatch.setattr(dispatch, "mm8", None)
    assert ((fast.backend.ops.matmul(x, q) - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("version", ["4", "5", "5.2", "6", "7"])
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8", "cpu fp32i4"])
def test_tiny_models_same_logits_with_kernels(cpu_loader, model_path, version, strategy):
    """The same logits with the compiled kernels (the model's backend, and its eager blocks on the compiled
    per-op kernels) as with the torch paths (a model loaded with kernels=False)."""
    from rwkv_chat.models import RWKV
    path = model_path(version)
    tokens = list(b"Kernels: the same numbers.")
    plain = RWKV(model=str(path), strategy=strategy, kernels=False)
    ref_seq, _ = plain.forward(tokens, None, full_output=True)
    ref_one, _ = plain.forward(tokens[:1], None)
    model = RWKV(model=str(path), strategy=strategy)
    runs = [model.forward(tokens, None, full_output=True)[0], model.forward(tokens[:1], None)[0]]
    model.fused_cpu = None                                    # the eager blocks with the compiled per-op kernels
    assert model.backend.name == "eager" and model.backend.ops.wkv7 is kernels.wkv7
    runs += [model.forward(tokens, None, full_output=True)[0], model.forward(tokens[:1], None)[0]]
    tol = 1e-5 if strategy == "cpu fp32" else 1e-4
    if strategy.endswith("i4"):      # the compiled int4 product served the eager blocks
        assert kernels.available("cpu", "gemvq")
    for got, ref in zip(runs, (ref_seq, ref_one) * 2):
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= tol, f"v{version} {strategy}: relative error {err:.2e}"


@pytest.mark.parametrize("K,N,rows,group,dtype,scale_dtype", [
    (256, 128, 1, 128, torch.float32, torch.float16), (1024, 300, 17, 128, torch.float32, torch.float16),
    (512, 520, 9, 128, torch.float32, torch.float32), (96, 40, 5, 32, torch.float32, torch.bfloat16),
    (512, 64, 2, 64, torch.bfloat16, torch.float16), (136, 24, 3, 8, torch.float16, torch.float16),
    (200, 300, 1, 8, torch.float32, torch.float16)])
def test_cpu_int4_product_equals_the_dequantized_one(cpu_loader, K, N, rows, group, dtype, scale_dtype):
    """``kernels.mm4`` on the CPU through the compiled product (``csrc/gemvq/gemvq_cpu.cpp``: GPTQ words read as
    stored, more than 8 rows in passes, N and K padded to the packing) against x @ the dequantized weight in
    float64; weights with g_idx, a group not a multiple of 8 or more rows than it serves take the torch path."""
    from rwkv_chat.models.formats import i4
    from rwkv_chat.models.kernels import dispatch

    g = torch.Generator().manual_seed(K + N + rows)
    q = i4.quantize_i4(torch.randn(K, N, generator=g) * 0.1, group)
    q = i4.Int4Weight(q.qweight, q.qzeros, q.scales.to(scale_dtype), None, q.group_size, q.shape)
    x = torch.randn(rows, K, generator=g).to(dtype)
    assert dispatch._i4_cpu_serves(x, q)
    got = kernels.mm4(x, q)
    ref = x.double() @ q.dequantize(torch.float64)
    assert got.dtype == dtype and got.shape == (rows, N)
    assert ((got.double() - ref).norm() / ref.norm()).item() <= (1e-6 if dtype == torch.float32 else 4e-3)
    for r in range(rows):            # a row's result does not depend on the rows beside it (batched decode)
        assert torch.equal(kernels.mm4(x[r:r + 1], q), got[r:r + 1]), f"row {r} alone differs"
    many = torch.randn(dispatch.I4_CPU_ROWS + 1, K, generator=g).to(dtype)
    assert not dispatch._i4_cpu_serves(many, q)
    desc = i4.Int4Weight(q.qweight, q.qzeros, q.scales, torch.arange(K, dtype=torch.int32) // q.group_size,
                         q.group_size, q.shape)
    assert not dispatch._i4_cpu_serves(x, desc)


@pytest.mark.parametrize("K,N,rows,dtype", [(96, 48, 1, torch.float32), (100, 37, 5, torch.float32),
                                             (256, 130, 17, torch.float32), (64, 40, 3, torch.bfloat16),
                                             (48, 24, 2, torch.float16)])
def test_cpu_fp8_product_equals_the_dequantized_one(cpu_loader, K, N, rows, dtype):
    """``kernels.mmf8`` on the CPU through the compiled product (``csrc/gemvq/gemvq_cpu.cpp``: the e4m3 bytes made
    float32 in registers) against x @ the dequantized weight in float64: every finite e4m3 byte (subnormals, both
    signs) appears in the weight, K need not be a multiple of 8, a row's result is the same alone, and more rows
    than it serves take the torch path."""
    from rwkv_chat.models.formats import f8
    from rwkv_chat.models.kernels import dispatch

    g = torch.Generator().manual_seed(K + N + rows)
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)     # no NaN
    w8 = codes[torch.randint(0, codes.numel(), (N, K), generator=g)].view(torch.float8_e4m3fn)
    q = f8.Float8Weight(w8, torch.rand(N, generator=g) * 0.01 + 1e-3)
    x = torch.randn(rows, K, generator=g).to(dtype)
    assert dispatch._f8_cpu_serves(x, q.w8)
    got = kernels.mmf8(x, q)
    ref = x.double() @ q.dequantize(torch.float64)
    assert got.dtype == dtype and got.shape == (rows, N)
    assert ((got.double() - ref).norm() / ref.norm()).item() <= (1e-6 if dtype == torch.float32 else 4e-3)
    for r in range(rows):
        assert torch.equal(kernels.mmf8(x[r:r + 1], q), got[r:r + 1]), f"row {r} alone differs"
    assert torch.equal(kernels.mmf8(x, q.with_layout(True)), got)         # input-major: the same product
    assert not dispatch._f8_cpu_serves(torch.randn(dispatch.F8_CPU_ROWS + 1, K), q.w8)


def test_wkv7_chunked_kernel_only_for_long_sequences_of_few_heads():
    """The chunked WKV-7 kernel's time grows with batch x heads from the first head, the sequential kernel's
    stays flat until the heads fill the GPU (bench/results/h100.md, "Kernel benchmark"): with 132 multiprocessors a
    long sequence of 32 heads takes the chunked kernel, one of 64 heads or a batch of 8 x 32 the sequential
    one, and so do short sequences."""
    sms, long_t = 132, kernels.WKV7_CHUNK_MIN_T
    assert kernels.wkv7_chunk_choice(1, long_t, 32, sms) == kernels.WKV7_CHUNK
    assert kernels.wkv7_chunk_choice(1, 4096, 12, sms) == kernels.WKV7_CHUNK
    assert kernels.wkv7_chunk_choice(1, 4096, 64, sms) == 0
    assert kernels.wkv7_chunk_choice(8, 4096, 32, sms) == 0
    assert kernels.wkv7_chunk_choice(1, long_t - 1, 32, sms) == 0
    assert kernels.wkv7_chunk_choice(1, 1024, 32, 46) == 0


def _tiny_sources(root, broken: bool = False):
    """A source tree with the CPU library's file names, each a one-line C++ file (a build of seconds)."""
    for i, rel in enumerate(kernels.CPU_SOURCES):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        body = f"int rwkv_chat_tiny_{i}() {{ return {i}; }}\n"
        path.write_text(("#error deliberately broken\n" if broken and i == 0 else "") + body)
    return root


def test_background_build_reports_progress_then_is_ready(tmp_path):
    """First use: the build runs in a child process (the caller serves meanwhile), says how far it got, and
    leaves the library in the cache for ``ensure_built``; a failed one says why and is not tried again."""
    good = kernels.KernelLoader(source_dir=_tiny_sources(tmp_path / "good"), cache_dir=tmp_path / "cache")
    bad = kernels.KernelLoader(source_dir=_tiny_sources(tmp_path / "bad", broken=True), cache_dir=tmp_path / "cache")
    assert not good.ready("cpu") and not bad.ready("cpu")
    builds = [good.build_in_background("cpu"), bad.build_in_background("cpu")]
    assert good.build_in_background("cpu") is builds[0]              # one build per device at a time
    first = builds[0].progress()
    assert first["state"] == "building" and first["total"] == len(kernels.CPU_SOURCES) and first["device"] == "cpu"
    assert all(b.wait(120) for b in builds)
    done, failed = builds[0].progress(), builds[1].progress()
    assert done["state"] == "built" and done["compiled"] == done["total"] and done["error"] == ""
    assert good.ready("cpu") and good.library("cpu").exists()
    t0 = time.perf_counter()
    good.ensure_built("cpu")                                       # from the cache: no compiler run
    assert time.perf_counter() - t0 < 1.0 and good.builds["cpu"]["cached"] is True
    assert failed["state"] == "failed" and "deliberately broken" in failed["error"]
    assert bad.ready("cpu") and all(v == failed["error"] for v in bad.report()["cpu"].values())


@pytest.mark.slow
def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    """A build process killed while compiling leaves torch's lock file in the build folder; the next build must
    neither wait on it forever nor give up: it builds."""
    import signal
    import subprocess
    import sys
    import time

    from rwkv_chat.models.kernels import KernelLoader

    cmd = [sys.executable, "-m", "rwkv_chat.models.kernels", "cpu", "--cache-dir", str(tmp_path)]
    build_dir = tmp_path / KernelLoader(cache_dir=tmp_path).build_key("cpu")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (build_dir / "lock").exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert (build_dir / "lock").exists(), "the first build never started compiling"
    os.killpg(first.pid, signal.SIGKILL)         # the build and its compiler, as a stopped daemon's child dies
    first.wait()
    assert (build_dir / "lock").exists()         # what a killed build leaves behind
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "wkv7: ok" in again.stdout
