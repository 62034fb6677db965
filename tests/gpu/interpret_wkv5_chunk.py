"""``wkv5_chunk`` (the chunked RWKV-5/6 WKV, Triton) run in Triton's interpreter on the CPU through its Python wrapper,
in both forms (one launch walking the chunks; three launches: the chunks at once, a scan, the outputs at once),
against the sequential recurrence ``wkv5_torch`` in float64: RWKV-5 (decay per head) and RWKV-6 (per token) decays,
strong decays (w down to 0, which the segment sums must keep exact) next to weak ones, T not a multiple of the chunk,
several chunks, every head size the kernel takes, a non-zero start state, fp16 inputs and float32 ones, and the state
written into the input's own tensor. The CUDA code generation itself is checked on a GPU
(``tests/gpu/verify_kernels.py``) and compiled for sm_90 without one (``tests/gpu/compile_triton.py``).

    pip install triton && python tests/gpu/interpret_wkv5_chunk.py

The wrapper's CUDA check is bypassed here (the interpreter takes CPU tensors). Prints the error of each case and
exits 1 when one exceeds its tolerance.
"""

import sys

import interpreter  # noqa: E402,F401  (switches Triton's interpreter on before triton is imported)
from interpreter import rel  # noqa: E402

import torch  # noqa: E402

from rwkv_chat.models.ops import wkv5_chunk  # noqa: E402
from rwkv_chat.models.rwkv.wkv import wkv5_torch  # noqa: E402


def case(B, T, H, N, per_token, dtype, strong, gen):
    r, k, v = (torch.randn(B, T, H, N, generator=gen).to(dtype) for _ in range(3))
    shape = (B, T, H, N) if per_token else (H, N)
    w = torch.exp(-torch.exp(torch.randn(*shape, generator=gen) * (3.0 if strong else 1.0) - (0.0 if strong else 2.0)))
    if strong:
        w.view(-1)[::7] = 0.0                                    # decays that wipe the state entirely
    u = torch.randn(H, N, generator=gen) * 0.5
    s = torch.randn(B, H, N, N, generator=gen)
    y_ref, s_ref = wkv5_torch(r.double(), k.double(), v.double(), w.double(), u.double(), s.double())
    errs = {}
    for parallel in (False, True):
        y, s_new = wkv5_chunk.wkv5_chunk(r, k, v, w, u, s.clone(), parallel=parallel)
        s_in = s.clone()
        y2, s2 = wkv5_chunk.wkv5_chunk(r, k, v, w, u, s_in, out=(torch.empty_like(r), s_in),   # state in place
                                       parallel=parallel)
        form = "three launches" if parallel else "one launch"
        errs.update({f"{form} y": rel(y, y_ref), f"{form} state": rel(s_new, s_ref),
                     f"{form} in place": rel(s2, s_new) + rel(y2, y)})
    return errs


def main() -> int:
    interpreter.bypass_device_checks()
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for B, T, H, N, per_token, dtype, strong in ((1, 37, 2, 64, True, torch.float32, False),
                                                 (2, 16, 3, 32, False, torch.float32, False),
                                                 (1, 50, 1, 64, True, torch.float32, True),
                                                 (2, 21, 2, 16, False, torch.float16, True),
                                                 (1, 5, 1, 128, True, torch.float16, False),
                                                 (1, 40, 2, 64, True, torch.bfloat16, False)):
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for name, e in case(B, T, H, N, per_token, dtype, strong, gen).items():
            ok = e < tol
            bad += not ok
            print(f"B={B} T={T} H={H} N={N} {'v6' if per_token else 'v5'} {dtype} strong={strong} {name}: "
                  f"{e:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
