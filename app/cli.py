"""The ``rwkv-chat`` command line (one binary): the TUI, the daemon's lifecycle, and scriptable clients.

``complete`` and ``chat`` write only generated text to stdout (progress and status go to stderr), so they
compose in pipes. Exit codes: 0 success, 1 error (a model that did not load, a failed generation; ``daemon
status``: no daemon answers), 2 usage (a bad flag, a conversation that does not exist or is named
ambiguously), 3 a daemon already runs (``daemon start --foreground``), 4 the daemon was lost mid-stream, 130
interrupted or cancelled (Ctrl-C, or the daemon cancelled the generation: ``daemon stop``, another client's
cancel).

Conversations are named by their id, by the start of their id (as the TUI shows it) or by their exact title.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time


def _paths():
    from rwkv_chat.daemon.paths import ensure_dirs, get_paths

    return ensure_dirs(get_paths())


def _config(paths):
    from rwkv_chat.daemon.config import load_config

    return load_config(paths.config_file)


def _err(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


class UsageError(Exception):
    """A mistake in what the user asked (exit code 2, one line on stderr)."""


#: (flag, dest, type, low, high, help): the sampling flags of ``complete`` and ``chat``
SAMPLING_FLAGS = [
    ("--max-tokens", "max_tokens", int, 1, None, "most tokens to generate (default: the config's, 256)"),
    ("--temperature", "temperature", float, 0.0, None,
     "randomness: 0 always picks the likeliest token, 1 (default) samples as the model says"),
    ("--top-p", "top_p", float, 0.0, 1.0, "sample only from the likeliest tokens holding this much probability "
                                          "(0-1, default 0.85)"),
    ("--top-k", "top_k", int, 0, None, "sample only from the K likeliest tokens (0 = no limit, the default)"),
    ("--alpha-frequency", "alpha_frequency", float, 0.0, None,
     "penalty per earlier use of a token: fewer repetitions (default 0.2)"),
    ("--alpha-presence", "alpha_presence", float, 0.0, None,
     "penalty for a token used at all before (default 0.2)"),
    ("--alpha-decay", "alpha_decay", float, 0.0, 1.0, "how fast the penalties fade, per token (0-1, default 0.996)"),
    ("--seed", "seed", int, 0, 2**63 - 1, "random seed: the same seed and settings give the same text"),
]


def _number(kind, lo=None, hi=None):
    """An argparse type: a ``kind`` (int or float) within [lo, hi], refused in words."""
    from .texts import between

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{between(lo, hi)}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (default: the conversation's settings, else the config's [sampling])")
    for flag, dest, kind, lo, hi, text in SAMPLING_FLAGS:
        g.add_argument(flag, dest=dest, type=_number(kind, lo, hi), metavar="N" if kind is int else "X",
                       help=text)


def _sampling(args) -> dict:
    return {dest: getattr(args, dest) for _, dest, *_ in SAMPLING_FLAGS if getattr(args, dest) is not None}


def _sub(sub, name: str, summary: str, description: str, examples: list[str], **kw) -> argparse.ArgumentParser:
    """A subcommand with a one-line ``summary`` (in its parent's list), a ``description`` and examples."""
    return sub.add_parser(name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="examples:\n" + "\n".join(f"  {e}" for e in examples), **kw)


def parser() -> argparse.ArgumentParser:
    from .texts import STRATEGY_HELP

    ap = argparse.ArgumentParser(
        prog="rwkv-chat", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Chat with RWKV language models in the terminal.\n\n"
                    "With no command, rwkv-chat opens the terminal UI (and starts the background daemon that\n"
                    "holds the model when none is running). The commands below script the same daemon.",
        epilog="examples:\n"
               "  rwkv-chat                                       # open the terminal UI\n"
               '  rwkv-chat load ~/models/rwkv7-0.1B.pth --strategy "cpu fp32" --default\n'
               '  rwkv-chat chat "Plan a day in Lyon."\n'
               "  rwkv-chat COMMAND --help                        # what a command does, with examples")
    sub = ap.add_subparsers(dest="cmd", title="commands", metavar="COMMAND")

    d = _sub(sub, "daemon", "start, stop or inspect the background daemon",
             "The daemon holds the model and the conversations; every rwkv-chat window and command talks to it.\n"
             "Commands start it when none is running, so you rarely need these.",
             ["rwkv-chat daemon status", "rwkv-chat daemon stop"])
    dsub = d.add_subparsers(dest="daemon_cmd", required=True, title="daemon commands", metavar="ACTION")
    ds = _sub(dsub, "start", "start the daemon in the background (with --model: wait for the load)",
              "Start the daemon in the background; it loads --model (else the config's [model] path) with\n"
              "--strategy. With --model it waits until the model is loaded (progress on stderr) and exits 1\n"
              "with the reason if it does not load; the daemon then runs without a model and\n"
              "`rwkv-chat daemon status` shows the error. If a daemon already runs, --model is loaded into\n"
              "it (as `rwkv-chat load`).\n\n"
              + STRATEGY_HELP,
              ['rwkv-chat daemon start --model ~/models/rwkv7-0.1B.pth --strategy "cpu fp32"',
               "rwkv-chat daemon start --foreground          # logs in this terminal; Ctrl+C stops it"])
    ds.add_argument("--model", metavar="MODEL", help="model to load: a local model's name (rwkv-chat models) or a "
                                                     "checkpoint (.pth or .safetensors), e.g. "
                                                     "~/models/RWKV-x070-World-0.1B.pth; the command waits for it")
    ds.add_argument("--strategy", metavar="S",
                    help='where and how the model runs, e.g. "cpu fp32" (default: the config\'s; see above)')
    ds.add_argument("--foreground", action="store_true", help="run in this terminal instead of the background")
    _sub(dsub, "stop", "stop the daemon (generations in progress are cancelled)",
         "Stop the daemon of this home. Conversations and their states are saved (a reply in progress is kept\n"
         "as far as it got); the next command starts a new one.",
         ["rwkv-chat daemon stop"])
    dst = _sub(dsub, "status", "show the daemon's model, memory and generations",
               "Show whether the daemon runs (or is starting, or not responding), its model and strategy, which\n"
               "path serves it (compiled kernels or pure torch while they build), the last load error, memory\n"
               "and the generations in progress. Exit status 1 when no daemon answers.",
               ["rwkv-chat daemon status", "rwkv-chat daemon status --json | jq .model"])
    dst.add_argument("--json", action="store_true", help="print the status as JSON")

    lp = _sub(sub, "load", "load (or switch) the daemon's model",
              "Load a local model by name (`rwkv-chat models`) or a checkpoint by path into the daemon\n"
              "(replacing the model it has), with a progress bar.\n\n"
              + STRATEGY_HELP,
              ["rwkv-chat load rwkv7-g1-1.5b", 'rwkv-chat load ~/models/rwkv7-0.1B.pth --strategy "cpu fp32"',
               'rwkv-chat load ~/models/rwkv7-1.5B.pth --strategy "cuda fp16" --default'])
    lp.add_argument("path", metavar="MODEL", help="a local model's name (rwkv-chat models), a checkpoint file "
                                                  "(.pth or .safetensors, RWKV versions 4 to 7) or a Hugging Face "
                                                  "Qwen2/Qwen3 folder")
    lp.add_argument("--strategy", default=None, metavar="S",
                    help="where and how the model runs (default: the config's, cpu fp32 at first; see above)")
    lp.add_argument("--default", action="store_true",
                    help="also make it the default model (saved in the config; the daemon loads it when it starts)")

    cp = _sub(sub, "complete", "continue a text (raw completion), streamed to stdout",
              "Continue PROMPT from the model's empty state (no chat format, no conversation). Only the text\n"
              "goes to stdout; the timing line goes to stderr.",
              ['rwkv-chat complete "The capital of France is" --max-tokens 20 --temperature 0',
               'rwkv-chat complete "def fib(n):" --stop "\\n\\n" > fib.py'])
    cp.add_argument("prompt", metavar="PROMPT", help="the text to continue (not empty)")
    cp.add_argument("--stop", action="append", default=[], metavar="TEXT",
                    help="end the completion where TEXT appears (repeatable)")
    _sampling_flags(cp)
    ch = _sub(sub, "chat", "send one message and stream the reply to stdout",
              "Send MESSAGE in a conversation and print the reply. Without --conversation a new one starts\n"
              "(its id goes to stderr); the conversation's state is saved, so the next message continues it\n"
              "without re-reading the history. Ctrl+C stops the reply; what it said so far is kept.",
              ['rwkv-chat chat "Plan a day in Lyon."',
               'rwkv-chat chat --conversation "Plan a day in Lyon." "And the evening?"   # by title',
               'rwkv-chat chat --conversation trip "Hi"   # a new conversation with the id "trip"',
               'rwkv-chat chat "Name a colour." --temperature 0 --max-tokens 10'])
    ch.add_argument("message", metavar="MESSAGE", help="your message (not empty)")
    ch.add_argument("--conversation", metavar="CONVERSATION",
                    help="continue this conversation: its id, the start of its id, or its exact title; a new id "
                         "(letters, digits, _ and -) starts a conversation with that id (default: a new one)")
    _sampling_flags(ch)
    sv = _sub(sub, "serve", "serve an OpenAI-compatible HTTP API in front of the daemon",
              "Serve /v1/models, /v1/chat/completions and /v1/completions (streaming too) for any OpenAI client,\n"
              "on --http HOST:PORT (default: the config's [http] listen, 127.0.0.1:11435). It uses the daemon\n"
              "(started when none runs) and its model; a conversation's next turn reads only the new message\n"
              "(the daemon's prefix cache). An address beyond loopback needs an API key ([http] api_key).",
              ["rwkv-chat serve --http 127.0.0.1:11435",
               'OPENAI_BASE_URL=http://127.0.0.1:11435/v1 OPENAI_API_KEY=unused python my_openai_script.py'])
    sv.add_argument("--http", metavar="HOST:PORT", help="where to listen (default: the config's [http] listen)")
    sv.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` (default: the config's "
                                                     "[http] api_key)")
    cv = _sub(sub, "conversations", "list, show, export or remove conversations",
              "The daemon's saved conversations (the TUI's sidebar). A conversation is named by its id, by the\n"
              "start of its id (as the sidebar shows it) or by its exact title.",
              ["rwkv-chat conversations list", "rwkv-chat conversations export trip --format md > trip.md"])
    cvs = cv.add_subparsers(dest="conv_cmd", required=True, title="conversation commands", metavar="ACTION")
    cl = _sub(cvs, "list", "list conversations, newest first",
              "One line per conversation: id, last change, exchanges (a message and its reply), title.",
              ["rwkv-chat conversations list", "rwkv-chat conversations list --json"])
    cl.add_argument("--json", action="store_true", help="print the conversations as JSON")
    conv_help = "the conversation: its id, the start of its id, or its exact title"
    _sub(cvs, "show", "print a conversation's messages",
         "Print the title, the system prompt and every message of a conversation (a reply that was stopped\n"
         "is marked [stopped]).",
         ["rwkv-chat conversations show trip", 'rwkv-chat conversations show "Plan a day in Lyon."']
         ).add_argument("id", metavar="CONVERSATION", help=conv_help)
    ex = _sub(cvs, "export", "write a conversation as Markdown or JSON to stdout",
              "Write a conversation to stdout as a Markdown transcript or as JSON (with every field).",
              ["rwkv-chat conversations export trip > trip.md",
               "rwkv-chat conversations export trip --format json > trip.json"])
    ex.add_argument("id", metavar="CONVERSATION", help=conv_help)
    ex.add_argument("--format", choices=("md", "json"), default="md", help="md (default) or json")
    which = ex.add_mutually_exclusive_group()
    which.add_argument("--all", dest="branches", action="store_const", const="all",
                       help="every branch (the default of json)")
    which.add_argument("--path", dest="branches", choices=("current",),
                       help="only the chosen path: current (the default of md)")
    _sub(cvs, "tree", "print every branch of a conversation",
         "Print the tree of a conversation's turns: a regenerated reply or an edited message starts a branch\n"
         "beside the original; * marks the path the conversation continues from, [2/3] a turn's place among\n"
         "its siblings.",
         ["rwkv-chat conversations tree trip"]).add_argument("id", metavar="CONVERSATION", help=conv_help)
    _sub(cvs, "rm", "delete a conversation and its saved state",
         "Delete a conversation, its messages and its saved states.",
         ["rwkv-chat conversations rm trip"]).add_argument("id", metavar="CONVERSATION", help=conv_help)

    dp = _sub(sub, "doctor", "check devices, versions, kernel builds and paths",
              "Report the system, torch and its devices, package versions, this home's paths, the daemon\n"
              "(its state, which path serves its model, and the progress of a kernel build), and the compiled\n"
              "kernels.",
              ["rwkv-chat doctor", "rwkv-chat doctor --build      # build the kernels now, with progress",
               "rwkv-chat doctor --json"])
    dp.add_argument("--json", action="store_true", help="print the report as JSON")
    dp.add_argument("--build", action="store_true",
                    help="build the compiled kernels now when they are not built yet (about a minute)")
    from .models_cli import add_parsers

    add_parsers(sub, _sub)
    sub.add_parser("bench", help="measure prefill and decode speed (rwkv-chat bench --help)", add_help=False)
    sub.add_parser("plan", help="memory per device of a model and strategy, without loading (rwkv-chat plan --help)",
                   add_help=False)
    sub.add_parser("convert", help="pre-quantize a checkpoint for a strategy, or change its container "
                                   "(rwkv-chat convert --help)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code. A closed stdout (``rwkv-chat doctor | head``) ends
    the command quietly with 0 (a generation in progress is cancelled)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        if argv[:1] == ["plan"]:
            from rwkv_chat.app.plan import main as plan_main

            return plan_main(argv[1:])
        if argv[:1] == ["convert"]:
            from rwkv_chat.app.convert import main as convert_main

            return convert_main(argv[1:])
        return _main(argv)
    except BrokenPipeError:
        try:                     # later flushes (interpreter exit) must not raise again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 0


def _bench(argv: list[str]) -> int:
    from rwkv_chat.app.bench import main as bench_main

    return bench_main(argv) or 0


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    from rwkv_chat.daemon.client import DaemonError, DaemonLost, GenerationFailed
    from rwkv_chat.daemon.paths import UnsafeDirectory
    from rwkv_chat.daemon.protocol import InvalidId

    try:
        if args.cmd == "serve":
            return _serve(args)
        if args.cmd is None:
            return _tui()
        from . import models_cli

        return {"daemon": _daemon, "load": _load, "complete": _complete, "chat": _chat,
                "conversations": _conversations, "doctor": _doctor, "pull": models_cli.pull,
                "models": models_cli.models, "ps": models_cli.ps, "unload": models_cli.unload}[args.cmd](args)
    except (UsageError, InvalidId) as e:
        _err(f"rwkv-chat: {e}")
        return 2
    except DaemonLost as e:
        _err(f"rwkv-chat: daemon lost: {e.message}")
        return 4
    except (DaemonError, UnsafeDirectory) as e:
        if isinstance(e, DaemonError) and e.kind in ("InvalidId", "NotFound", "Conflict") \
                and not isinstance(e, GenerationFailed):
            # what the user named is not there (any more)
            _err(f"rwkv-chat: {e.message}")
            return 2
        _err(f"rwkv-chat: {said(e) if isinstance(e, DaemonError) else e}")
        return 1
    except KeyboardInterrupt:
        _err("rwkv-chat: interrupted")
        return 130


def said(e) -> str:
    """A daemon error as a sentence: its message, with what kind of trouble it is where the message alone
    does not say (a busy queue, an internal error)."""
    if e.kind == "Busy":
        return f"the daemon is busy: {e.message}"
    if e.kind == "Internal":
        return f"internal error in the daemon: {e.message} (its log: rwkv-chat doctor shows where)"
    return e.message


def _with_client(run) -> int:
    """``run(client)`` with a client of this home's daemon (started when none runs). A daemon this command
    started is stopped again when the command fails: a failing ``chat`` leaves nothing running behind."""
    from rwkv_chat.daemon.client import Client, DaemonError

    c = Client(_paths())
    rc = 1
    try:
        rc = run(c)
        return rc
    finally:
        if c.spawned and rc != 0:
            try:
                c.shutdown()
            except DaemonError:
                pass
        c.close()


def _tui() -> int:
    try:
        from rwkv_chat.app.main import run
    except ImportError as e:
        _err(f"rwkv-chat: the terminal UI is not available ({e}); the other commands work: rwkv-chat --help")
        return 1
    return run() or 0


# ---------------------------------------------------------------- daemon lifecycle
def _daemon(args) -> int:
    from rwkv_chat.daemon.client import Client, ping, spawn_daemon
    from rwkv_chat.daemon.launcher import lock_held

    paths = _paths()
    if args.daemon_cmd == "start":
        if args.foreground:
            from rwkv_chat.daemon.launcher import AlreadyRunning, run_foreground

            try:
                return run_foreground(paths, _config(paths), args.model, args.strategy)
            except AlreadyRunning as e:
                _err(f"rwkv-chat: {e}")
                return 3
        info = ping(paths) if lock_held(paths.lock_file) else None
        if info is not None:
            _err(f"rwkv-chat: a daemon is already running (pid {info.pid}, {info.request})")
            if args.model:      # the model asked for is loaded into the running daemon, as `load` would
                return _load(argparse.Namespace(path=args.model, strategy=args.strategy, default=False))
            return 0
        from .models_cli import load_target

        try:
            model, own_strategy = load_target(args.model, paths) if args.model else (None, "")
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        info = spawn_daemon(paths, model, args.strategy or own_strategy or None)
        _err(f"rwkv-chat: daemon started (pid {info.pid}, {info.request})")
        return _wait_for_load(paths) if model else 0
    if args.daemon_cmd == "stop":
        info = ping(paths) if lock_held(paths.lock_file) else None
        if info is None and not lock_held(paths.lock_file):
            _err("rwkv-chat: no daemon is running")
            return 0
        if info is not None:
            with Client(paths, autostart=False) as c:
                c.shutdown()
        else:
            pid = paths.lock_file.read_text().strip()
            if pid.isdigit():
                os.kill(int(pid), signal.SIGTERM)
        for _ in range(200):
            if not lock_held(paths.lock_file):
                _err("rwkv-chat: daemon stopped")
                return 0
            time.sleep(0.05)
        _err("rwkv-chat: the daemon did not stop within 10 s")
        return 1
    # status
    from rwkv_chat.daemon.launcher import daemon_state, not_responding

    state = daemon_state(paths)
    if state.state != "running":
        if args.json:
            print(json.dumps({"running": False, "state": state.state, "pid": state.pid}))
        elif state.state == "not responding":
            print(f"daemon: not responding ({not_responding(state, paths).message})")
        elif state.state == "starting":
            print(f"daemon: starting or stopping (pid {state.pid or '?'} holds the lock, no connection file yet)")
        else:
            print("daemon: not running")
        return 1
    with Client(paths, autostart=False) as c:
        st = c.status()
    st["running"] = True
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    _print_status(st)
    return 0


def _wait_for_load(paths, poll: float = 0.1) -> int:
    """Follow the load a daemon started with (its status) until it ends: progress on stderr (one line rewritten
    on a terminal; a line per step otherwise); 0 once loaded, 1 with the one-line reason when it failed."""
    from rwkv_chat.daemon.client import Client

    interactive = sys.stderr.isatty()
    shown = ""
    t0 = time.monotonic()
    with Client(paths, autostart=False) as c:
        while True:
            mdl = c.status()["model"]
            if not mdl.get("loading"):
                break
            progress, note = mdl.get("progress"), mdl.get("note")
            step = note or (f"layer {progress[0]}/{progress[1]}" if progress else "reading the checkpoint")
            line = f"loading {mdl['loading']}: {step}"
            if interactive:                                  # one bar, redrawn in place
                bar = (f"loading {os.path.basename(mdl['loading'])} {progress_bar(*progress)} layers"
                       if progress and not note else line)
                sys.stderr.write(f"\r\x1b[K{bar}")
                sys.stderr.flush()
            elif line != shown and (note or not progress or shown == ""):
                _err(line)
            shown = line
            time.sleep(poll)
    if interactive and shown:
        sys.stderr.write("\r\x1b[K")
    if mdl.get("loaded") and not mdl.get("error"):
        _err(f"loaded {mdl['path']} with strategy {mdl['strategy']!r} in {time.monotonic() - t0:.1f} s")
        return 0
    err = mdl.get("error") or {"kind": "Unknown", "message": "the daemon is not loading a model (see its log)"}
    after = f"the daemon serves {mdl['path']}" if mdl.get("loaded") else "the daemon runs without a model"
    _err(f"rwkv-chat: the model did not load: {err['kind']}: {_first_line(err.get('message'))} ({after})")
    return 1


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0] if lines else ""


def _mib(n) -> str:
    return f"{n / 2**20:.1f} MiB"


def _print_status(st: dict) -> None:
    from .texts import serving

    mdl = st["model"]
    print(f"daemon: pid {st['pid']}, version {st['version']}, protocol {st['protocol']}, up {st['uptime']:.0f} s")
    if mdl.get("loaded"):
        kind = f"Qwen{mdl['version']}" if mdl.get("family") == "qwen2" else f"RWKV v{mdl['version']}"
        print(f"model: {mdl['path']} ({kind}, {mdl['n_layer']} layers x {mdl['n_embd']}, "
              f"vocab {mdl['vocab_size']}, tokenizer {mdl['tokenizer']})")
        print(f"strategy: {mdl['strategy']}")
        for line in str(mdl.get("plan", "")).splitlines():
            if not line.strip().startswith("Backend:"):
                print(f"  {line}")
        print(f"serving: {serving(mdl)}")
    else:
        print("model: none loaded" + (f" (loading {mdl['loading']})" if mdl.get("loading") else ""))
    err = mdl.get("error")
    if err:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(err.get("time", 0)))
        print(f"last load failed ({when}): {err['path']} with strategy {err['strategy']!r}: {err['kind']}: "
              f"{_first_line(err.get('message'))}")
    mem = st["memory"]
    print(f"memory: RSS {_mib(mem.get('rss_bytes', mem['max_rss_bytes']))}"
          + "".join(f", {c['device']} {_mib(c['allocated_bytes'])} allocated" for c in mem.get("cuda", [])))
    print("devices: " + ", ".join(st["devices"]))
    print(f"generations: {len(st['active'])} active, {st['queued']} queued; clients: {st['clients']}")
    for a in st["active"]:
        print(f"  {a['job_id']} {a['kind']} {a['conversation_id'] or ''} {a['phase']} tokens={a['tokens']}")
    pc = st.get("prefix_cache") or {}
    if pc:
        print(f"prefix cache: {pc['entries']} states, {_mib(pc['bytes'])} of {_mib(pc['budget'])}; {pc['hits']} hits, "
              f"{pc['misses']} misses; prompt tokens reused {pc['cached_tokens']}, read {pc['prefilled_tokens']}")
    ps = st.get("home", {}).get("sessions", {}).get("prompt_cache")
    if ps:
        print(prompt_states_line(ps))


def prompt_states_line(ps: dict) -> str:
    """The ``daemon status`` line of the shared prompt states (``PromptCache.stats()``): entries, bytes and
    budget of each tier (the model's devices, RAM, disk), hits per tier, misses."""
    where = {"device": "on the model's devices", "ram": "in RAM", "disk": "on disk"}
    tiers = ", ".join(f"{ps.get(f'{t}_entries', 0)} {w} ({_mib(ps.get(f'{t}_bytes', 0))} of "
                      f"{_mib(ps.get(f'{t}_budget', 0))})" for t, w in where.items())
    hits = ps.get("hits", {})
    return (f"prompt states: {tiers}; hits {hits.get('device', 0)} device, {hits.get('ram', 0)} RAM, "
            f"{hits.get('disk', 0)} disk; {ps.get('misses', 0)} misses")


def progress_bar(done: int, total: int, width: int = 30) -> str:
    """``[#########.....................]  7/25``."""
    filled = width * done // total if total else 0
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:>{len(str(total))}}/{total}"


def _load(args) -> int:
    from rwkv_chat.daemon.protocol import messages as m

    from .models_cli import load_target

    paths = _paths()
    cfg = _config(paths)
    try:
        path, own_strategy = load_target(args.path, paths)     # a file or folder, or a local model's name
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if args.strategy is not None and not args.strategy.strip():
        raise UsageError("--strategy is empty; give one such as \"cpu fp32\" or \"cuda fp16\", or leave the flag out")
    strategy = args.strategy or own_strategy or cfg.model.strategy
    interactive = sys.stderr.isatty()

    def run(c) -> int:
        name = os.path.basename(path)
        said_queued = False
        if not interactive:
            _err(f"loading {path} with strategy {strategy!r} ...")
        for ev in c.load(path, strategy):
            if isinstance(ev, m.Progress) and interactive:      # one bar, redrawn in place
                sys.stderr.write(f"\r\x1b[Kloading {name} {progress_bar(ev.done, ev.total)} layers")
                sys.stderr.flush()
            elif isinstance(ev, m.Queued):
                if not said_queued:
                    if interactive:
                        sys.stderr.write("\r\x1b[K")
                    _err(f"rwkv-chat: the load waits for {ev.active} running generation(s) to finish")
                said_queued = True
            elif isinstance(ev, m.Done):
                if interactive:
                    sys.stderr.write("\r\x1b[K")
                if ev.reason == "cancelled":
                    _err("rwkv-chat: the load was cancelled (the daemon stopped)")
                    return 130
                _err(f"loaded {path} with strategy {strategy!r} in {ev.prefill_s:.2f} s")
        return 0

    try:
        rc = _with_client(run)
    except BaseException:
        if interactive:
            sys.stderr.write("\r\x1b[K")
        raise
    if rc:
        return rc
    if args.default:
        from rwkv_chat.daemon.config import save_config

        cfg.model.path, cfg.model.strategy = path, strategy
        save_config(cfg, paths.config_file)
        _err(f"default model saved in {paths.config_file}")
    return 0


def _stream(gen, strip_first: bool = False, chat: bool = False, started=None) -> int:
    """Write a generation's text to stdout, its progress and summary to stderr; returns the exit code (130 when
    the generation was cancelled, here or in the daemon). ``chat``: a chat turn, which the daemon keeps as far
    as it got when interrupted. ``started(event)`` is called with the Started event (the reply begins)."""
    from rwkv_chat.daemon.protocol import messages as m

    first = True
    interactive = sys.stderr.isatty()
    position = None
    noted = reloading = False
    try:
        for ev in gen:
            if isinstance(ev, m.Queued):
                if ev.position != position:
                    position = ev.position
                    _err(f"rwkv-chat: queued, position {ev.position} of {ev.queued} "
                         f"({ev.active} generation(s) running)")
                continue
            position = None
            if isinstance(ev, m.Started) and started is not None:
                started(ev)
            elif isinstance(ev, m.Token):
                text = ev.text.lstrip() if (first and strip_first) else ev.text
                first = first and not text
                sys.stdout.write(text)
                sys.stdout.flush()
            elif isinstance(ev, m.Progress) and ev.phase == "load":
                if not reloading:       # the model was unloaded while idle (keep-alive): said once
                    reloading = True
                    if interactive:
                        sys.stderr.write("\r\x1b[K")
                    _err(f"rwkv-chat: loading the model again (unloaded while idle): {ev.text}")
            elif isinstance(ev, m.Progress) and ev.text and not noted:
                noted = True            # why the history is re-read: said once, terminal or not
                if interactive:
                    sys.stderr.write("\r\x1b[K")
                _err(f"rwkv-chat: {ev.text}")
            if isinstance(ev, m.Progress) and interactive:
                what = "loading the model" if ev.phase == "load" else "reading the prompt"
                unit = "layers" if ev.phase == "load" else "tokens"
                sys.stderr.write(f"\r\x1b[K{what} {progress_bar(ev.done, ev.total)} {unit}")
                sys.stderr.flush()
                if ev.done >= ev.total:
                    sys.stderr.write("\r\x1b[K")
            elif isinstance(ev, m.Done):
                if strip_first:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                context = (f"; context {ev.context_used if ev.context_used is not None else '?'}/"
                           f"{ev.context_limit} tokens" if ev.context_limit else "")
                _err(f"[{ev.reason}: {ev.tokens} tokens at {ev.tokens_per_s:.1f} tokens/s; "
                     f"prefill {ev.prompt_tokens} tokens in {ev.prefill_s:.2f} s{context}]")
                if ev.reason == "cancelled":
                    _err("rwkv-chat: cancelled by the daemon (stopped, or cancelled by another client)")
                    return 130
    except KeyboardInterrupt:
        gen.close()          # cancels the generation in the daemon
        sys.stdout.write("\n")
        _err("rwkv-chat: stopped (the reply so far is kept in the conversation)" if chat else "rwkv-chat: cancelled")
        return 130
    except BrokenPipeError:
        gen.close()          # the reader went away: cancel, then exit quietly (main)
        raise
    return 0


def _usage(command: str, message: str) -> int:
    """A user mistake the parser cannot see: one line, exit status 2 (as argparse's own)."""
    _err(f"rwkv-chat {command}: error: {message}")
    return 2


def _complete(args) -> int:
    if not args.prompt:
        return _usage("complete", "the prompt is empty: give the text to continue")
    return _with_client(lambda c: _stream(c.complete(args.prompt, stop=args.stop, **_sampling(args))))


def _resolve(client, ref: str, new_ok: bool = False) -> str:
    """The id of the conversation ``ref`` names (its id, the start of its id, or its exact title). With
    ``new_ok``, a valid id that names none is returned as it is (a new conversation). Raises UsageError."""
    from rwkv_chat.daemon.protocol import CONVERSATION_ID_RE

    if not ref.strip() or len(ref) > 1000:
        raise UsageError(f"{ref[:40]!r} does not name a conversation: give its id, the start of its id, or its title")
    items = client.find(ref)
    if len(items) == 1:
        return items[0].id
    if items:
        shown = ", ".join(f"{c.id} ({c.title or 'untitled'})" for c in items[:5])
        raise UsageError(f"{ref!r} names {len(items)}{'+' if len(items) >= 10 else ''} conversations: {shown}; "
                         "give more of the id")
    if new_ok and CONVERSATION_ID_RE.fullmatch(ref):
        return ref
    hint = ("; leave out --conversation to start a new one, or give a new id (letters, digits, _ and -)"
            if new_ok else " (`rwkv-chat conversations list` shows them)")
    raise UsageError(f"no conversation has the id, id prefix or title {ref!r}{hint}")


def _chat(args) -> int:
    from rwkv_chat.daemon.protocol import new_conversation_id

    if not args.message.strip():
        return _usage("chat", "the message is empty: nothing sent")

    def run(c) -> int:
        cid = new_conversation_id() if args.conversation is None else _resolve(c, args.conversation, new_ok=True)

        def started(_ev) -> None:             # the conversation exists from here on
            if args.conversation is None:
                _err(f"conversation: {cid}")

        return _stream(c.chat(cid, args.message, **_sampling(args)), strip_first=True, chat=True, started=started)

    return _with_client(run)


def _serve(args) -> int:
    from rwkv_chat.app.gateway import ListenError, serve

    from rwkv_chat.daemon.config import ConfigError

    paths = _paths()
    try:
        http = _config(paths).http
    except ConfigError as e:
        _err(f"rwkv-chat serve: {e}")
        return 1
    key = http.api_key if args.api_key is None else args.api_key
    try:
        return serve(paths, args.http or http.listen, key)
    except ListenError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        _err(f"rwkv-chat serve: cannot listen on {args.http or http.listen}: {e.strerror or e}")
        return 1


def _conversations(args) -> int:
    from rwkv_chat.daemon.client import Client

    from .texts import exchanges, plural

    with Client(_paths()) as c:
        if args.conv_cmd == "list":
            items = c.conversations()
            if args.json:
                import msgspec

                print(json.dumps(msgspec.to_builtins(items), indent=2))
            for it in ([] if args.json else items):
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(it.updated))
                print(f"{it.id}\t{when}\t{plural(exchanges(it), 'exchange')}\t{it.title}")
            return 0
        cid = _resolve(c, args.id)
        if args.conv_cmd == "show":
            d = c.conversation(cid)
            print(f"# {d.conversation.title or d.conversation.id}")
            if d.conversation.system_prompt:
                print(f"System: {d.conversation.system_prompt}")
            for t in d.turns:
                stopped = " [stopped]" if t.reason == "cancelled" else ""
                print(f"{t.role.capitalize()}: {t.text}{stopped}")
        elif args.conv_cmd == "export":
            sys.stdout.write(c.export(cid, args.format, args.branches or ""))
        elif args.conv_cmd == "tree":
            from .texts import render_tree

            b = c.branches(cid)
            print(render_tree(b.turns, b.leaf) if b.turns else "(no turns yet)")
        elif args.conv_cmd == "rm":
            c.delete(cid)
            _err(f"removed {cid}")
    return 0


def _doctor(args) -> int:
    from rwkv_chat.daemon.doctor import report

    from .texts import build_line

    interactive = sys.stderr.isatty()

    def progress(build) -> None:
        p = build.progress()
        if interactive:
            sys.stderr.write(f"\r\x1b[K{p['device']} kernels {progress_bar(p['compiled'], p['total'])} sources, "
                             f"{p['seconds']:.0f} s")
            sys.stderr.flush()
        if build.done:
            if interactive:
                sys.stderr.write("\r\x1b[K")
            _err(build_line(p))

    rep = report(_paths(), build=args.build, progress=progress)
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    for section, values in rep.items():
        print(f"[{section}]")
        if isinstance(values, dict):
            for k, v in values.items():
                if k == "kernel_build":
                    v = "; ".join(build_line(b) for b in v)
                if isinstance(v, dict):
                    print(f"  {k}:")
                    for line in _grouped(v):
                        print(f"    {line}")
                else:
                    print(f"  {k}: {v}")
        else:
            print(f"  {values}")
    return 0


def _grouped(values: dict) -> list[str]:
    """``name: value`` lines of a dict, names that share one text value on one line (``wkv4, wkv5: ok``)."""
    groups: dict[str, list[str]] = {}
    for name, v in values.items():
        groups.setdefault(v if isinstance(v, str) else json.dumps(v, default=str), []).append(str(name))
    return [f"{', '.join(names)}: {v}" for v, names in groups.items()]


if __name__ == "__main__":
    sys.exit(main())
