"""Qwen2 on a GPU against Hugging Face ``transformers`` on the same random weights (run on a CUDA machine).

    python tests/gpu/verify_qwen2.py [--shapes tiny 0.5B 1.5B] [--dtypes bf16 fp16] [--steps 64] [--prompt-len 300]
                                     [--out FILE.md]

For each shape (``rwkv_chat.models.qwen2.shapes``: "tiny", and the official 0.5B / 1.5B / 7B shapes with random
weights written once as a checkpoint folder) and dtype, both engines load the same folder on ``cuda``:

* logits of a ``--prompt-len``-token prompt (300: the decode steps then attend over 512 cache positions, split): ‖ours − transformers‖ / ‖transformers‖ and top-1 agreement (PASS below
  2e-2 for bf16, 5e-3 for fp16: the rounding of one bf16/fp16 forward), and the same for 16 decode steps fed
  the reference's greedy tokens (teacher forcing) through our batched decoder;
* with ``kernels=False`` (pure torch) and ``kernels=True`` (the Triton ops where they run: ``fused.py``);
* decode speed at batch 1: ours (``model.decoder(1)``) and transformers (``model(..., past_key_values=...)`` one
  token at a time, SDPA attention), tokens/s over ``--steps`` steps after a warm-up.

Prints a Markdown table (and writes it to ``--out``). Imports on a machine without CUDA and says so.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.models.qwen2 import shapes  # noqa: E402
from rwkv_chat.models.qwen2.model import Qwen2  # noqa: E402
from rwkv_chat.models.qwen2.speed import cache_kwarg  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-5}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sync_time(fn, steps: int) -> float:
    """Seconds per call of ``fn`` over ``steps`` calls (CUDA synchronised)."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


@torch.no_grad()
def check(folder: Path, dtype: str, steps: int, device: str = "cuda", kernels: bool = True,
          prompt_len: int = 300, gemv: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    dt = DTYPES[dtype]
    ours = Qwen2(folder, f"{device} {dtype}", kernels=kernels)
    if kernels and gemv is not None:
        ours.use_kernels(gemv=gemv)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, attn_implementation="sdpa").to(device).eval()
    vocab = ours.vocab_size
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([prompt], device=device)
    kw = {cache_kwarg(hf): DynamicCache(), "use_cache": True}
    ref = hf(ids, **kw).logits[0].float()
    got, state = ours.forward(prompt, None, full_output=True)
    row = {"backend": str(ours.backend) + ("" if gemv is None else f", gemv {gemv}"), "prompt_rel": rel(got, ref),
           "prompt_top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
    dec = ours.decoder(1)
    h = dec.add(state)
    tok = int(ref[-1].argmax())
    errs, agree = [], 0
    for _ in range(16):
        r = hf(torch.tensor([[tok]], device=device), **kw).logits[0, -1].float()
        o = dec.step({h: tok})[h]
        errs.append(rel(o, r))
        agree += int(o.argmax()) == int(r.argmax())
        tok = int(r.argmax())
    row["decode_rel"], row["decode_top1"] = max(errs), agree / 16
    row["pass"] = max(row["prompt_rel"], row["decode_rel"]) < TOLERANCE[dtype]

    # speed, batch 1
    dec2 = ours.decoder(1)
    h2 = dec2.add(ours.forward(prompt[:16], None)[1])
    feed = {"t": 1}

    def ours_step():
        feed["t"] = int(dec2.step({h2: feed["t"]})[h2].argmax())

    for _ in range(5):
        ours_step()
    row["ours_tok_s"] = 1.0 / sync_time(ours_step, steps)
    hc = {"kw": {cache_kwarg(hf): DynamicCache(), "use_cache": True}, "t": 1}
    hf(torch.tensor([prompt[:16]], device=device), **hc["kw"])

    def hf_step():
        r = hf(torch.tensor([[hc["t"]]], device=device), **hc["kw"])
        hc["t"] = int(r.logits[0, -1].argmax())

    for _ in range(5):
        hf_step()
    row["hf_tok_s"] = 1.0 / sync_time(hf_step, steps)
    del ours, hf
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "0.5B", "1.5B"])
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=300,
                    help="prompt tokens (default 300: the decode steps attend over 512 cached positions, which "
                         "decode_attention splits along the positions; 128 or less takes its one-pass form)")
    ap.add_argument("--gemv", nargs="*", default=[], choices=["cublas", "triton", "compiled-norm"],
                    help="also check the kernels=True model with these products of 1..4 rows (Qwen2.use_kernels; "
                         "the default is compiled)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run of the script (fp32)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("verify_qwen2: CUDA is not available here; run it on a GPU machine")
        return 0
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    lines = [f"device: {gpu} · torch {torch.__version__}", "",
             "| shape | dtype | ours | prompt rel | prompt top-1 | decode rel | decode top-1 | ours tok/s "
             "| transformers tok/s | speed-up | check |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shapes:
            folder = shapes.write_random(Path(tmp) / name, name, torch.bfloat16, device=args.device)
            variants = [(False, None), (True, None)] + [(True, g) for g in args.gemv]
            for dtype, (kernels, gemv) in ((d, v) for d in args.dtypes for v in variants):
                r = check(folder, dtype, args.steps, args.device, kernels, args.prompt_len, gemv)
                ok &= r["pass"]
                lines.append(f"| {name} | {dtype} | {r['backend']} | {r['prompt_rel']:.2e} | {r['prompt_top1']:.3f} | "
                             f"{r['decode_rel']:.2e} | {r['decode_top1']:.3f} | {r['ours_tok_s']:.1f} | "
                             f"{r['hf_tok_s']:.1f} | {r['ours_tok_s'] / r['hf_tok_s']:.2f}x | "
                             f"{'PASS' if r['pass'] else 'FAIL'} |")
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
