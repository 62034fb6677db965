"""Speed of a Qwen2 model: decode at several batch sizes and prefill, with Hugging Face ``transformers`` as the peer
(``rwkv-chat bench --family qwen2``; the ceilings come from the caller).

Definitions (per shape, one strategy):

* decode at batch B through ``model.decoder(B)`` (CUDA graphs on one GPU) after a ``context``-token prompt per slot,
  the same token fed to every slot: tokens/s = B / step time; bytes per step = every weight the step reads (layers,
  final norm, head; not the embedding table) + the KV cache read; TFLOP/s = 2 · weights · B / step time;
* prefill of T tokens through ``model.forward``: tokens/s, and TFLOP/s =
  (2 · weights · T + 2 · 2 · layers · H·D · T²/2) / time (the causal attention products counted once);
* the peer: ``transformers`` (``AutoModelForCausalLM``, SDPA attention, ``DynamicCache``) on the same folder, batch-1
  decode and the same prefill.

Times are medians (prefill) or means over many steps (decode), synchronised on CUDA.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from rwkv_chat.models import formats


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up (synchronised on CUDA)."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, dev: torch.device) -> float:
    """Measured dense matmul TFLOP/s in ``dtype`` (8192³ on CUDA, 1024³ elsewhere)."""
    n = 8192 if dev.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, dev, 10) / 1e12


def cache_kwarg(hf) -> str:
    """The keyword a ``transformers`` model takes its KV cache by ("cache" from 5.x on, else "past_key_values")."""
    import inspect

    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def _nbytes(w) -> int:
    if isinstance(w, tuple):                     # parts kept apart at load (weights.py)
        return sum(_nbytes(t) for t in w)
    return w.numel() * w.element_size() if isinstance(w, torch.Tensor) else formats.nbytes(w)


def weight_bytes(model) -> int:
    """Bytes of every weight a decode step reads (layers, final norm, head; not the embedding table)."""
    return sum(_nbytes(w) for p in model.layers for w in p.values()) + _nbytes(model.norm) + _nbytes(model.head)


def weights(model) -> int:
    """Multiply-accumulate weights per token (layers and head)."""
    c = model.config
    layer = c.hidden_size * (2 * c.q_dim + 2 * c.kv_dim) + 3 * c.hidden_size * c.intermediate_size
    return c.n_layer * layer + c.hidden_size * c.vocab_size


@torch.no_grad()
def decode_speed(model, batch: int, tokens: int, context: int = 64) -> dict:
    """``{"tok_s", "gb_s", "tflops"}`` of decode steps at ``batch`` (module docstring)."""
    dev = model.devices[0]
    _, state = model.forward([1 + i % 100 for i in range(context)], None)
    dec = model.decoder(batch)
    feed = {dec.add(state): 7 for _ in range(batch)}
    for _ in range(5):
        dec.step(feed)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(tokens):
        dec.step(feed)
    _sync(dev)
    step = (time.perf_counter() - t0) / tokens
    c = model.config
    kv = batch * (context + 5 + tokens // 2) * c.n_layer * 2 * c.kv_dim * model.emb.element_size()
    return {"tok_s": batch / step, "gb_s": (weight_bytes(model) + kv) / step / 1e9,
            "tflops": 2 * weights(model) * batch / step / 1e12}


@torch.no_grad()
def prefill_speed(model, length: int) -> dict:
    """``{"tok_s", "tflops"}`` of one forward of ``length`` tokens from an empty cache."""
    ids = torch.randint(0, model.vocab_size, (length,), generator=torch.Generator().manual_seed(0)).tolist()
    t = timed(lambda: model.forward(ids, None), model.devices[0])
    c = model.config
    attn = 2 * 2 * c.n_layer * c.q_dim * length * length / 2
    return {"tok_s": length / t, "tflops": (2 * weights(model) * length + attn) / t / 1e12}


@torch.no_grad()
def peer_speed(folder: Path, dtype: torch.dtype, dev: torch.device, tokens: int, length: int) -> dict:
    """``{"decode_tok_s", "prefill_tok_s"}`` of ``transformers`` on the same folder (batch-1 decode)."""
    from transformers import AutoModelForCausalLM, DynamicCache

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, max(length, 64)), device=dev)
    pre = timed(lambda: hf(ids[:, :length], use_cache=False), dev, 3) if length else None
    kw = {cache_kwarg(hf): DynamicCache(), "use_cache": True}
    hf(ids[:, :64], **kw)
    one = torch.tensor([[7]], device=dev)
    for _ in range(5):
        hf(one, **kw)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(tokens):
        hf(one, **kw)
    _sync(dev)
    out = {"decode_tok_s": tokens / (time.perf_counter() - t0), "prefill_tok_s": length / pre if pre else None}
    del hf
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table_rows(name: str, model, batches: list[int], prompt_len: int, tokens: int, ceiling: float, peak: float,
               peer: dict | None) -> list[str]:
    """Markdown rows ``| model | what | ours tok/s | GB/s (% copy) | TFLOP/s (% matmul) | peer tok/s | ours/peer |``
    for decode at each batch and the prefill (``ceiling``: copy GB/s, ``peak``: matmul TFLOP/s)."""
    rows = []
    for b in batches:
        r = decode_speed(model, b, tokens)
        p = peer["decode_tok_s"] if peer and b == 1 else None
        rows.append((f"decode b={b}", r["tok_s"], f"{r['gb_s']:.1f} ({100 * r['gb_s'] / ceiling:.0f}%)",
                     f"{r['tflops']:.2f} ({100 * r['tflops'] / peak:.0f}%)", p))
    if prompt_len:
        r = prefill_speed(model, prompt_len)
        rows.append((f"prefill {prompt_len}", r["tok_s"], "", f"{r['tflops']:.2f} ({100 * r['tflops'] / peak:.0f}%)",
                     peer["prefill_tok_s"] if peer else None))
    return [f"| {name} | {what} | {tok_s:.1f} | {gbs} | {tfl} | {'' if p is None else f'{p:.1f}'} | "
            f"{'' if p is None else f'{tok_s / p:.2f}x'} |" for what, tok_s, gbs, tfl, p in rows]


HEADER = ["| model | what | ours tok/s | GB/s (% copy) | TFLOP/s (% matmul) | transformers tok/s | ours / peer |",
          "|---|---|---|---|---|---|---|"]
