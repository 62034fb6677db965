"""``wkv7_chunk`` (the chunked RWKV-7 WKV on the tensor cores, Triton) run in Triton's interpreter on the CPU through
its Python wrapper, against the sequential recurrence (``wkv.wkv7_torch``'s formula) in float64: inputs as RWKV-7
makes them (a = -kk, b = kk * gate, kk unit-norm per head), decays across RWKV-7's whole range (down to 0.545, the strongest
it allows, where 1/Γ over a chunk of 32 reaches e^19.4) next to weak ones, T not a multiple of the chunk, one
token, several chunks, both chunk lengths, batch > 1, a non-zero start state, fp16 / bf16 / float32 inputs, and the
state written into the input's own tensor. The interpreter computes every product in float32 whatever the
precision asked; the tensor cores' tf32x3 is checked on a GPU (``tests/gpu/verify_kernels.py``) and the code
compiled for sm_90 without one (``tests/gpu/compile_triton.py``).

    pip install triton && python tests/gpu/interpret_wkv7_chunk.py

The wrapper's CUDA check is bypassed here (the interpreter takes CPU tensors). Prints the error of each case and
exits 1 when one exceeds its tolerance.
"""

import math
import sys

import interpreter  # noqa: E402,F401  (switches Triton's interpreter on before triton is imported)
from interpreter import rel  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from rwkv_chat.models.ops import wkv7_chunk  # noqa: E402


def wkv7_f64(r, w, k, v, a, b, s):
    """``wkv.wkv7_torch``'s recurrence in float64: S <- S diag(w_t) + (S a_t) b_tᵀ + v_t k_tᵀ, y_t = S r_t."""
    r, w, k, v, a, b, s = (t.double() for t in (r, w, k, v, a, b, s))
    y = torch.empty_like(r)
    for t in range(r.shape[1]):
        s = s * w[:, t].unsqueeze(-2) + (s @ a[:, t].unsqueeze(-1)) @ b[:, t].unsqueeze(-2) \
            + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2)
        y[:, t] = (s @ r[:, t].unsqueeze(-1)).squeeze(-1)
    return y, s


def inputs(B, T, H, dtype, strong, gen, N=64):
    r, k, v = (torch.randn(B, T, H, N, generator=gen) for _ in range(3))
    kk = F.normalize(torch.randn(B, T, H, N, generator=gen), dim=-1)
    gate = torch.sigmoid(torch.randn(B, T, H, N, generator=gen))
    x = torch.randn(B, T, H, N, generator=gen) * (4.0 if strong else 1.0) + (2.0 if strong else -1.0)
    w = torch.exp(-math.exp(-0.5) * torch.sigmoid(x))
    if strong:
        w.view(-1)[::5] = math.exp(-math.exp(-0.5))               # the strongest decay RWKV-7 makes
    s = torch.randn(B, H, N, N, generator=gen) * 0.3
    return r.to(dtype), w, k.to(dtype), v.to(dtype), (-kk).to(dtype), (kk * gate).to(dtype), s


def case(B, T, H, L, dtype, strong, gen):
    r, w, k, v, a, b, s = inputs(B, T, H, dtype, strong, gen)
    y_ref, s_ref = wkv7_f64(r, w, k, v, a, b, s)
    y, s_new = wkv7_chunk.wkv7_chunk(r, w, k, v, a, b, s.clone(), chunk=L)
    s_in = s.clone()
    y2, s2 = wkv7_chunk.wkv7_chunk(r, w, k, v, a, b, s_in, out=(torch.empty_like(y), s_in), chunk=L)
    return {"y": rel(y, y_ref), "state": rel(s_new, s_ref), "in place": rel(s2, s_new) + rel(y2, y)}


def main() -> int:
    interpreter.bypass_device_checks()
    gen = torch.Generator().manual_seed(0)
    bad = 0
    for B, T, H, L, dtype, strong in ((1, 70, 2, 32, torch.float32, True),
                                      (2, 33, 1, 16, torch.float32, False),
                                      (1, 1, 1, 32, torch.float32, False),
                                      (1, 64, 1, 16, torch.float32, True),
                                      (1, 45, 2, 32, torch.float16, False),
                                      (2, 20, 1, 16, torch.bfloat16, True)):
        for name, e in case(B, T, H, L, dtype, strong, gen).items():
            ok = e < 2e-5                                        # float32 rounding (the inputs are exact in float64)
            bad += not ok
            print(f"B={B} T={T} H={H} L={L} {dtype} strong={strong} {name}: {e:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
