"""The scriptable chat commands of the CLI: ``complete``, ``chat``, ``conversations``, ``serve``."""

from __future__ import annotations

import json
import sys
import time

from .cli_common import UsageError, _config, _err, _paths, _with_client, progress_bar
from .cli_args import _sampling


def _stream(gen, strip_first: bool = False, chat: bool = False, started=None) -> int:
    """Write a generation's text to stdout, its progress and summary to stderr; returns the exit code (130 when
    the generation was cancelled, here or in the daemon). ``chat``: a chat turn, which the daemon keeps as far
    as it got when interrupted. ``started(event)`` is called with the Started event (the reply begins)."""
    from rwkv_chat.daemon.protocol import messages as m

    from .texts import queued_reason, terminal_safe

    first = True
    line_open = False        # text written to stdout that does not end a line
    interactive = sys.stderr.isatty()
    tty = sys.stdout.isatty()
    position = None
    noted = reloading = begun = False      # begun: the daemon started the generation (it was not only queued)
    try:
        for ev in gen:
            if isinstance(ev, m.Queued):
                if ev.position != position:
                    position = ev.position
                    _err(f"rwkv-chat: queued, position {ev.position} of {ev.queued} ({queued_reason(ev.active)})")
                continue
            position = None
            begun = begun or isinstance(ev, (m.Started, m.Token))
            if isinstance(ev, m.Started) and started is not None:
                started(ev)
            elif isinstance(ev, m.Token):
                text = ev.text.lstrip() if (first and strip_first) else ev.text
                first = first and not text
                sys.stdout.write(terminal_safe(text) if tty else text)     # piped: the model's text exactly
                sys.stdout.flush()
                line_open = not text.endswith("\n") if text else line_open
            elif isinstance(ev, m.Progress) and ev.phase == "load":
                if not reloading:       # the model was unloaded (keep-alive, `rwkv-chat unload`): said once
                    reloading = True
                    if interactive:
                        sys.stderr.write("\r\x1b[K")
                    _err(f"rwkv-chat: loading the model again (it was unloaded): {ev.text}")
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
                # a chat reply ends its line; a completion on a terminal too (the summary and the shell prompt
                # start on their own line), piped it stays the model's text exactly
                if strip_first or (line_open and sys.stdout.isatty()):
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                context = (f"; context {ev.context_used if ev.context_used is not None else '?'}/"
                           f"{ev.context_limit} tokens" if ev.context_limit else "")
                full = ev.reason == "length" and ev.context_limit and ev.context_used == ev.context_limit
                reason = "context limit reached" if full else ev.reason
                _err(f"[{reason}: {ev.tokens} tokens at {ev.tokens_per_s:.1f} tokens/s; "
                     f"prefill {ev.prompt_tokens} tokens in {ev.prefill_s:.2f} s{context}]")
                if ev.reason == "cancelled":
                    _err("rwkv-chat: cancelled by the daemon (stopped, or cancelled by another client)")
                    return 130
    except KeyboardInterrupt:
        gen.close()          # cancels the generation in the daemon
        sys.stdout.write("\n")
        if chat and not begun:
            _err("rwkv-chat: stopped while queued: nothing was sent to the conversation")
        else:
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
    ``new_ok`` (a message is sent), a valid id that names none is returned as it is (a new conversation), and
    the start of an id is refused: it may be a new id meant for a conversation of its own. Raises UsageError."""
    from rwkv_chat.daemon.protocol import CONVERSATION_ID_RE

    if not ref.strip() or len(ref) > 1000:
        raise UsageError(f"{ref[:40]!r} does not name a conversation: give its id, the start of its id, or its title")
    items = client.find(ref)
    if len(items) == 1 and new_ok and ref not in (items[0].id, items[0].title):
        raise UsageError(f"{ref!r} is the start of the id of conversation {items[0].id} "
                         f"({items[0].title or 'untitled'}): give its whole id to continue it, or another new id")
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


#: characters of an id prefix that ``conversations rm`` takes (a shorter one could name a conversation by accident)
RM_MIN_PREFIX = 4


def _conversations(args) -> int:
    from rwkv_chat.daemon.client import Client

    from .texts import exchanges, plural, terminal_safe

    shown = terminal_safe if sys.stdout.isatty() else str       # a terminal gets stand-ins for control characters
    with Client(_paths()) as c:
        if args.conv_cmd == "list":
            items = c.conversations()
            if args.json:
                import msgspec

                print(json.dumps(msgspec.to_builtins(items), indent=2))
            if not items and not args.json:
                _err("no conversations yet: `rwkv-chat chat MESSAGE` or the terminal UI (`rwkv-chat`) starts one")
            for it in ([] if args.json else items):
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(it.updated))
                print(f"{it.id}\t{when}\t{plural(exchanges(it), 'exchange')}\t{shown(it.title)}")
            return 0
        cid = _resolve(c, args.id)
        if args.conv_cmd == "show":
            d = c.conversation(cid, context=True)
            print(f"# {shown(d.conversation.title or d.conversation.id)}")
            if d.conversation.system_prompt:
                print(f"System: {shown(d.conversation.system_prompt)}")
            for t in d.turns:
                stopped = " [stopped]" if t.reason == "cancelled" else ""
                print(f"{t.role.capitalize()}: {shown(t.text)}{stopped}")
            if d.context_limit:          # as after a reply of `rwkv-chat chat`: what the next one starts from
                _err(f"[context {d.context_used}/{d.context_limit} tokens]")
        elif args.conv_cmd == "export":
            sys.stdout.write(c.export(cid, args.format, args.branches or ""))
        elif args.conv_cmd == "tree":
            from .texts import render_tree

            b = c.branches(cid)
            print(render_tree(b.turns, b.leaf) if b.turns else "(no turns yet)")
        elif args.conv_cmd == "rm":
            if args.id != cid and cid.startswith(args.id) and len(args.id) < RM_MIN_PREFIX \
                    and not any(it.title == args.id for it in c.find(args.id)):
                raise UsageError(f"{args.id!r} is only the start of {cid}: removing takes at least {RM_MIN_PREFIX} "
                                 "characters of the id, the whole id or the title")
            c.delete(cid)
            _err(f"removed {cid}")
    return 0
