"""A tiny random Qwen2 and Qwen3 (``transformers``, fp16 on the CPU) with the Triton ops of ``fused.py`` run in
Triton's interpreter, against the same model on its torch ops: a 297-token prefill (``rmsnorm`` with the residual,
``rope`` / ``qk_norm_rope``, the cuBLAS + ``silu_mul`` side of the gated MLP) and three decode steps over 512 cache
positions (``rope_attention``: RoPE, cache write and attention split along the positions, and the projections of the step with their
RMSNorms through ``norm_gemv``: q|k|v with bias, o, gate|up with SwiGLU, down; the final norm with the head). The autotuned gated-MLP kernel cannot
run in the interpreter: a torch product stands in for it (its reading of the packed gate|up halves is the same
call); ``tests/gpu/verify_ops.py`` checks it on a GPU.

    pip install triton && python tests/gpu/interpret_qwen2_model.py

Prints the relative error of the logits per case; exit status 1 when one exceeds 1e-2 or a top-1 token differs.
"""

import importlib
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import interpreter  # noqa: E402,F401  (switches Triton's interpreter on before triton is imported)
from interpreter import rel  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

import torch  # noqa: E402

from rwkv_chat.models import ops  # noqa: E402
from rwkv_chat.models.ops import _checks, _triton, decode, prenorm  # noqa: E402
from rwkv_chat.models.qwen2 import fused  # noqa: E402
from rwkv_chat.models.qwen2.model import Qwen2  # noqa: E402
from tests.models.qwen2.conftest import build  # noqa: E402


def triton_ops(base):
    def gated_product(x, gate, up):         # stands in for the autotuned fused_gated_mlp (module docstring)
        return torch.nn.functional.silu(x @ gate.t()) * (x @ up.t())

    return replace(base, rmsnorm=fused._rmsnorm(ops.rmsnorm), rope=fused._rope(ops.rope),
                   qk_norm_rope=fused._qk_norm_rope(ops.qk_norm_rope),
                   gated_mlp=fused._gated(gated_product, ops.silu_mul, base.gated_mlp),
                   rope_store=ops.rope_store, decode_attention=ops.decode_attention,
                   rope_attention=ops.rope_attention,
                   linear=fused._linear(counted), norm_linear=fused._norm_linear(counted),
                   norm_gated_mlp=fused._norm_gated(counted))


LAUNCHES = {"norm_gemv": 0}


def counted(*args, **kw):
    LAUNCHES["norm_gemv"] += 1
    return ops.norm_gemv(*args, **kw)


def run(model, prompt):
    logits, state = model.forward(prompt, None)
    dec = model.decoder(2, graphs=False)
    h = dec.add(state)
    return [logits.float()] + [dec.step({h: t})[h].float().clone() for t in (5, 6, 7)]


def main() -> int:
    _checks.check_cuda = prenorm.check_cuda = lambda tensors: None
    _triton.kernels = prenorm.triton_kernels = lambda module, op: importlib.import_module(module)
    prenorm._sms = lambda device: 4
    on_cuda = fused._gemv_ok                          # the decode products take CPU tensors here
    fused._gemv_ok = lambda x, w: on_cuda(x, w) or (x.device.type == "cpu" and isinstance(w, torch.Tensor)
                                                    and w.dtype == x.dtype == torch.float16 and w.t().is_contiguous()
                                                    and x.numel() <= fused.GEMV_ROWS * x.shape[-1])
    decode._sms = lambda device: 4                    # few "multiprocessors": the decode attention splits
    bad = 0
    for kind, kw in (("qwen2", {}), ("qwen3", dict(head_dim=32, attention_bias=True))):
        with tempfile.TemporaryDirectory() as folder:
            build(kind, seed=1, max_position_embeddings=1024, **kw).save_pretrained(folder)
            model = Qwen2(folder, "cpu fp16", kernels=False)
            prompt = list(range(3, 300))
            want = run(model, prompt)
            model.backend.ops = triton_ops(model.backend.ops)
            LAUNCHES["norm_gemv"] = 0
            got = run(model, prompt)
        # 3 decode steps, 4 products per layer (prefill: cuBLAS), and the final norm + head of one row in each of
        # the 4 forwards (the prefill's last position and the 3 steps)
        want_launches = 3 * 4 * model.n_layer + 4
        print(f"{kind}: norm_gemv launches {LAUNCHES['norm_gemv']} (want {want_launches})")
        bad += LAUNCHES["norm_gemv"] != want_launches
        for name, a, b in zip(("prefill", "decode 1", "decode 2", "decode 3"), got, want):
            e, same = rel(a, b), int(a.argmax()) == int(b.argmax())
            bad += not (e < 1e-2 and same)
            print(f"{kind} {name}: logits rel {e:.2e}, top-1 {'same' if same else 'DIFFERS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
