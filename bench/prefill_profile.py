"""Where the time of one RWKV-7 prefill goes, and the WKV-7 sequence kernels side by side (run on a GPU).

    python bench/prefill_profile.py --shape 1.5B --prompt-len 1024 [--out prefill_profile.md]

Random weights of an official RWKV-7 shape, ``cuda fp16``. Part 1: ``torch.profiler`` over one
``RWKV.forward`` of the prompt (after two warm-up runs); per kernel name the launches and the summed
device time, largest first, and the sum of all kernels against the wall time. Part 2: the WKV-7 of one
layer on fresh random inputs of the prompt's shape ([1, T, H, 64], decays in RWKV-7's range): the
compiled sequential kernel, the compiled chunked kernel (when built) and the pure-torch chunked form
(``models/rwkv/chunked.py``) per chunk length, each timed with CUDA events (median of 20), with the relative
error of y and of the final state against a float64 run of the sequential recurrence.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def _time(fn, reps: int = 20) -> float:
    """Median device time of fn() in microseconds (CUDA events, one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        torch.cuda.synchronize()
        out.append(e0.elapsed_time(e1) * 1e3)
    return statistics.median(out)


def profile_prefill(shape: str, T: int, lines: list[str]) -> None:
    from rwkv_chat.models import RWKV
    from rwkv_chat.models.rwkv import shapes

    w = shapes.random_checkpoint(shape, dtype=torch.float16, device="cuda")
    model = RWKV(model=w, strategy="cuda fp16")
    del w
    torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(0, model.vocab_size, (T,), generator=g).tolist()
    for _ in range(2):
        model.forward(toks, None)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    model.forward(toks, None)
    e1.record()
    torch.cuda.synchronize()
    wall_ms = e0.elapsed_time(e1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model.forward(toks, None)
        torch.cuda.synchronize()
    agg: dict[str, list[float]] = defaultdict(list)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            agg[ev.name].append(ev.device_time)
    total = sum(sum(v) for v in agg.values())
    lines += [f"### {shape} prefill of {T} tokens, `cuda fp16`, {torch.cuda.get_device_name()}", "",
              f"wall (events around forward): {wall_ms:.2f} ms = {T / wall_ms * 1e3:.0f} tok/s; "
              f"sum of kernel times: {total / 1e3:.2f} ms", "",
              "| kernel | launches | total ms | share |", "|---|---|---|---|"]
    for name, v in sorted(agg.items(), key=lambda kv: -sum(kv[1]))[:25]:
        lines.append(f"| `{name[:90]}` | {len(v)} | {sum(v) / 1e3:.3f} | {sum(v) / total:.1%} |")
    lines.append("")


def _wkv_inputs(T: int, H: int, N: int = 64, dtype=torch.float16):
    g = torch.Generator(device="cuda").manual_seed(T * 131 + H)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")   # noqa: E731
    r, k, v = (rnd(1, T, H, N).to(dtype) for _ in range(3))
    kk = torch.nn.functional.normalize(rnd(1, T, H, N), dim=-1)
    a_gate = torch.sigmoid(rnd(1, T, H, N))
    a, b = (-kk).to(dtype), (kk * a_gate).to(dtype)
    w = torch.exp(-0.606531 * torch.sigmoid(rnd(1, T, H, N))).float()
    s = rnd(1, H, N, N) * 0.1
    return r, w, k, v, a, b, s


def _wkv7_f64(r, w, k, v, a, b, s):
    """The sequential recurrence in float64 (the formula of ``wkv.wkv7_torch``)."""
    r, w, k, v, a, b = (x.double()[0] for x in (r, w, k, v, a, b))
    S = s.double()[0].clone()
    ys = []
    for t in range(r.shape[0]):
        sa = (S @ a[t].unsqueeze(-1))                                   # [H, V, 1]
        S = S * w[t].unsqueeze(-2) + sa @ b[t].unsqueeze(-2) + v[t].unsqueeze(-1) @ k[t].unsqueeze(-2)
        ys.append((S @ r[t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(ys).unsqueeze(0), S.unsqueeze(0)


def _rel(x, ref) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def compare_wkv(T: int, H: int, lines: list[str]) -> None:
    from rwkv_chat.models import kernels
    from rwkv_chat.models.rwkv import chunked as prefill

    kernels.ensure_built("cuda")
    r, w, k, v, a, b, s = _wkv_inputs(T, H)
    y64, s64 = _wkv7_f64(r, w, k, v, a, b, s)
    rows = [("compiled sequential (`wkv7_cuda`)", lambda: kernels.wkv7(r, w, k, v, a, b, s, chunk=0))]
    for L in (16, 32):
        rows.append((f"compiled chunked L={L} (`wkv7_chunk_cuda`)",
                     (lambda L=L: kernels.wkv7(r, w, k, v, a, b, s, chunk=L))))
    for L in (16, 32, 64):
        rows.append((f"torch chunked L={L} (`prefill.wkv7_chunked`)",
                     (lambda L=L: prefill.wkv7_chunked(r, w, k, v, a, b, s, chunk=L))))
    lines += [f"### WKV-7 of one layer, B=1 T={T} H={H} N=64, fp16 inputs, fp32 state ({torch.cuda.get_device_name()})",
              "", "| path | us | y rel. err vs f64 | state rel. err vs f64 |", "|---|---|---|---|"]
    for name, fn in rows:
        try:
            y, s_out = fn()
            us = _time(fn)
            lines.append(f"| {name} | {us:.1f} | {_rel(y, y64):.2e} | {_rel(s_out, s64):.2e} |")
        except Exception as e:  # noqa: BLE001 - a failing variant is reported, the others still run
            lines.append(f"| {name} | failed: {type(e).__name__}: {str(e)[:120]} | | |")
    lines.append("")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.5B")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--wkv-only", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    from rwkv_chat.app.bench import provenance

    lines: list[str] = [*provenance(argv, "python3 bench/prefill_profile.py"), ""]
    heads = {"0.1B": 12, "0.4B": 16, "1.5B": 32, "2.9B": 40, "7.2B": 64}[args.shape]
    compare_wkv(args.prompt_len, heads, lines)
    for T, H in ((64, heads), (256, heads), (4096, 12), (1024, 64)):
        compare_wkv(T, H, lines)
    if not args.wkv_only:
        profile_prefill(args.shape, args.prompt_len, lines)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
