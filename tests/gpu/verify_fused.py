"""The fused RWKV-7 CUDA paths (``models/backends/fused_cuda.py``) against the plain torch path (run on a GPU machine).

    python tests/gpu/verify_fused.py [--shape 0.1B] [--strategies "cuda fp16i4" ...] [--out results.md]

Random weights of an official RWKV-7 shape. Two models share the weights: one with the compiled
kernels and the fused paths, one built with ``kernels=False`` whose blocks run the eager torch code
(``models/rwkv/v7.py``). Checked, relative error ‖a − b‖ / ‖b‖ of fp16 logits and states <= 1e-2 (the prefill
logits against the eager ones: or twice the eager path's own error against an fp32 eager model of the same
weights, where that is larger):
prefill (64 tokens, full output) and decode steps through ``BatchDecoder`` (CUDA graphs) at batch
1 and 3 (grouped GEMV, "ours" and "cublas") and 8 (cuBLAS GEMM; WKV fused or row-split; or the torch.compile'd step), and fp16i8
(grouped mm8 GEMV at 1 and 3 rows); the prefill CUDA graph bit-identical to the eager prefill. The channel-mix
value product (the compiled row kernel ``dispatch.ffn_rows``, fp16 and bf16, i8 weights with fp16 / bf16 activations and f8 weights
with fp16: uint8 / e4m3 rows, relu² taken as it loads k): decode steps with the zero rows of relu(k)² skipped
(``ffn="sparse"``) give the same logits and states (``torch.equal``) as the same kernel reading every row
(``ffn="dense"``) at batch 1 and 4, and agree with the grouped GEMV on the output-major matrix
(``FusedCuda(ffn="gemv")``) to TOL; the share of rows skipped is printed per batch. Exit status 1 on a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from rwkv_chat.app.bench import provenance  # noqa: E402
from rwkv_chat.models import RWKV, kernels  # noqa: E402
from rwkv_chat.models.rwkv import shapes  # noqa: E402
from tests.gpu.report import finish  # noqa: E402
from rwkv_chat.models.rwkv.decode import BatchDecoder  # noqa: E402
from rwkv_chat.models.backends.persistent_step import PREFETCH  # noqa: E402

TOL = 1e-2


def rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def state_rel(s1, s2) -> float:
    return max(rel(a.float(), b.float()) for l1, l2 in zip(s1.layers, s2.layers) for a, b in zip(l1, l2))


def decode_run(model, state, batch, steps, **kw):
    dec = BatchDecoder(model, max_batch=batch, **kw)
    hs = [dec.add(state) for _ in range(batch)]
    outs = []
    for t in range(steps):
        out = dec.step({h: (31 * t + 7 * j) % model.vocab_size for j, h in enumerate(hs)})
        outs.append(torch.stack([out[h].float().clone() for h in hs]))
    return torch.stack(outs), dec.state(hs[-1]), dec


def decode_all(model, state, batch, steps, **kw):
    """Decode ``steps`` tokens for ``batch`` copies of state through a ``BatchDecoder``: (logits float32
    [steps, batch, vocab], every row's final State)."""
    dec = BatchDecoder(model, max_batch=batch, **kw)
    hs = [dec.add(state) for _ in range(batch)]
    outs = []
    for t in range(steps):
        out = dec.step({h: (31 * t + 7 * j) % model.vocab_size for j, h in enumerate(hs)})
        outs.append(torch.stack([out[h].float().clone() for h in hs]))
    return torch.stack(outs), [dec.state(h) for h in hs]


def skipped_share(model, state, batch, steps=3) -> float:
    """The mean share of rows of the value matrices that the sparse product skips over ``steps`` decode steps
    (eager steps, no CUDA graph: each value product's h is read on the host)."""
    model.backend.skipped = shares = []       # the backend records each skipping product's share
    try:
        decode_all(model, state, batch, steps, graphs=False, fused=True)
    finally:
        model.backend.skipped = None
    return sum(shares) / len(shares) if shares else float("nan")


def ffn_cases(w, tokens, row) -> None:
    """Sparse vs dense value products of fused decode steps (bit-identical), vs the grouped GEMV (to TOL)."""
    from rwkv_chat.models.backends.fused_cuda import FusedCuda

    for strategy in ("cuda fp16", "cuda bf16", "cuda fp16i8", "cuda bf16i8", "cuda fp16f8"):
        model = RWKV(model=w, strategy=strategy)
        if isinstance(model.backend, FusedCuda):        # the row kernel's input-major layout, before any forward
            model.backend = FusedCuda(model, model.backend.ops, ffn="sparse", quant_rows=True)
        if getattr(model.backend, "ffn", None) != "sparse":
            row("channel-mix value product", strategy, f"NOT SPARSE ({model.backend})", float("inf"))
            continue
        _, st = model.forward(tokens, None)
        runs = {}
        for batch in (1, 4):
            for ffn in ("sparse", "dense"):
                runs[batch, ffn] = decode_all(model, st, batch, 6, ffn=ffn)
            (lg_s, st_s), (lg_d, st_d) = runs[batch, "sparse"], runs[batch, "dense"]
            same = torch.equal(lg_s, lg_d) and all(torch.equal(a, b) for s1, s2 in zip(st_s, st_d)
                                                   for l1, l2 in zip(s1.layers, s2.layers) for a, b in zip(l1, l2))
            share = skipped_share(model, st, batch)
            row(f"decode batch {batch}, 6 steps: value product sparse vs dense, logits + states torch.equal "
                f"(rows skipped {share:.1%})", strategy, "graph, ffn=sparse / dense", 0.0 if same else float("inf"),
                tol=0.0)
        gemv_model = RWKV(model=w, strategy=strategy)
        gemv_model.backend = FusedCuda(gemv_model, gemv_model.backend.ops, ffn="gemv")   # output-major again
        for batch in (1, 4):
            lg_g, st_g = decode_all(gemv_model, st, batch, 6)
            lg_s, st_s = runs[batch, "sparse"]
            row(f"decode batch {batch}, 6 steps: value product sparse rows vs grouped GEMV", strategy,
                "graph, ffn=sparse / gemv", max(rel(lg_s, lg_g), max(state_rel(a, b) for a, b in zip(st_s, st_g))),
                tol=TOL if "fp16" in strategy else 2 * TOL)    # bf16: 8 mantissa bits, other sum order
        del model, gemv_model
        torch.cuda.empty_cache()


def probed_model(w, strategy, row, setting: str, note_attr: str, case: str):
    """The model of ``strategy`` on a fused backend rebuilt with ``setting=True`` (a probed setting), or None after a
    failing row naming why it does not serve (the backend's ``note_attr``)."""
    from rwkv_chat.models.backends.fused_cuda import FusedCuda

    model = RWKV(model=w, strategy=strategy)
    note = "not the fused backend"
    if isinstance(model.backend, FusedCuda):
        model.backend = FusedCuda(model, model.backend.ops, **{setting: True})
        note = getattr(model.backend, note_attr)
    if note is not None:
        row(case, strategy, f"NOT SERVING ({note})", float("inf"))
        return None
    return model


def fold_cases(w, tokens, row) -> None:
    """ln1 / ln2 inside the grouped GEMV launches (``FusedCuda(fold_norms=True)``, its load probe): decode steps
    (CUDA graphs) vs the same model's unfolded decode steps (logits and states; the LayerNorm sums in another order),
    and in fp16 vs the sequence path over prompt + the decoded tokens."""
    for strategy in ("cuda fp16", "cuda bf16"):
        model = probed_model(w, strategy, row, "fold_norms", "fold_note",
                             "decode with ln1 / ln2 inside the GEMV launches (FusedCuda(fold_norms=True))")
        if model is None:
            continue
        _, st = model.forward(tokens, None)
        tol = TOL if strategy.endswith("fp16") else 2 * TOL      # bf16: 8 mantissa bits, other sum order
        for batch in (1, 3):
            got, st_got = decode_all(model, st, batch, 6)
            model.backend.fold_norms = False
            want, st_want = decode_all(model, st, batch, 6)
            model.backend.fold_norms = True
            row(f"decode batch {batch}, 6 steps: ln1 / ln2 inside the GEMV launches vs v7_mix launches (logits, "
                "states)", strategy, "graph, fold_norms / unfolded",
                max(rel(got, want), max(state_rel(a, b) for a, b in zip(st_got, st_want))), tol=tol)
            if strategy.endswith("fp16"):
                ref = torch.stack([model.forward(tokens + [(31 * t + 7 * j) % model.vocab_size for t in range(6)],
                                                 None, full_output=True)[0][-6:].float() for j in range(batch)], dim=1)
                row(f"decode batch {batch}, 6 steps vs forward(prompt + 6), ln1 / ln2 inside the GEMV launches",
                    strategy, "graph, fold_norms", rel(got, ref))
        del model
        torch.cuda.empty_cache()


def persistent_cases(w, tokens, row) -> None:
    """Every layer of a one-row decode step in one persistent launch (``FusedCuda(persistent_step=True)``, its load
    probe; the next stage's weights requested into registers, into L2 or not): decode steps (CUDA graphs) vs the same
    model's layer launches (logits and states; the sums in another order), and in fp16 vs the sequence path over
    prompt + the decoded tokens."""
    for strategy in ("cuda fp16", "cuda bf16"):
        model = probed_model(w, strategy, row, "persistent_step", "persistent_note",
                             "decode with every layer in one persistent launch (FusedCuda(persistent_step=True))")
        if model is None:
            continue
        _, st = model.forward(tokens, None)
        tol = TOL if strategy.endswith("fp16") else 2 * TOL      # bf16: 8 mantissa bits, other sum order
        step = model.backend.persistent
        model.backend.persistent = None
        want, st_want = decode_all(model, st, 1, 6)
        model.backend.persistent = step
        modes = (3, 2, 1, 0) if torch.cuda.get_device_capability()[0] >= 9 else (2, 1, 0)
        for prefetch in modes:
            step.prefetch = prefetch
            got, st_got = decode_all(model, st, 1, 6)
            timed_out = step.timed_out()
            row(f"decode batch 1, 6 steps: every layer in one persistent launch ({step.grid} blocks, prefetch "
                f"{PREFETCH[prefetch]}) vs the layer launches (logits, states)", strategy,
                "graph, persistent / layers" + (" BARRIER TIMED OUT" if timed_out else ""),
                float("inf") if timed_out else max(rel(got, want), state_rel(st_got[0], st_want[0])), tol=tol)
        if strategy.endswith("fp16"):
            ref = model.forward(tokens + [(31 * t) % model.vocab_size for t in range(6)], None,
                                full_output=True)[0][-6:].float()
            row("decode batch 1, 6 steps vs forward(prompt + 6), every layer in one persistent launch", strategy,
                "graph, persistent", rel(got[:, 0], ref))
        del model
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="0.1B")
    ap.add_argument("--out", default=None)
    ap.add_argument("--strategies", nargs="+", default=["cuda fp16", "cuda fp16i8", "cuda fp16i4"],
                    help="the strategies checked (the sparse FFN and folded-norm cases run with cuda fp16)")
    ap.add_argument("--only-persistent", action="store_true",
                    help="only the persistent decode step's cases (fp16 and bf16)")
    args = ap.parse_args()
    print(kernels.ensure_built("cuda"), flush=True)
    w = shapes.random_checkpoint(args.shape, dtype=torch.float16, device="cuda", seed=3)
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 65536, (64,), generator=g).tolist()
    lines = [*provenance(), "", f"RWKV-7 {args.shape}, random weights", "",
             "| case | strategy | fused path | rel. err vs plain fp16 | tolerance | result |", "|---|---|---|---|---|---|"]
    ok = True
    count = [0, 0]                                     # cases, passed

    def row(case, strategy, path, err, tol=TOL):
        nonlocal ok
        good = err <= tol
        ok = ok and good
        count[0] += 1
        count[1] += good
        lines.append(f"| {case} | {strategy} | {path} | {err:.2e} | {tol:g} | {'pass' if good else 'FAIL'} |")
        print(lines[-1], flush=True)

    for strategy in ([] if args.only_persistent else args.strategies):
        fused = RWKV(model=w, strategy=strategy)
        seq, st = fused.forward(tokens, None, full_output=True)
        if strategy.endswith("i4"):     # ln1 + mixes + int4 r/k/v in one launch (opt-in): its load probe
            from rwkv_chat.models.backends.fused_cuda import FusedCuda

            note = FusedCuda(fused, fused.backend.ops, mix_rkv=True).mix_rkv_note \
                if isinstance(fused.backend, FusedCuda) else "not the fused backend"
            row("ln1 + mixes + int4 r/k/v in one launch (FusedCuda(mix_rkv=True)) vs v7_mix + int4 GEMVs", strategy,
                "fused_v7_mix_rkv_i4" if note is None else f"NOT SERVING ({note})", 0.0 if note is None else float("inf"))
        # prefill through a CUDA graph (models/rwkv/prefill_graph.py: captured on a shape's second prefill) vs
        # the eager fused prefill of the same model: bit-identical logits and state
        graphs = fused.prefill_graphs
        more = [(7 * t + 3) % fused.vocab_size for t in range(48)]
        fused.forward(more, None)
        fused.forward(more, None)                      # second use: captured
        lg_graph, st_graph = fused.forward(more[::-1], st)
        captured = graphs is not None and graphs.disabled is None and len(graphs._graphs) == 1
        if graphs is not None:
            graphs.disabled = "eager reference"
        lg_eager, st_eager = fused.forward(more[::-1], st)
        if graphs is not None:
            graphs.disabled = None
        row("prefill 48 tokens from a state: CUDA graph vs eager (bit-identical)", strategy,
            "prefill graph" if captured else f"NO GRAPH ({graphs and graphs.disabled})",
            max(rel(lg_graph, lg_eager), state_rel(st_graph, st_eager)) if captured else float("inf"), tol=0.0)
        # decode (CUDA graph) vs the same model's sequence path over prompt + the decoded tokens, per row
        cases = ([(1, "ours", "fused"), (3, "ours", "fused"), (1, "cublas", "fused"), (8, "auto", "fused"),
                  (8, "auto", "fused-split"), (8, "auto", "compiled")] if strategy == "cuda fp16"
                 else [(1, "auto", "fused"), (3, "auto", "fused"), (8, "auto", "fused")])
        for batch, gemv, large in cases:
            got, _, dec = decode_run(fused, st, batch, 6, gemv=gemv, large=large)
            if not dec.fused:
                row(f"decode batch {batch}", strategy, "NOT FUSED (backend.decodes False)", float("inf"))
                continue
            want = torch.stack([fused.forward(tokens + [(31 * t + 7 * j) % fused.vocab_size for t in range(6)], None,
                                              full_output=True)[0][-6:].float() for j in range(batch)], dim=1)
            row(f"decode batch {batch}, 6 steps vs forward(prompt + 6) of the same model", strategy,
                f"graph, gemv={dec.gemv}" + (f", large={large}" if batch > 4 else ""), rel(got, want))
        # greedy with the argmax fed back on the device (GREEDY_UNROLL steps per graph) vs the host loop
        dec = BatchDecoder(fused, max_batch=2)
        h1, h2 = dec.add(st), dec.add(st)
        first = tok = int(torch.argmax(seq[-1]))
        host = []
        for _ in range(20):
            tok = int(torch.argmax(dec.step({h1: tok})[h1]))
            host.append(tok)
        on_dev = dec.greedy({h2: first}, 20)[h2]
        row("greedy on the device vs the host argmax loop, 20 tokens (share of tokens that differ)", strategy,
            "graph, 8 steps per replay + 4 single", sum(a != b for a, b in zip(host, on_dev)) / 20)
        # prefill: fused block vs the eager torch block (a model built without kernels, torch WKV paths)
        plain = RWKV(model=w, strategy=strategy, kernels=False)
        ref_seq, ref_st = plain.forward(tokens, None, full_output=True)
        one, s1 = [], ref_st
        for t in range(6):
            lg, s1 = plain.forward([(31 * t) % plain.vocab_size], s1)
            one.append(lg.float())
        # the eager fp16 path is itself only an fp16 answer: both against an fp32 eager model of the same (quantized)
        # weights; the fused logits may differ from the eager ones by twice the eager path's own error (a deep
        # random-weight model amplifies rounding), at least TOL
        wide = RWKV(model=w, strategy=strategy.replace("fp16", "fp32", 1), kernels=False)
        ref32 = wide.forward(tokens, None, full_output=True)[0]
        del wide
        torch.cuda.empty_cache()
        own = rel(ref_seq, ref32)
        row("prefill 64 tokens, logits vs eager torch", strategy, "v7_mix + v7_pre + chunked WKV-7 + v7_post "
            f"(vs fp32: fused {rel(seq, ref32):.2e}, eager fp16 {own:.2e})", rel(seq, ref_seq), tol=max(TOL, 2 * own))
        row("prefill 64 tokens, state vs eager torch", strategy, "same", state_rel(st, ref_st))
        got, _, dec = decode_run(fused, ref_st, 1, 6)
        row("decode batch 1 from the eager state vs eager one token at a time", strategy, f"graph, gemv={dec.gemv}",
            rel(got[:, 0], torch.stack(one)))
        del fused, plain, dec
        torch.cuda.empty_cache()
    if args.only_persistent:
        persistent_cases(w, tokens, row)
    elif "cuda fp16" in args.strategies:
        persistent_cases(w, tokens, row)
        ffn_cases(w, tokens, row)
        fold_cases(w, tokens, row)
    lines += ["", f"{count[0]} cases: {count[1]} pass, {count[0] - count[1]} fail"]
    return finish(lines, args.out, ok)


if __name__ == "__main__":
    sys.exit(main())
