"""Sampling on the logits' device against the host path (run on a CUDA machine).

    python tests/gpu/verify_sampling.py [--steps 40] [--threads 4] [--out results.md]

For vocabularies of 65,536 (World) and 151,936 (Qwen2), batches of 1, 16 and 64 rows and several sampler
settings (the defaults with their penalties, a low top_p, top_k with top_p 1, greedy with a presence penalty, a
repetition penalty with bans), two sets of samplers with the same seeds draw from the same float32 logits:
one from the rows on the GPU (``sample_rows``: penalties, softmax and sorted window there), once eagerly and once
through the CUDA graphs of the passes (the default; ``cuda_graphs=False``: eager), one from copies of the rows on the host (the CPU path). After every step the host samplers' state (counts, RNG) is copied into
the device ones, so each step is compared from the same state. Logits: Gaussian rows with scales 2-8 (peaked
like a trained model's, some flat).

Checked: in every setting, for both GPU forms, at most 1% of the draws differ (one where fewer than 100 are drawn): the device's
softmax and running sums round differently from the CPU's, which moves a draw only at a boundary. Prints a table with the agreement and the ms per step of both paths
(the host path's time includes the copy of the rows; ``--threads`` torch threads, as the daemon's default) and
exits 1 on a failed check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SETTINGS = {
    "defaults (T 1, top_p 0.85, penalties)": {},
    "top_p 0.3, T 0.7": dict(top_p=0.3, temperature=0.7),
    "top_k 40, top_p 1, T 1.2": dict(top_k=40, top_p=1.0, temperature=1.2),
    "greedy, presence 0.5": dict(temperature=0, alpha_presence=0.5),
    "repetition 1.2, bans": dict(repetition_penalty=1.2, top_p=0.9, token_ban=(0, 11)),
}


def run(vocab: int, batch: int, name: str, over: dict, steps: int) -> dict:
    import torch

    from rwkv_chat.models.text.batch_sampling import sample_rows
    from rwkv_chat.models.text.sampling import Sampler, SamplerArgs

    g = torch.Generator(device="cuda").manual_seed(vocab + batch)
    make = lambda: [Sampler(SamplerArgs(seed=100 + i, **over)) for i in range(batch)]  # noqa: E731
    dev, graphed, host = make(), make(), make()
    for s in dev + graphed + host:
        s._allocate(vocab)
        s.observe(range(1000, 1200))
    agree, agree_g, t_dev, t_graphs, t_host = 0, 0, 0.0, 0.0, 0.0
    for step in range(steps + 2):                          # two warm-up steps
        scale = torch.tensor([2.0 + 6.0 * ((i + step) % 4) / 3 for i in range(batch)], device="cuda")
        logits = torch.randn(batch, vocab, device="cuda", generator=g) * scale[:, None]
        rows = list(logits.half().float())                # fp16 logits, as a model's
        torch.cuda.synchronize()
        t = time.perf_counter()
        got = sample_rows(dev, rows, cuda_graphs=False)
        t1 = time.perf_counter()
        got_g = sample_rows(graphed, rows, cuda_graphs=True)
        t2 = time.perf_counter()
        want = sample_rows(host, list(torch.stack(rows).cpu()))
        t3 = time.perf_counter()
        if step >= 2:
            t_dev += t1 - t
            t_graphs += t2 - t1
            t_host += t3 - t2
            agree += sum(a == b for a, b in zip(got, want))
            agree_g += sum(a == b for a, b in zip(got_g, want))
        for d, g2, h in zip(dev, graphed, host):
            d.load_state_dict(h.state_dict())
            g2.load_state_dict(h.state_dict())
    n = steps * batch
    return dict(vocab=vocab, batch=batch, name=name, agree=agree, agree_graphs=agree_g, n=n,
                ms_dev=1e3 * t_dev / steps, ms_graphs=1e3 * t_graphs / steps, ms_host=1e3 * t_host / steps)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    from rwkv_chat.app.bench import provenance
    from tests.gpu.report import finish

    torch.set_num_threads(args.threads)
    lines = [*provenance(device="cuda"), "",
             f"Sampling on the GPU (`sample_rows` on CUDA rows) against the host path (the rows copied, then the "
             f"CPU), same seeds and state each step; {args.steps} steps, {args.threads} torch threads. \"graphs\": "
             f"the same passes replayed as CUDA graphs (the default; eager: `cuda_graphs=False`; the first step of a shape captures and "
             f"probes it).", "",
             "| vocab | rows | setting | draws agreeing (eager / graphs) | GPU ms/step eager | GPU ms/step graphs | "
             "host ms/step | host / best GPU | result |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    ok = True
    for vocab in (65536, 151936):
        for batch in (1, 16, 64):
            for name, over in SETTINGS.items():
                r = run(vocab, batch, name, over, args.steps)
                good = min(r["agree"], r["agree_graphs"]) >= r["n"] - max(1, 0.01 * r["n"])
                ok &= good
                best = min(r["ms_dev"], r["ms_graphs"])
                lines.append(f"| {vocab} | {batch} | {name} | {r['agree']} / {r['agree_graphs']} of {r['n']} | "
                             f"{r['ms_dev']:.2f} | {r['ms_graphs']:.2f} | {r['ms_host']:.2f} | "
                             f"{r['ms_host'] / best:.1f}x | {'pass' if good else 'FAIL'} |")
                print(lines[-1], flush=True)
    from rwkv_chat.models.text import batch_sampling
    kept = {k: e.whole not in (None, False) for g in batch_sampling._GRAPHS.values() for k, e in g.graphs.items()}
    eager = sorted({k for g in batch_sampling._GRAPHS.values() for k in g.eager})
    lines += ["", f"Graphs kept (rows bucket, vocab, entries cap) -> whole-row graph too: {kept or 'none'}; "
              f"shapes left eager (capture failed or the probe differed): {eager or 'none'}."]
    return finish(lines, args.out, ok)


if __name__ == "__main__":
    sys.exit(main())
