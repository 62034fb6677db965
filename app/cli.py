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


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, dest="max_tokens")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float, dest="top_p")
    p.add_argument("--top-k", type=int, dest="top_k")
    p.add_argument("--alpha-frequency", type=float, dest="alpha_frequency")
    p.add_argument("--alpha-presence", type=float, dest="alpha_presence")
    p.add_argument("--alpha-decay", type=float, dest="alpha_decay")
    p.add_argument("--seed", type=int)


def _sampling(args) -> dict:
    keys = ("max_tokens", "temperature", "top_p", "top_k", "alpha_frequency", "alpha_presence", "alpha_decay", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rwkv-chat", description="Chat with RWKV language models in the terminal.")
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("daemon", help="start, stop or inspect the background daemon")
    dsub = d.add_subparsers(dest="daemon_cmd", required=True)
    ds = dsub.add_parser("start", help="start the daemon in the background (with --model: wait for the load)",
                         description="Start the daemon in the background. With --model it waits until the model "
                                     "is loaded (progress on stderr) and exits 1 with the reason if it does not "
                                     "load; the daemon then runs without a model and `rwkv-chat daemon status` "
                                     "shows the error.")
    ds.add_argument("--model", help="checkpoint to load at start, e.g. ~/models/RWKV-x070-World-0.1B.pth")
    ds.add_argument("--strategy", help='strategy for --model, e.g. "cpu fp32" (default: the config\'s)')
    ds.add_argument("--foreground", action="store_true")
    dsub.add_parser("stop")
    dst = dsub.add_parser("status")
    dst.add_argument("--json", action="store_true")
    lp = sub.add_parser("load", help="load (or switch) the daemon's model")
    lp.add_argument("path")
    lp.add_argument("--strategy", default=None)
    lp.add_argument("--default", action="store_true", help="also make it the default model in the config")
    cp = sub.add_parser("complete", help="raw completion, streamed to stdout")
    cp.add_argument("prompt")
    cp.add_argument("--stop", action="append", default=[])
    _sampling_flags(cp)
    ch = sub.add_parser("chat", help="one chat turn, streamed to stdout")
    ch.add_argument("message")
    ch.add_argument("--conversation", metavar="CONVERSATION",
                    help="continue this conversation: its id, the start of its id, or its exact title; a new id "
                         "(letters, digits, _ and -) starts a conversation with that id (default: a new one)")
    _sampling_flags(ch)
    cv = sub.add_parser("conversations", help="list, show, export or remove conversations")
    cvs = cv.add_subparsers(dest="conv_cmd", required=True)
    cvs.add_parser("list").add_argument("--json", action="store_true")
    conv_help = "the conversation: its id, the start of its id, or its exact title"
    cvs.add_parser("show").add_argument("id", metavar="CONVERSATION", help=conv_help)
    ex = cvs.add_parser("export")
    ex.add_argument("id", metavar="CONVERSATION", help=conv_help)
    ex.add_argument("--format", choices=("md", "json"), default="md")
    cvs.add_parser("rm").add_argument("id", metavar="CONVERSATION", help=conv_help)
    dp = sub.add_parser("doctor", help="devices, versions, kernel builds, paths")
    dp.add_argument("--json", action="store_true")
    sub.add_parser("bench", help="speed of prefill and decode (rwkv-chat bench --help)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code. A closed stdout (``rwkv-chat doctor | head``) ends
    the command quietly with 0 (a generation in progress is cancelled)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
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
        if args.cmd is None:
            return _tui()
        return {"daemon": _daemon, "load": _load, "complete": _complete, "chat": _chat,
                "conversations": _conversations, "doctor": _doctor}[args.cmd](args)
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
        _err(f"rwkv-chat: {e}")
        return 1
    except KeyboardInterrupt:
        _err("rwkv-chat: interrupted")
        return 130


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
            if args.model:
                _err("rwkv-chat: use `rwkv-chat load PATH` to switch its model")
            return 0
        model = os.path.abspath(os.path.expanduser(args.model)) if args.model else None
        info = spawn_daemon(paths, model, args.strategy)
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
            if interactive:
                sys.stderr.write(f"\r\x1b[K{line}")
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
    mdl = st["model"]
    print(f"daemon: pid {st['pid']}, version {st['version']}, protocol {st['protocol']}, up {st['uptime']:.0f} s")
    if mdl.get("loaded"):
        print(f"model: {mdl['path']} (RWKV v{mdl['version']}, {mdl['n_layer']} layers x {mdl['n_embd']}, "
              f"vocab {mdl['vocab_size']}, tokenizer {mdl['tokenizer']})")
        print(f"strategy: {mdl['strategy']}")
        for line in str(mdl.get("plan", "")).splitlines():
            print(f"  {line}")
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


def _load(args) -> int:
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.protocol import messages as m

    paths = _paths()
    cfg = _config(paths)
    strategy = args.strategy or cfg.model.strategy
    path = os.path.abspath(args.path)
    interactive = sys.stderr.isatty()
    said_queued = False
    with Client(paths) as c:
        for ev in c.load(path, strategy):
            if isinstance(ev, m.Progress):
                line = f"loading {ev.text}: layer {ev.done}/{ev.total}"
                if interactive:
                    sys.stderr.write(f"\r\x1b[K{line}")
                    sys.stderr.flush()
                else:
                    _err(line)
            elif isinstance(ev, m.Queued):
                if not said_queued:
                    _err(f"rwkv-chat: the load waits for {ev.active} running generation(s) to finish")
                said_queued = True
            elif isinstance(ev, m.Done):
                if interactive:
                    sys.stderr.write("\r\x1b[K")
                if ev.reason == "cancelled":
                    _err("rwkv-chat: the load was cancelled (the daemon stopped)")
                    return 130
                _err(f"loaded {path} with strategy {strategy!r} in {ev.prefill_s:.2f} s")
    if args.default:
        from rwkv_chat.daemon.config import save_config

        cfg.model.path, cfg.model.strategy = path, strategy
        save_config(cfg, paths.config_file)
        _err(f"default model saved in {paths.config_file}")
    return 0


def _stream(gen, strip_first: bool = False, chat: bool = False) -> int:
    """Write a generation's text to stdout, its progress and summary to stderr; returns the exit code (130 when
    the generation was cancelled, here or in the daemon). ``chat``: a chat turn, which the daemon keeps as far
    as it got when interrupted."""
    from rwkv_chat.daemon.protocol import messages as m

    first = True
    interactive = sys.stderr.isatty()
    position = None
    noted = False
    try:
        for ev in gen:
            if isinstance(ev, m.Queued):
                if ev.position != position:
                    position = ev.position
                    _err(f"rwkv-chat: queued, position {ev.position} of {ev.queued} "
                         f"({ev.active} generation(s) running)")
                continue
            position = None
            if isinstance(ev, m.Token):
                text = ev.text.lstrip() if (first and strip_first) else ev.text
                first = first and not text
                sys.stdout.write(text)
                sys.stdout.flush()
            elif isinstance(ev, m.Progress) and ev.text and not noted:
                noted = True            # why the history is re-read: said once, terminal or not
                _err(f"rwkv-chat: {ev.text}")
            if isinstance(ev, m.Progress) and interactive:
                sys.stderr.write(f"\r{ev.phase} {ev.done}/{ev.total}")
                sys.stderr.flush()
                if ev.done >= ev.total:
                    sys.stderr.write("\r\x1b[K")
            elif isinstance(ev, m.Done):
                if strip_first:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                _err(f"[{ev.reason}: {ev.tokens} tokens at {ev.tokens_per_s:.1f} tokens/s; "
                     f"prefill {ev.prompt_tokens} tokens in {ev.prefill_s:.2f} s]")
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


def _complete(args) -> int:
    from rwkv_chat.daemon.client import Client

    with Client(_paths()) as c:
        return _stream(c.complete(args.prompt, stop=args.stop, **_sampling(args)))


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
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.protocol import new_conversation_id

    with Client(_paths()) as c:
        if args.conversation is None:
            cid = new_conversation_id()
            _err(f"conversation: {cid}")
        else:
            cid = _resolve(c, args.conversation, new_ok=True)
        return _stream(c.chat(cid, args.message, **_sampling(args)), strip_first=True, chat=True)


def _conversations(args) -> int:
    from rwkv_chat.daemon.client import Client

    with Client(_paths()) as c:
        if args.conv_cmd == "list":
            items = c.conversations()
            if args.json:
                import msgspec

                print(json.dumps(msgspec.to_builtins(items), indent=2))
            for it in ([] if args.json else items):
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(it.updated))
                print(f"{it.id}\t{when}\t{it.turns} turns\t{it.title}")
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
            sys.stdout.write(c.export(cid, args.format))
        elif args.conv_cmd == "rm":
            c.delete(cid)
            _err(f"removed {cid}")
    return 0


def _doctor(args) -> int:
    from rwkv_chat.daemon.doctor import report

    rep = report(_paths())
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    for section, values in rep.items():
        print(f"[{section}]")
        if isinstance(values, dict):
            for k, v in values.items():
                print(f"  {k}: {v}")
        else:
            print(f"  {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
