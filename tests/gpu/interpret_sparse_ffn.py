"""The row-sparse channel-mix value product (``models/ops/sparse_ffn.py``) in Triton's interpreter on the CPU,
through its Python wrapper: the sparse mode equals the dense mode of the same kernel bit for bit, both equal the
torch reference within fp16 / bf16 rounding, for M = 1..4 rows, odd shapes (F, C not multiples of the tile), one
and several splits of F (the split-K epilogue run twice: its counters must reset), h all zero,
float32 output, and NaN in the skipped rows of W (never read by the sparse mode, read by the dense one). The
CUDA code generation itself is checked by ``tests/gpu/verify_fused.py``.

    pip install triton && python tests/gpu/interpret_sparse_ffn.py

Also run by ``tests/models/ops/test_sparse_ffn.py`` (a separate process: ``TRITON_INTERPRET`` is read when
triton is imported). The wrapper's CUDA check is bypassed here (the interpreter takes CPU tensors). Prints one
line per case; exits 1 on a failure.
"""

import importlib
import sys

import interpreter  # noqa: E402,F401  (switches Triton's interpreter on before triton is imported)
from interpreter import rel  # noqa: E402

import torch  # noqa: E402

from rwkv_chat.models.ops import gemv, sparse_ffn  # noqa: E402

#: |kernel - reference| / |reference| allowed: float32 sums in another order, one rounding to the output dtype
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}


def relu2_rows(M, F, dtype, zero_share, g) -> torch.Tensor:
    """h [M, F] as relu(k)² with about ``zero_share`` of its columns zero in every row."""
    k = torch.randn(M, F, generator=g)
    h = torch.relu(k).square()
    dead = torch.rand(F, generator=g) < zero_share
    h[:, dead] = 0
    return h.to(dtype)


def main() -> int:
    sparse_ffn.check_cuda = lambda tensors: None
    sparse_ffn.triton_kernels = lambda module, op: importlib.import_module(module)
    gemv._sms = lambda device: 4                       # few "multiprocessors": several splits on small matrices
    torch.cuda.is_current_stream_capturing = lambda: False
    g = torch.Generator().manual_seed(0)
    ok = True
    cases = [(1, 64, 32, torch.float16, 0.5, None), (2, 100, 72, torch.float16, 0.5, None),
             (3, 200, 130, torch.bfloat16, 0.7, None), (4, 256, 128, torch.float16, 0.5, None),
             (4, 37, 19, torch.bfloat16, 0.3, None), (1, 512, 64, torch.bfloat16, 0.9, None),
             (4, 333, 257, torch.float16, 0.5, torch.float32), (2, 48, 40, torch.float16, 1.0, None)]
    for M, F, C, dt, zero_share, out_dtype in cases:
        h = relu2_rows(M, F, dt, zero_share, g)
        w = (torch.randn(F, C, generator=g) * 0.05).to(dt)
        splits = sparse_ffn.split(F, C, 4)[0]
        want = sparse_ffn.ffn_value_reference(h, w, out_dtype)
        dense = sparse_ffn.ffn_value(h, w, skip_zeros=False, out_dtype=out_dtype)
        sparse = [sparse_ffn.ffn_value(h, w, out_dtype=out_dtype) for _ in range(2)]   # the counters reset
        same = all(torch.equal(s, dense) for s in sparse)
        exact_ref = (h.double() @ w.double())
        err = rel(dense, exact_ref) if exact_ref.norm() > 0 else dense.abs().max().item()
        tol = TOL[out_dtype or dt]
        zero_ok = exact_ref.norm() > 0 or (torch.equal(dense, torch.zeros_like(dense)) and torch.equal(want, dense))
        good = same and err <= tol and rel(want, exact_ref) <= tol and zero_ok and dense.dtype == (out_dtype or dt)
        ok = ok and good
        print(f"M={M} F={F} C={C} {str(dt)[6:]} out={str(out_dtype or dt)[6:]} splits={splits} "
              f"skipped={sparse_ffn.zero_row_fraction(h):.0%}: sparse == dense {same}, "
              f"rel. err vs float64 {err:.1e} (tol {tol:g}) {'ok' if good else 'FAIL'}", flush=True)
    # the skipped rows are not read: NaN in every row of w where h[:, f] == 0 reaches the dense result only
    h, w = relu2_rows(4, 160, torch.float16, 0.5, g), (torch.randn(160, 96, generator=g) * 0.05).half()
    dead = sparse_ffn.zero_rows(h)
    poisoned = w.clone()
    poisoned[dead] = float("nan")
    got, dense = sparse_ffn.ffn_value(h, poisoned), sparse_ffn.ffn_value(h, poisoned, skip_zeros=False)
    good = bool(dead.any()) and torch.equal(got, sparse_ffn.ffn_value(h, w)) and bool(dense.isnan().all())
    ok = ok and good
    print(f"NaN in the {int(dead.sum())} zero rows of w: sparse result unchanged, dense all NaN "
          f"{'ok' if good else 'FAIL'}")
    # one split (a single program over F per column block): the same values as several splits, within rounding
    h, w = relu2_rows(3, 300, torch.float16, 0.5, g), (torch.randn(300, 260, generator=g) * 0.05).half()
    gemv._sms = lambda device: 1
    one = sparse_ffn.ffn_value(h, w, waves=1)
    good = sparse_ffn.split(300, 260, 1, waves=1)[0] == 1 and rel(one, h.double() @ w.double()) <= TOL[torch.float16]
    ok = ok and good
    print(f"one split: rel. err {rel(one, h.double() @ w.double()):.1e} {'ok' if good else 'FAIL'}")
    print("all cases pass" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
