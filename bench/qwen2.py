"""Qwen2 speed on a GPU: decode (batch 1 and more) and prefill on random weights of the official shapes, with the
measured ceilings and Hugging Face ``transformers`` as the peer in the same run.

    python bench/qwen2.py --shape 0.5B 1.5B 7B [--dtype bf16] [--batch 1 64] [--prompt-len 1024] [--tokens 100]
                          [--no-peer] [--md bench/results/h200.md]

Per shape (``rwkv_chat.models.qwen2.shapes``, written once as a checkpoint folder):

* ceilings measured here: device copy bandwidth (``app.bench.copy_bandwidth``, bytes read + written) and the dense
  matmul peak (8192³ in the dtype, cuBLAS);
* decode at each batch B through ``model.decoder(B)`` (CUDA graph per bucket) after a 64-token prompt per slot:
  tokens/s, GB/s (every weight a step reads, the embedding row aside, plus the KV cache read) and its share of the
  copy ceiling, TFLOP/s (2 · parameters · B per step);
* prefill of ``--prompt-len`` tokens (``model.forward``): tokens/s, TFLOP/s (2 · parameters · T + attention) and
  its share of the matmul peak;
* the peer: ``transformers`` (SDPA attention, ``DynamicCache``) on the same folder, batch-1 decode and prefill.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rwkv_chat.app.bench import copy_bandwidth, provenance  # noqa: E402
from rwkv_chat.models import formats  # noqa: E402
from rwkv_chat.models.qwen2 import shapes  # noqa: E402
from rwkv_chat.models.qwen2.model import Qwen2  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` synchronised runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype) -> float:
    """Measured dense matmul TFLOP/s (8192³)."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, 10) / 1e12


def weight_bytes(model: Qwen2) -> int:
    """Bytes of every weight a decode step reads (layers, final norm, head; not the embedding table)."""
    total = sum(formats.nbytes(w) if not isinstance(w, torch.Tensor) else w.numel() * w.element_size()
                for p in model.layers for w in p.values())
    head = model.head
    return total + model.norm.numel() * model.norm.element_size() + (
        head.numel() * head.element_size() if isinstance(head, torch.Tensor) else formats.nbytes(head))


def params(model: Qwen2) -> int:
    """Multiply-accumulate weights per token (layers and head)."""
    c = model.config
    per_layer = c.hidden_size * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.hidden_size + 3 * c.hidden_size * \
        c.intermediate_size
    return c.n_layer * per_layer + c.hidden_size * c.vocab_size


@torch.no_grad()
def decode(model: Qwen2, batch: int, tokens: int, context: int = 64) -> dict:
    _, state = model.forward(list(range(1, context + 1)), None)
    dec = model.decoder(batch)
    handles = [dec.add(state) for _ in range(batch)]
    feed = {h: 7 for h in handles}
    for _ in range(5):
        dec.step(feed)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):
        dec.step(feed)
    torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / tokens
    c = model.config
    kv = batch * (context + 5 + tokens // 2) * c.n_layer * 2 * c.kv_dim * model.emb.element_size()
    return {"tok_s": batch / step, "gb_s": (weight_bytes(model) + kv) / step / 1e9,
            "tflops": 2 * params(model) * batch / step / 1e12}


@torch.no_grad()
def prefill(model: Qwen2, length: int) -> dict:
    ids = torch.randint(0, model.vocab_size, (length,)).tolist()
    t = timed(lambda: model.forward(ids, None), 5)
    c = model.config
    attn = 2 * 2 * c.n_layer * c.q_dim * length * length / 2        # causal q·k and p·v
    return {"tok_s": length / t, "tflops": (2 * params(model) * length + attn) / t / 1e12}


@torch.no_grad()
def peer(folder: Path, dtype: torch.dtype, tokens: int, length: int) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").cuda().eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, length), device="cuda")
    pre = timed(lambda: hf(ids, use_cache=False), 3)
    cache = DynamicCache()
    hf(ids[:, :64], past_key_values=cache, use_cache=True)
    one = torch.tensor([[7]], device="cuda")
    for _ in range(5):
        hf(one, past_key_values=cache, use_cache=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(tokens):
        hf(one, past_key_values=cache, use_cache=True)
    torch.cuda.synchronize()
    out = {"decode_tok_s": tokens / (time.perf_counter() - t0), "prefill_tok_s": length / pre}
    del hf
    torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", default=["1.5B"], choices=sorted(shapes.SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--no-peer", action="store_true", help="skip transformers")
    ap.add_argument("--md", type=Path, help="append the table to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/qwen2.py: CUDA is not available here; run it on a GPU machine")
        return 0
    dt = DTYPES[args.dtype]
    dev = torch.device("cuda")
    ceiling, peak = copy_bandwidth(dev), matmul_peak(dt)
    lines = [f"### Qwen2 ({args.dtype}, random weights of the official shapes)", "", provenance(argv),
             f"ceilings: copy {ceiling:.0f} GB/s, {args.dtype} matmul {peak:.0f} TFLOP/s", "",
             "| shape | what | ours tok/s | GB/s (% copy) | TFLOP/s (% matmul) | transformers tok/s | ours / peer |",
             "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.shape:
            folder = shapes.write_random(Path(tmp) / name, name, dt, device="cuda")
            model = Qwen2(folder, f"cuda {args.dtype}")
            ref = None if args.no_peer else peer(folder, dt, args.tokens, args.prompt_len)
            rows = []
            for b in args.batch:
                r = decode(model, b, args.tokens)
                p = ref["decode_tok_s"] if ref and b == 1 else None
                rows.append((f"decode b={b}", r["tok_s"], f"{r['gb_s']:.0f} ({100 * r['gb_s'] / ceiling:.0f}%)",
                             f"{r['tflops']:.1f} ({100 * r['tflops'] / peak:.0f}%)", p))
            if args.prompt_len:
                r = prefill(model, args.prompt_len)
                rows.append((f"prefill {args.prompt_len}", r["tok_s"], "", f"{r['tflops']:.0f} "
                             f"({100 * r['tflops'] / peak:.0f}%)", ref["prefill_tok_s"] if ref else None))
            for what, tok_s, gbs, tfl, p in rows:
                lines.append(f"| {name} | {what} | {tok_s:.1f} | {gbs} | {tfl} | {'' if p is None else f'{p:.1f}'} "
                             f"| {'' if p is None else f'{tok_s / p:.2f}x'} |")
                print(lines[-1], flush=True)
            print(f"{name}: backend {model.backend}", flush=True)
            del model
            torch.cuda.empty_cache()
    text = "\n".join(lines)
    print(text)
    if args.md:
        with open(args.md, "a") as f:
            f.write(text + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
