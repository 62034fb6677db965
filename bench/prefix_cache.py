"""What the daemon's prefix cache saves on the next turn of a stateless chat (run on a GPU; CPU works too).

    python bench/prefix_cache.py --shape 1.5B --strategy "cuda fp16" --history 512 1024 2048 4096 --new 32

Random weights of an official RWKV-7 shape. A conversation of ``history`` tokens was answered; its next request
repeats it and adds ``new`` tokens. Per history length: the prefill of the whole request (no cache), the
lookup in :class:`~rwkv_chat.daemon.prefix_cache.PrefixCache` (hashing the prompt, the private copy of the
state) plus the prefill of the new tokens only, and the bytes one entry holds (state and logits). Times are the
median of 5 (CUDA synchronized). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, device: str, reps: int = 5) -> float:
    fn()
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def run(shape: str, strategy: str, histories: list[int], new: int) -> list[str]:
    from rwkv_chat.daemon.prefix_cache import PrefixCache
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv import shapes

    device = strategy.split()[0]
    dtype = torch.float16 if "fp16" in strategy else torch.bfloat16 if "bf16" in strategy else torch.float32
    w = shapes.random_checkpoint(shape, dtype=dtype, device=device)
    model = RWKV(model=w, strategy=strategy)
    del w
    g = torch.Generator().manual_seed(0)
    lines = [f"prefix cache, RWKV-7 {shape}, `{strategy}`, {new} new tokens per request "
             f"(`python bench/prefix_cache.py --shape {shape} --strategy \"{strategy}\" "
             f"--history {' '.join(map(str, histories))} --new {new}`)", "",
             "| history tokens | whole prompt ms | lookup + copy ms | new tokens ms | speed-up | entry MiB |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n in histories:
        toks = torch.randint(0, model.vocab_size, (n + new,), generator=g).tolist()
        cache = PrefixCache(1 << 40)
        logits, state = model.forward(toks[:n], None)
        cache.store(toks[:n], model.fingerprint, state, logits)
        entry = cache.stats()["bytes"] / 2**20
        whole = _median_ms(lambda: model.forward(toks, None), device)
        look = _median_ms(lambda: cache.lookup(toks, model.fingerprint), device)
        hit = cache.lookup(toks, model.fingerprint)
        assert hit.length == n
        rest = _median_ms(lambda: model.forward(toks[n:], hit.state.clone()), device)
        lines.append(f"| {n} | {whole:.1f} | {look:.2f} | {rest:.1f} | {whole / (look + rest):.1f}x | {entry:.1f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="0.1B", help="official RWKV-7 shape (0.1B, 0.4B, 1.5B, 2.9B, 7.2B)")
    ap.add_argument("--strategy", default="cuda fp16" if torch.cuda.is_available() else "cpu fp32")
    ap.add_argument("--history", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()
    print("\n".join(run(args.shape, args.strategy, args.history, args.new)))


if __name__ == "__main__":
    main()
