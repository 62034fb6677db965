"""Two GPUs: a model split across ``cuda:0`` and ``cuda:1`` against the same model on one GPU.

    python tests/gpu/verify_multi.py [--shape 7.2B] [--split 16] [--tokens 32] [--batch 1 64] [--qwen] [--out FILE]

For RWKV-7 (random weights of the official shape, ``rwkv_chat.models.rwkv.shapes``) and, with ``--qwen``, a
random Qwen2-7B (built from its published config with ``transformers``, saved as safetensors; needs the
Qwen2 family of ``load_model``), both loaded as ``cuda:0 fp16`` and as ``cuda:0 fp16 *N -> cuda:1 fp16``:

* prompt logits: max |diff| relative to the largest |logit| (fp16 tolerance 2e-2);
* greedy tokens of both through the model's batched decoder (argmax fed back by the host);
* decode tok/s at each ``--batch`` (batch 1: greedy; larger: every slot stepping together), beside the
  single-GPU figures, and whether the decoder used CUDA graphs (one per GPU on the split model:
  ``models/rwkv/decode_stages.py``), with the relative logits difference of 8 decode steps with and without
  them (RWKV);
* the dry-run plan's bytes per device (``rwkv_chat.models.plan``) against ``torch.cuda.memory_allocated``
  after the load.

Prints a markdown table (appended to ``--out``). Exit 0 when every logits check passes, 1 otherwise, 2 without
two GPUs. Imports and parses on a CPU-only machine.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

QWEN2_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                tie_word_embeddings=False)


def _sync() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def run(model, prompt: list[int], tokens: int, batches: list[int]) -> dict:
    """Prompt logits, greedy tokens and tok/s per batch size, through the ``Model`` interface."""
    logits, state = model.forward(prompt, None)
    out = {"logits": logits.float().cpu()}
    dec = model.decoder(max_batch=1)
    h = dec.add(state)
    tok, greedy = int(torch.argmax(logits)), []
    for _ in range(tokens):
        greedy.append(tok)
        tok = int(torch.argmax(dec.step({h: tok})[h]))
    out["tokens"] = greedy
    out["graphs"] = getattr(dec, "graphs", None)
    dec.remove(h)
    if getattr(dec, "graphs", False) and hasattr(model, "run_layers"):   # RWKV: the graphs against no graphs
        from rwkv_chat.models.rwkv.decode import BatchDecoder

        eager = BatchDecoder(model, max_batch=2, graphs=False)
        staged = BatchDecoder(model, max_batch=2)
        he, hs = [eager.add(state) for _ in range(2)], [staged.add(state) for _ in range(2)]
        worst = 0.0
        for t in greedy[:8]:
            a, b = eager.step({x: t for x in he}), staged.step({x: t for x in hs})
            worst = max(worst, max(float((a[x] - b[y]).abs().max()) for x, y in zip(he, hs)))
        out["graph_diff"] = worst / float(logits.abs().max())
    for b in batches:
        dec = model.decoder(max_batch=b)
        hs = [dec.add(state) for _ in range(b)]
        feed = {x: (7 * i + 1) % 1000 for i, x in enumerate(hs)}
        for _ in range(3):
            o = dec.step(feed)
        _sync()
        t = time.perf_counter()
        for _ in range(tokens):
            o = dec.step(feed if b > 1 else {hs[0]: int(torch.argmax(o[hs[0]]))})
        _sync()
        out[f"tok_s_{b}"] = b * tokens / (time.perf_counter() - t)
        del dec
    return out


def memory_check(source, strategy: str) -> str:
    """Planned bytes per CUDA device vs allocated after the load (weights + one zero state)."""
    from rwkv_chat.models.plan import human, plan_memory

    if not isinstance(source, (str, Path)):
        return "-"
    mp = plan_memory(source, strategy, free={})
    return ", ".join(f"{d.device}: {human(d.weights + d.buffers + d.state)} planned / "
                     f"{human(torch.cuda.memory_allocated(torch.device(d.device)))} allocated"
                     for d in mp.devices if d.device.startswith("cuda"))


def compare(name: str, load, source, split: int, args) -> tuple[list[str], bool]:
    prompt = [(i * 131) % 1000 for i in range(64)]
    rows, results = [], {}
    for strategy in ("cuda:0 fp16", f"cuda:0 fp16 *{split} -> cuda:1 fp16"):
        gc.collect()
        torch.cuda.empty_cache()
        base = [torch.cuda.memory_allocated(i) for i in range(2)]
        model = load(strategy)
        mem = memory_check(source, strategy) if not any(base) else "-"
        results[strategy] = r = run(model, prompt, args.tokens, args.batch)
        r["mem"] = mem
        del model
    single, multi = results.values()
    scale = float(single["logits"].abs().max())
    diff = float((multi["logits"] - single["logits"]).abs().max()) / scale
    ok = diff <= 2e-2
    same = sum(a == b for a, b in zip(single["tokens"], multi["tokens"]))
    for strategy, r in results.items():
        speed = " | ".join(f"{r[f'tok_s_{b}']:.1f}" for b in args.batch)
        check = "- | -" if r is single else f"{diff:.1e}{'' if ok else ' FAIL'} | {same}/{len(r['tokens'])}"
        graphs = r["graphs"] if "graph_diff" not in r else f"{r['graphs']} (vs none: {r['graph_diff']:.1e})"
        rows.append(f"| {name} | {strategy} | {speed} | {graphs} | {check} | {r['mem']} |")
    return rows, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="7.2B", choices=["0.1B", "0.4B", "1.5B", "2.9B", "7.2B"])
    ap.add_argument("--split", type=int, default=16, help="layers on cuda:0 (default 16)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--qwen", action="store_true", help="also a random Qwen2-7B (needs the Qwen2 family)")
    ap.add_argument("--out", metavar="FILE", help="append the table to this markdown file")
    args = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("tests/gpu/verify_multi.py needs 2 CUDA GPUs", file=sys.stderr)
        return 2
    from rwkv_chat.models import RWKV, load_model
    from rwkv_chat.models.rwkv.shapes import random_checkpoint, save_pth

    lines = [f"### Two GPUs vs one ({torch.cuda.get_device_name(0)} ×2)", f"`python tests/gpu/verify_multi.py "
             f"{' '.join(sys.argv[1:])}`", "",
             "| model | strategy | " + " | ".join(f"tok/s b={b}" for b in args.batch)
             + " | graphs | logits rel. diff | greedy equal | memory |",
             "|---|---|" + "---|" * len(args.batch) + "---|---|---|---|"]
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        w = {k: v.cpu() for k, v in random_checkpoint(args.shape, torch.float16, device="cuda:0").items()}
        path = save_pth(w, Path(tmp) / "rwkv7.pth")
        del w
        rows, good = compare(f"RWKV-7 {args.shape}", lambda s: RWKV(str(path), s), path, args.split, args)
        lines += rows
        ok &= good
        if args.qwen:
            import transformers

            folder = Path(tmp) / "qwen2"
            with torch.device("cuda:0"):
                hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_7B)).half()
            hf.save_pretrained(folder, safe_serialization=True)
            del hf
            repo = Path(__file__).resolve().parents[2]
            for tok in (repo / "shared" / "tokenizers" / "qwen", repo.parent / "shared" / "tokenizers" / "qwen"):
                if tok.is_dir():                   # the real Qwen2 tokenizer beside the random weights
                    for f in tok.iterdir():
                        if f.is_file():
                            (folder / f.name).write_bytes(f.read_bytes())
                    break
            try:
                rows, good = compare("Qwen2-7B", lambda s: load_model(folder, s), folder, args.split, args)
                lines += rows
                ok &= good
            except Exception as e:  # the family may not be there: say so in the table
                lines.append(f"| Qwen2-7B | - | not run: {type(e).__name__}: {str(e)[:120]} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
