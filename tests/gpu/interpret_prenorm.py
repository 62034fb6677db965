"""``norm_gemv`` (residual add + RMSNorm / LayerNorm + a few rows' GEMV, + bias or SwiGLU, one Triton launch) run in
Triton's interpreter on the CPU through its Python wrapper, against ``norm_gemv_reference`` (torch, float32 inside)
and against float64 math: the norm statistics over several chunks, masking of odd sizes (K and N not multiples of
the blocks, 1..4 rows padded to a power of two), the residual stream written once, the gate|up halves of SwiGLU, and
every block shape ``pick_blocks`` makes for the Qwen2 decode products (here on 4 "multiprocessors"). The CUDA code
generation itself is checked on a GPU (``tests/gpu/verify_ops.py``, ``bench/ops.py``).

    pip install triton && python tests/gpu/interpret_prenorm.py

The wrapper's CUDA check is bypassed here (the interpreter takes CPU tensors). Prints the error of each case and
exits 1 when one exceeds its tolerance (fp16 inputs).
"""

import importlib
import sys

import interpreter  # noqa: E402,F401  (switches Triton's interpreter on before triton is imported)
from interpreter import rel  # noqa: E402

import torch  # noqa: E402

from rwkv_chat.models.ops import prenorm as ng  # noqa: E402


def exact(x, w, norm, lw, lb, eps, res, bias, swiglu):
    """The same product in float64 without intermediate rounding (how close both stay to the math)."""
    h = x.double() if res is None else (x + res).double()
    if norm == "rms":
        h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps) * lw.double()
    elif norm == "layer":
        h = torch.nn.functional.layer_norm(h, (h.shape[-1],), lw.double(), lb.double(), eps)
    y = h @ w.double().t()
    if swiglu:
        f = y.shape[-1] // 2
        return torch.nn.functional.silu(y[..., :f]) * y[..., f:]
    return y if bias is None else y + bias.double()


def main() -> int:
    ng.check_cuda = lambda tensors: None
    ng.triton_kernels = lambda module, op: importlib.import_module(module)
    ng._sms = lambda device: 4
    torch.manual_seed(0)
    dt = torch.float16
    bad = 0
    cases = [(1, 96, 40, "rms", True, True, False), (3, 200, 24, "layer", True, False, False),
             (4, 64, 16, None, False, False, True), (2, 130, 33, "rms", False, True, False),
             (1, 1536, 64, "rms", True, False, True), (2, 1100, 20, None, False, False, False),
             (3, 96, 48, "rms", True, False, True), (1, 40, 7, "layer", False, True, False)]
    for rows, K, N, norm, res, bias, swiglu in cases:
        x = torch.randn(rows, K).to(dt)
        r = torch.randn(rows, K).to(dt) if res else None
        w = (torch.randn(N * (2 if swiglu else 1), K) / K ** 0.5).to(dt)
        lw = (torch.randn(K) * 0.1 + 1).to(dt) if norm else None
        lb = (torch.randn(K) * 0.1).to(dt) if norm == "layer" else None
        b = torch.randn(N).to(dt) if bias else None
        kw = dict(norm=norm, norm_weight=lw, norm_bias=lb, eps=1e-6, residual=r, bias=b, swiglu=swiglu)
        y, h = ng.norm_gemv(x, w, **kw)
        y_ref, h_ref = ng.norm_gemv_reference(x, w, **kw)
        errs = {"y vs reference": (rel(y, y_ref), 2e-3), "y vs float64": (rel(y, exact(x, w, norm, lw, lb, 1e-6, r, b,
                                                                                         swiglu)), 5e-3),
                "h": (rel(h, h_ref), 0.0)}
        blocks = ng.pick_blocks(rows, N, K, 4)
        for name, (e, tol) in errs.items():
            ok = e <= tol
            bad += not ok
            print(f"rows={rows} K={K} N={N} norm={norm} residual={res} bias={bias} swiglu={swiglu} blocks={blocks} "
                  f"{name}: {e:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
