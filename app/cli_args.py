"""The CLI's argument parser: every command, its flags, help and examples (``rwkv-chat --help``)."""

from __future__ import annotations

import argparse
import math

from .texts import MAX_INT, POSITIVE


#: (flag, dest, type, low, high, help): the sampling flags of ``complete`` and ``chat``
SAMPLING_FLAGS = [
    ("--max-tokens", "max_tokens", int, 1, MAX_INT, "most tokens to generate (default: the config's, 256)"),
    ("--temperature", "temperature", float, 0.0, None,
     "randomness: 0 always picks the likeliest token, 1 samples as the model says (default 1, or what a model "
     "folder's generation_config.json sets)"),
    ("--top-p", "top_p", float, 0.0, 1.0, "sample only from the likeliest tokens holding this much probability "
                                          "(0-1, default 0.85, or the model folder's)"),
    ("--top-k", "top_k", int, 0, MAX_INT, "sample only from the K likeliest tokens (0 = no limit, the default, or the "
                                       "model folder's)"),
    ("--alpha-frequency", "alpha_frequency", float, 0.0, None,
     "penalty per earlier use of a token: fewer repetitions (default 0.2)"),
    ("--alpha-presence", "alpha_presence", float, 0.0, None,
     "penalty for a token used at all before (default 0.2)"),
    ("--alpha-decay", "alpha_decay", float, 0.0, 1.0, "how fast the penalties fade, per token (0-1, default 0.996)"),
    ("--repetition-penalty", "repetition_penalty", float, POSITIVE, None,
     "divide the scores of tokens already in the context by this (Hugging Face's penalty; more than 0, 1 = off, "
     "the default unless the model's generation_config.json sets one)"),
    ("--seed", "seed", int, 0, MAX_INT, "random seed: the same seed and settings give the same text"),
]


def _number(kind, lo=None, hi=None):
    """An argparse type: a ``kind`` (int or float) within [lo, hi] (``texts.in_range``), refused in words."""
    from .texts import between, in_range

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'a whole number' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if not in_range(value, lo, hi):      # the 64-bit limit is named only to a value beyond it
            bound = hi if hi != MAX_INT or in_range(value, lo, None) else None
            raise argparse.ArgumentTypeError(f"{between(lo, bound)}, got {text}")
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


def _version() -> str:
    """The installed package's version (``pyproject.toml``), or "unknown" for a source tree not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rwkv-chat")
    except PackageNotFoundError:
        return "unknown"


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
    ap.add_argument("--version", action="version", version=f"rwkv-chat {_version()}",
                    help="print the installed version and exit")
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
              "`rwkv-chat daemon status` shows the error. A --model that names no file, folder or local model\n"
              "is refused first (exit 2, nothing started). If a daemon already runs, --model is loaded into\n"
              "it (as `rwkv-chat load`).\n\n"
              + STRATEGY_HELP,
              ['rwkv-chat daemon start --model ~/models/rwkv7-0.1B.pth --strategy "cpu fp32"',
               "rwkv-chat daemon start --foreground          # logs in this terminal; Ctrl+C stops it"])
    ds.add_argument("--model", metavar="MODEL", help="model to load: a local model's name (rwkv-chat models), a "
                                                     "checkpoint (.pth or .safetensors), e.g. "
                                                     "~/models/RWKV-x070-World-0.1B.pth, or a Hugging Face "
                                                     "Qwen2/Qwen3 folder; the command waits for it")
    ds.add_argument("--strategy", metavar="S",
                    help='where and how the model runs, e.g. "cpu fp32" (default: the config\'s, in a '
                         'pre-quantized checkpoint\'s own format; see above)')
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
                    help="where and how the model runs (default: the config's, cpu fp32 at first, in a "
                         "pre-quantized checkpoint's own format; see above)")
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
                    help="continue this conversation: its whole id or its exact title; a new id (letters, digits, "
                         "_ and -, not the start of an existing id) starts a conversation with that id (default: a "
                         "new one)")
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
    cv = _sub(sub, "conversations", "list, show, export, tree (branches) or remove conversations",
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
