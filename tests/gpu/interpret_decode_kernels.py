"""The decode-step Triton kernels (``rope_store``, ``decode_attention`` with and without splits, and ``rope_attention``,
both in one launch; the gated-MLP kernel in each kind of config its small-M launcher autotunes over) run in Triton's
interpreter on the CPU, through their Python wrappers, against the torch forms of ``models/qwen2/layers.py``
(indexing, per-row positions, GQA grouping, masking of the last tile, the split combine), without a GPU (the CUDA
code generation itself is checked by ``tests/gpu/verify_ops.py``).

    pip install triton && python tests/gpu/interpret_decode_kernels.py

The wrappers' CUDA checks are bypassed here (the interpreter takes CPU tensors). Prints the error of each case and
exits 1 when one exceeds its tolerance (fp16 inputs, fp32 inside on both sides).
"""

import sys

import interpreter  # noqa: E402,F401  (switches Triton's interpreter on before triton is imported)
from interpreter import rel  # noqa: E402

import torch  # noqa: E402

from rwkv_chat.models.ops import decode  # noqa: E402
from rwkv_chat.models.qwen2 import layers  # noqa: E402


def main() -> int:
    interpreter.bypass_device_checks()
    decode._sms = lambda device: 4                    # few "multiprocessors": splits on short caches
    torch.manual_seed(0)
    dt = torch.float16                    # the interpreter's tl.dot mishandles bfloat16 (numpy has none)
    bad = 0
    for b, H, K, D, cap, norm in ((3, 4, 2, 64, 96, False), (2, 12, 2, 128, 300, True), (4, 7, 1, 32, 40, False)):
        cos, sin = (t.to(dt) for t in layers.rope_table(1e4, D, cap + 1))
        lens = torch.randint(0, cap, (b,))
        lens[0] = 0
        qkv = torch.randn(b, (H + 2 * K) * D).to(dt)
        kc, vc = torch.randn(b + 1, K, cap, D).to(dt), torch.randn(b + 1, K, cap, D).to(dt)
        w = (torch.randn(D).to(dt) * 0.1 + 1, torch.randn(D).to(dt) * 0.1 + 1) if norm else (None, None)
        caches = [(kc.clone(), vc.clone()) for _ in range(2)]
        q_ref = layers.rope_store(qkv, cos, sin, lens, *caches[0], H, *w, 1e-6)
        q = decode.rope_store(qkv, cos, sin, lens, *caches[1], H, *w, 1e-6)
        errs = {"rope_store q": rel(q, q_ref), "k cache": rel(caches[1][0], caches[0][0]),
                "v cache": rel(caches[1][1], caches[0][1])}
        ref = layers.decode_attention(q_ref.float(), caches[0][0].float(), caches[0][1].float(), lens)
        for splits in (1, None, 3):
            out = decode.decode_attention(q_ref, *caches[0], lens, splits=splits)
            errs[f"decode_attention splits={splits or decode.splits_for(b, K, cap, None)}"] = rel(out, ref)
            fused = (kc.clone(), vc.clone())
            out = decode.rope_attention(qkv, cos, sin, lens, *fused, H, *w, 1e-6, splits=splits)
            errs[f"rope_attention splits={splits or decode.splits_for(b, K, cap, None)}"] = rel(out, ref)
            errs[f"rope_attention k cache splits={splits}"] = rel(fused[0], caches[1][0])
            errs[f"rope_attention v cache splits={splits}"] = rel(fused[1], caches[1][1])
        for name, e in errs.items():
            ok = e < 1e-2
            bad += not ok
            print(f"b={b} H={H} K={K} D={D} cap={cap} norm={norm} {name}: {e:.2e} {'ok' if ok else 'FAIL'}")
    return bad_gated(dt, bad)


def bad_gated(dt, bad: int) -> int:
    """``gated_mlp_kernel`` launched with one mma config and every CUDA-core config (1, 2, 4 rows) of the small
    launcher, on odd shapes (K and N not multiples of the tiles), against the fp32 torch form."""
    from rwkv_chat.models.ops import _gated_mlp_kernels as G
    from tests.models.ops.reference import ref_gated_mlp

    names = {G.SILU: "silu", G.GELU: "gelu", G.GELU_TANH: "gelu_tanh"}
    seen = set()
    for cfg in [G.SMALL_CONFIGS[0]] + G.GEMV_CONFIGS:
        meta = dict(cfg.kwargs)
        key = (meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"], meta["DOT"])
        if key in seen:                   # num_stages does not change what the interpreter computes
            continue
        seen.add(key)
        for m in sorted({1, meta["BLOCK_M"]} if not meta["DOT"] else {1, 3}):
            act = (G.SILU, G.GELU, G.GELU_TANH)[m % 3]
            k, n = 300, 37
            x = torch.randn(m, k).to(dt)
            g, u = (torch.randn(n, k) * k ** -0.5).to(dt), (torch.randn(n, k) * k ** -0.5).to(dt)
            o = torch.empty(m, n, dtype=dt)
            grid = (-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]),)
            G.gated_mlp_kernel[grid](x, g, u, o, m, n, k, m, x.stride(0), g.stride(0), o.stride(0), ACT=act, **meta)
            e = rel(o, ref_gated_mlp(x, g, u, names[act]))
            ok = e < 1e-2
            bad += not ok
            print(f"gated_mlp {meta} M={m} {names[act]}: {e:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
