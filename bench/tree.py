"""What the saved states buy a chat (not a test): Enter-to-first-token with and without draft prefill, branch
switch latency, bytes per saved state, through a real daemon.

For each model a daemon is started in a temporary home (``rwkv-chat load``; greedy replies of 8 tokens):

* Enter to first token — time from sending ``Chat`` to the first ``Token`` event, in a conversation with one
  exchange before, for a pasted message of about ``--paste`` tokens and a typed one of about ``--typed``:
  without a draft (a conversation of its own each time), and with one: the paste sent whole as a draft, the
  typed message sent every 5 characters as typed (the daemon reads each draft while idle; the benchmark waits
  until it has, as a user's typing would, then sends the message with 3 characters more than the last draft);
  median of ``--repeats``;
* branch switch — a reply regenerated twice (three branches): ``SwitchBranch`` round trips (the daemon
  chooses the branch and sends its path back), median of 20; then the first token of a message on the
  branch switched to (its state read back from its file, nothing re-read);
* bytes per saved state — the size of a conversation's state file after one reply, and of the shared system
  prompt state (``prompt_states``).

Token counts come from the daemon (``Done.prompt_tokens``). Models: checkpoint paths, and/or ``--shape NAME``
(official RWKV-7 shapes with random weights, as in ``bench/daemon_overhead.py``).

    python bench/tree.py ../shared/models/tiny-rwkv-7v0-834K.pth [--kernel-cache DIR] [--out FILE.md]
    python bench/tree.py --shape 0.1B --strategy "cuda fp16"        # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from daemon_overhead import bench_models, load_daemon  # noqa: E402

GREEDY = {"temperature": 0.0, "alpha_frequency": 0.0, "alpha_presence": 0.0, "max_tokens": 8}
SENTENCE = "The river runs past the old mill, where the grain was ground for the town in the years before. "


def first_token(gen) -> tuple[float, object]:
    """Seconds from now to the first Token event of the stream ``gen``, and its Done event."""
    from rwkv_chat.daemon.protocol import messages as m

    t0, first, last = time.perf_counter(), None, None
    for ev in gen:
        if first is None and isinstance(ev, m.Token):
            first = time.perf_counter() - t0
        last = ev
    if not isinstance(last, m.Done):
        raise SystemExit(f"the generation failed: {last}")
    return (first if first is not None else time.perf_counter() - t0), last


def wait_drafted(c, cid: str, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        d = c.status()["home"]["sessions"].get("drafts", {}).get(cid)
        if d and not d["pending"] and d["tokens"] and d["fed"] == d["tokens"]:
            return
        time.sleep(0.01)
    raise SystemExit("the daemon did not read the draft ahead")


def conversation(c, system_prompt: str = "") -> str:
    cid = c.create_conversation(system_prompt=system_prompt, **GREEDY).id
    first_token(c.chat(cid, "Hello"))
    return cid


def enter_to_token(c, message: str, typed: bool, draft: bool) -> tuple[float, object]:
    cid = conversation(c)
    if draft:
        if typed:
            for i in range(5, len(message) - 3, 5):
                c.draft(cid, message[:i])
                wait_drafted(c, cid)
        else:
            c.draft(cid, message[:-3])
            wait_drafted(c, cid)
    return first_token(c.chat(cid, message))


def wait_kernels(c, timeout: float = 1800.0) -> str:
    """Wait until the daemon's kernel builds are over (it serves on the torch path meanwhile); its backend."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        model = c.status().get("model") or {}
        if "kernel_build" not in model:
            return str(model.get("backend", ""))
        time.sleep(1.0)
    raise SystemExit("the kernel builds did not end")


def measure(model_path: str, strategy: str, paste: int, typed: int, repeats: int,
            kernel_cache: str | None = None) -> dict:
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.paths import home_paths

    home = Path(tempfile.mkdtemp(prefix="rwkv-bench-tree-"))
    if kernel_cache:                           # built kernels: no build in the background while measuring
        (home / "cache").mkdir()
        (home / "cache" / "kernels").symlink_to(Path(kernel_cache).resolve(), target_is_directory=True)
    env, cmd = load_daemon(home, model_path, strategy)
    out: dict = {"rows": []}
    try:
        paths = home_paths(home)
        with Client(paths, autostart=False, timeout=600) as c:
            out["backend"] = wait_kernels(c)
            # calibrate: characters per token of this tokenizer
            _, d = first_token(c.chat(conversation(c), SENTENCE * 4))
            per = len(SENTENCE * 4) / max(1, d.prompt_tokens - 8)
            for name, n, is_typed in (("pasted", paste, False), ("typed", typed, True)):
                text = (SENTENCE * (1 + int(n * per) // len(SENTENCE)))[:int(n * per)].strip()
                row = {"message": name}
                for draft in (False, True):
                    times, prefill, done = [], [], None
                    for _ in range(repeats):
                        t, done = enter_to_token(c, text, is_typed, draft)
                        times.append(t)
                        prefill.append(done.prefill_s)
                    row[draft], row[("prefill", draft)] = statistics.median(times), statistics.median(prefill)
                    row["tokens"], row[("read", draft)] = done.prompt_tokens, done.draft_tokens
                out["rows"].append(row)
            # branches: three replies to one message, switch between them
            cid = conversation(c)
            first_token(c.chat(cid, "Tell me about the river."))
            for seed in (1, 2):
                first_token(c.regenerate(cid, temperature=1.0, seed=seed))
            reply = c.conversation(cid).turns[-1]
            times, turn = [], reply.index
            for i in range(20):
                t0 = time.perf_counter()
                d = c.switch_branch(cid, turn, -1 if i % 2 == 0 else 1)
                times.append(time.perf_counter() - t0)
                turn = d.turns[-1].index
            out["switch"] = statistics.median(times)
            c.switch_branch(cid, turn, -1)
            list(c.load(model_path, strategy))                  # nothing in memory: the state file is read
            out["after_switch"], d = first_token(c.chat(cid, "And then?"))
            out["after_switch_tokens"] = (d.prompt_tokens, d.reread_tokens)
            files = sorted((paths.states_dir / cid).rglob("*.safetensors"))
            out["state_bytes"] = files[0].stat().st_size if files else 0
            conversation(c, "You are a helpful assistant.")
            shared = list((paths.data_dir / "prompt_states").glob("*.safetensors"))
            out["prompt_state_bytes"] = shared[0].stat().st_size if shared else 0
            out["state_files"] = len(files)
    finally:
        subprocess.run([*cmd, "daemon", "stop"], env=env, capture_output=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*", help="checkpoint paths (.pth / .safetensors)")
    ap.add_argument("--shape", nargs="+", default=[], help="official RWKV-7 shapes with random weights (0.1B, ...)")
    ap.add_argument("--strategy", default="cpu fp32")
    ap.add_argument("--paste", type=int, default=2000, help="tokens of the pasted message")
    ap.add_argument("--typed", type=int, default=30, help="tokens of the typed message")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel-cache", help="a kernel build folder to use (else the daemon builds its kernels "
                    "first, in a temporary home: minutes)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not args.models and not args.shape:
        ap.error("give checkpoint paths and/or --shape")
    from rwkv_chat.app.bench import provenance

    tmp = Path(tempfile.mkdtemp(prefix="rwkv-bench-models-"))
    models = bench_models(args.models, args.shape, args.strategy, tmp)
    device = "cuda" if "cuda" in args.strategy else "cpu"
    head = [*provenance(device=device), "",
            f"Strategy `{args.strategy}`; greedy replies of {GREEDY['max_tokens']} tokens; each message after one "
            f"exchange; median of {args.repeats} (Enter to first token: client-observed, from sending the message to its "
            f"first token event; daemon prefill: `Done.prefill_s`) and of 20 (switch).", ""]
    first = ["| model | message | prompt tokens | Enter → first token, no draft (ms) | with draft (ms) | "
             "read while typing (tokens) | speed-up | daemon prefill after Enter, no draft (ms) | with draft (ms) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    second = ["| model | branch switch (ms) | first token on the branch switched to (ms) | tokens read "
              "(re-read) | bytes per saved state | bytes of a shared prompt state |", "|---|---:|---:|---|---:|---:|"]
    notes: list[str] = []
    try:
        for name, mp in models:
            r = measure(mp, args.strategy, args.paste, args.typed, args.repeats, args.kernel_cache)
            for row in r["rows"]:
                first.append(f"| {name} | {row['message']} | {row['tokens']} | {row[False] * 1e3:.1f} | "
                             f"{row[True] * 1e3:.1f} | {row[('read', True)]} | {row[False] / row[True]:.1f}x | "
                             f"{row[('prefill', False)] * 1e3:.1f} | {row[('prefill', True)] * 1e3:.1f} |")
                print(first[-1], file=sys.stderr, flush=True)
            read, reread = r["after_switch_tokens"]
            notes.append(f"{name}: served by {r['backend'] or 'the default backend'}")
            second.append(f"| {name} | {r['switch'] * 1e3:.2f} | {r['after_switch'] * 1e3:.1f} | {read} ({reread}) "
                          f"| {r['state_bytes']:,} | {r['prompt_state_bytes']:,} |")
            print(second[-1], file=sys.stderr, flush=True)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    text = "\n".join(head + first + ["", *second, "", *notes]) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
