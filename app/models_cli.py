"""The model commands of the CLI: ``pull`` (from the Hugging Face Hub), ``models`` (list, show, rm), ``ps``
(what the daemon holds) and ``unload``; and how ``load`` finds a model by its local name.

User mistakes (an unknown name, a name already taken, a repo or file that does not exist) are one line on
stderr with exit status 2; a failed download (network, checksum) exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time


from .cli_common import _err, _paths


def add_parsers(sub, make) -> None:
    """Add ``pull``, ``models``, ``ps`` and ``unload`` to the subcommands ``sub``; ``make(sub, name, summary,
    description, examples)`` builds one (the CLI's ``_sub``)."""
    pp = make(sub, "pull", "download a model from the Hugging Face Hub and give it a short name",
              "Download an RWKV checkpoint (.pth or .safetensors) from a Hugging Face repo, or a whole model\n"
              "folder (a repo with config.json: config, tokenizer, safetensors weights), into the Hugging Face\n"
              "cache, check it against the Hub's checksum and record it under a short local name for\n"
              "`rwkv-chat load NAME`. Without FILE, a repo with several weight files lists them (and asks\n"
              "which one on a terminal). Interrupted downloads resume. HF_ENDPOINT, HF_HOME, HF_TOKEN and\n"
              "HF_HUB_OFFLINE work as for every Hugging Face tool.",
              ["rwkv-chat pull BlinkDL/rwkv7-g1 rwkv7-g1-1.5b-20250429-ctx4096.pth",
               "rwkv-chat pull BlinkDL/rwkv7-g1                  # list the files and pick one",
               "rwkv-chat pull Qwen/Qwen2.5-1.5B-Instruct        # a whole model folder",
               "rwkv-chat pull BlinkDL/rwkv7-g1 FILE --name g1   # choose the local name"])
    pp.add_argument("repo", metavar="REPO", help="the Hub repo, OWNER/NAME")
    pp.add_argument("file", metavar="FILE", nargs="?", help="the weight file in the repo (default: list them)")
    pp.add_argument("--revision", metavar="R", help="branch, tag or commit (default: main)")
    pp.add_argument("--name", metavar="NAME", help="the local name (default: from the file or repo name)")

    mp = make(sub, "models", "list, show or remove local models",
              "The models pulled from the Hub, by local name (`rwkv-chat load NAME` loads one).",
              ["rwkv-chat models", "rwkv-chat models show rwkv7-g1-1.5b", "rwkv-chat models rm rwkv7-g1-1.5b"])
    mp.add_argument("--json", action="store_true", help="print the list as JSON")
    msub = mp.add_subparsers(dest="models_cmd", title="model commands", metavar="ACTION")
    make(msub, "list", "list local models (the default)", "One line per local model.",
         ["rwkv-chat models list"]).add_argument("--json", action="store_true", help="print the list as JSON")
    make(msub, "show", "show a local model's details", "Where a model came from, what it is and where it is.",
         ["rwkv-chat models show rwkv7-g1-1.5b"]).add_argument("name", metavar="NAME", help="the local name")
    make(msub, "rm", "forget a local model and free its disk space",
         "Forget a local model and delete its files from the Hugging Face cache (files another local model\n"
         "uses stay).", ["rwkv-chat models rm rwkv7-g1-1.5b"]).add_argument("name", metavar="NAME",
                                                                        help="the local name")

    ps = make(sub, "ps", "show the loaded model, its memory, idle time and conversations in memory",
              "What the daemon holds: its model (or that it was unloaded after being idle: it loads again on\n"
              "the next request), devices, memory, how long it has been idle, and the conversations whose\n"
              "states are in memory. Exit status 1 when no daemon runs.",
              ["rwkv-chat ps", "rwkv-chat ps --json"])
    ps.add_argument("--json", action="store_true", help="print as JSON")
    make(sub, "unload", "unload the daemon's model now (it loads again on the next request)",
         "Free the model's memory now. Conversations are kept; the next chat or completion loads the model\n"
         "again.", ["rwkv-chat unload"])


# ---------------------------------------------------------------- pull
def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _pick(repo: str, files: list[tuple[str, int]]) -> str | None:
    """Ask which file on a terminal (None when the user gives up)."""
    for i, (path, size) in enumerate(files, 1):
        print(f"  {i:>3}  {path}  ({_size(size)})")
    while True:
        try:
            answer = input(f"which file of {repo}? [1-{len(files)}, Enter to cancel] ").strip()
        except EOFError:
            return None
        if not answer:
            return None
        if answer.isdigit() and 1 <= int(answer) <= len(files):
            return files[int(answer) - 1][0]
        names = [p for p, _ in files if p == answer]
        if names:
            return names[0]
        print(f"give a number from 1 to {len(files)}")


def pull(args) -> int:
    from rwkv_chat.daemon import hub
    from rwkv_chat.daemon.registry import RegistryError

    paths = _paths()
    if "/" not in args.repo.strip("/"):
        _err(f"rwkv-chat pull: error: {args.repo!r} is not a repo: give OWNER/NAME (e.g. BlinkDL/rwkv7-g1)")
        return 2
    file = args.file
    try:
        try:
            entry = hub.pull(args.repo, file, revision=args.revision, name=args.name, data_dir=paths.data_dir)
        except hub.ChooseFile as e:
            if not sys.stdin.isatty():
                for path, size in e.files:
                    print(f"{path}\t{_size(size)}")
                _err(f"rwkv-chat: {e}")
                return 1
            file = _pick(args.repo, e.files)
            if file is None:
                _err("rwkv-chat: nothing pulled")
                return 1
            entry = hub.pull(args.repo, file, revision=args.revision, name=args.name, data_dir=paths.data_dir)
    except RegistryError as e:
        _err(f"rwkv-chat: {e}")
        return 2
    except hub.ChecksumError as e:
        _err(f"rwkv-chat: {e}")
        return 1
    except hub.HubError as e:
        _err(f"rwkv-chat: {e}")
        return 2 if isinstance(e, hub.NotOnHub) else 1
    _err(f"pulled {entry.repo} {entry.file or '(folder)'} as {entry.name}: {_describe(entry)}, {_size(entry.bytes)}")
    _err(f"load it with: rwkv-chat load {entry.name}")
    return 0


# ---------------------------------------------------------------- models
def _describe(e) -> str:
    family = "RWKV" if e.family == "rwkv" else e.family
    version = f" v{e.version}" if e.family == "rwkv" else ""
    return f"{family}{version} {e.size}".strip()


def _default_strategy(entry, cfg) -> str:
    return entry.strategy or cfg.model.strategy


def models(args) -> int:
    from rwkv_chat.daemon import hub
    from rwkv_chat.daemon.config import load_config
    from rwkv_chat.daemon.registry import Registry, RegistryError

    paths = _paths()
    registry = Registry(paths.data_dir)
    cfg = load_config(paths.config_file)
    cmd = args.models_cmd or "list"
    try:
        if cmd == "list":
            entries = registry.entries()
            if args.json:
                from dataclasses import asdict

                print(json.dumps([asdict(e) | {"default_strategy": _default_strategy(e, cfg)} for e in entries],
                                 indent=2))
                return 0
            if not entries:
                _err("no local models yet: rwkv-chat pull OWNER/REPO [FILE] downloads one")
                return 0
            rows = [("NAME", "FAMILY", "VERSION/SIZE", "FORMAT", "SIZE ON DISK", "STRATEGY", "PATH")]
            for e in entries:
                rows.append((e.name, e.family, f"{'v' + e.version if e.family == 'rwkv' else e.version} {e.size}",
                             e.format, _size(e.bytes), _default_strategy(e, cfg), e.path))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
            for r in rows:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
            return 0
        if cmd == "show":
            e = registry.get(args.name)
            if e is None:
                raise RegistryError(f"no local model is called {args.name[:80]!r} (`rwkv-chat models` lists them)")
            print(f"name: {e.name}\nmodel: {_describe(e)} ({e.params:,} parameters, {e.format})")
            try:
                from rwkv_chat.daemon.headers import describe

                f = describe(e.path)
                print(f"shape: {f.n_layer} layers x {f.n_embd}, vocabulary {f.vocab_size:,}")
            except Exception as ex:  # noqa: BLE001 — the files may be gone; say so
                print(f"files: unreadable ({ex})")
            print(f"from: {e.repo} {e.file or '(folder)'} at {e.revision} ({e.commit or 'unknown commit'})")
            print(f"path: {e.path}\nsize on disk: {_size(e.bytes)}\ndefault strategy: {_default_strategy(e, cfg)}")
            print(f"pulled: {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.added))}")
            return 0
        entry, freed = hub.remove(args.name, paths.data_dir)
        _err(f"removed {entry.name}; freed {_size(freed)}")
        return 0
    except RegistryError as e:
        _err(f"rwkv-chat: {e}")
        return 2


def load_target(ref: str, paths) -> tuple[str, str]:
    """What ``rwkv-chat load REF`` sends: ``(path or local name, the model's own default strategy or "")``.
    Raises FileNotFoundError when ``ref`` is neither an existing file/folder nor a local model's name."""
    from rwkv_chat.daemon.registry import NAME_RE, Registry, existing_path

    p = os.path.expanduser(ref)
    if os.path.exists(p):
        return os.path.abspath(p), ""
    entry = Registry(paths.data_dir).get(ref) if NAME_RE.fullmatch(ref) else None
    if entry is None and (found := existing_path(ref)) is not None:      # "model" for model.pth
        return os.path.abspath(found), ""
    if entry is None:
        raise FileNotFoundError(f"no model file or local model named {ref!r} (`rwkv-chat models` lists the local "
                                "models; `rwkv-chat pull` downloads one)")
    return entry.name, entry.strategy


# ---------------------------------------------------------------- ps / unload
def _duration(s: float) -> str:
    s = int(s)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def ps(args) -> int:
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.launcher import daemon_state

    paths = _paths()
    if daemon_state(paths).state != "running":
        _err("rwkv-chat: no daemon is running")
        return 1
    with Client(paths, autostart=False) as c:
        st = c.status()
    mdl, sessions = st["model"], st["home"].get("sessions", {})
    in_memory = sessions.get("resident", 0) + sessions.get("spilled", 0)
    if args.json:
        print(json.dumps({"model": mdl, "memory": st["memory"], "devices": st["devices"], "active": st["active"],
                          "queued": st["queued"], "conversations_in_memory": in_memory}, indent=2))
        return 0
    name = mdl.get("name") or ""
    if not name and mdl.get("path"):                 # loaded by path: a local model may have that file
        from rwkv_chat.daemon.registry import Registry, RegistryError

        try:
            same = [e.name for e in Registry(paths.data_dir).entries()
                    if os.path.realpath(e.path) == os.path.realpath(mdl["path"])]
        except RegistryError:
            same = []
        name = same[0] if same else ""
    where = f"{name} ({mdl['path']})" if name else mdl.get("path", "")
    if mdl.get("loaded"):
        state = "loaded"
    elif mdl.get("loading"):
        state, where = "loading", mdl["loading"]
    elif mdl.get("unloaded"):
        state = f"unloaded ({mdl['unloaded']}); it loads again on the next request"
    else:
        state, where = "no model", "-"
    print(f"model: {where}")
    print(f"state: {state}")
    if mdl.get("loaded"):
        family = f"Qwen{mdl.get('version')}" if mdl.get("family") == "qwen2" else f"RWKV v{mdl.get('version')}"
        print(f"kind: {family}, {mdl.get('n_layer')} layers x {mdl.get('n_embd')}")
    if mdl.get("strategy"):
        print(f"strategy: {mdl['strategy']}")
    if mdl.get("loaded") and mdl.get("backend"):
        from .texts import serving_short

        print(f"backend: {serving_short(mdl)}")
    print("devices: " + ", ".join(st["devices"]))
    mem = st["memory"]
    print(f"memory: RSS {_size(mem.get('rss_bytes', mem['max_rss_bytes']))}"
          + "".join(f", {d['device']} {_size(d['allocated_bytes'])} allocated" for d in mem.get("cuda", [])))
    keep = mdl.get("keep_alive", 0)
    busy = len(st["active"]) + st["queued"]
    if busy:
        print(f"idle: no ({len(st['active'])} generation(s) running, {st['queued']} queued)")
    else:
        rule = f"unloads after {_duration(keep)} idle" if keep else "keep-alive off: never unloads"
        print(f"idle: {_duration(mdl.get('idle_s', 0))} ({rule})")
    print(f"conversations in memory: {in_memory} ({sessions.get('resident', 0)} on the model's devices, "
          f"{sessions.get('spilled', 0)} in CPU memory)")
    return 0


def unload(args) -> int:
    from rwkv_chat.daemon.client import Client
    from rwkv_chat.daemon.launcher import daemon_state
    from rwkv_chat.daemon.protocol import messages as m

    paths = _paths()
    if daemon_state(paths).state != "running":
        _err("rwkv-chat: no daemon is running")
        return 0
    with Client(paths, autostart=False) as c:
        for ev in c.unload():
            if isinstance(ev, m.Done):
                _err(f"rwkv-chat: {ev.text}" if ev.text else
                     "unloaded the model (it loads again on the next request)")
    return 0
