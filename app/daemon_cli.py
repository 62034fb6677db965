"""The daemon commands of the CLI: ``daemon start|stop|status``, ``load``, ``doctor``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from .cli_common import UsageError, _config, _err, _paths, _with_client, progress_bar


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
        # the model named, or the config's default model, which the daemon loads at start: followed to its end
        return _wait_for_load(paths) if model or _config(paths).model.path else 0
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
            # the stages; not the per-layer list ("0-cpu-float32-float32 1-…", `rwkv-chat plan` shows it)
            if line.startswith(("Strategy:", "*")):
                print(f"  {line}")
        print(f"serving: {serving(mdl)}")
        if "batch_invariant" in mdl:
            print(f"decode: up to {mdl['max_batch']} conversations a step, batch sizes {tuple(mdl['buckets'])}; "
                  + ("a conversation's tokens do not depend on the others in its step" if mdl["batch_invariant"]
                     else "batch-invariant: no (a sampled conversation's text may differ with its neighbours in the "
                          "last bits of its logits; [daemon] batch_invariant = true in config.toml makes it exact)"))
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
        print(f"prefix cache: {pc['entries']} states, {_mib(pc['bytes'])} of {_mib(pc['budget'])}; "
              f"{_count(pc['hits'], 'hit')}, {_count(pc['misses'], 'miss')}; "
              f"prompt tokens reused {pc['cached_tokens']}, read {pc['prefilled_tokens']}")
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
            f"{hits.get('disk', 0)} disk; {_count(ps.get('misses', 0), 'miss')}")


def _count(n: int, word: str) -> str:
    """``"1 miss"``, ``"2 misses"``, ``"1 hit"``, ``"0 hits"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('s') else 's'}"


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
    # none named: "" asks for the daemon's default (the config's strategy, in the checkpoint's own weight format
    # where it holds one: a file of `rwkv-chat convert`, a GPTQ folder)
    strategy = named = " ".join((args.strategy or own_strategy or "").split())
    interactive = sys.stderr.isatty()

    def run(c) -> int:
        nonlocal strategy
        name = os.path.basename(path)
        said_queued = False
        if not interactive:
            _err(f"loading {path} with " + (f"strategy {strategy!r}" if strategy else "the default strategy") + " ...")
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
                strategy = strategy or (c.status().get("model") or {}).get("strategy", "")
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

        # a strategy named is kept; none named keeps the config's (the daemon fits it to each checkpoint)
        cfg.model.path, cfg.model.strategy = path, named or cfg.model.strategy
        save_config(cfg, paths.config_file)
        _err(f"default model saved in {paths.config_file}")
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
        if isinstance(values, dict) and not values:
            print("  none")                   # e.g. no kernel build in this home yet
        elif isinstance(values, dict):
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
