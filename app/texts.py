"""Words the command line and the terminal UI share (no Textual import: the CLI starts fast)."""

from __future__ import annotations

#: the strategy syntax, for ``rwkv-chat load --help``, ``daemon start --help`` and the TUI's load screen
STRATEGY_HELP = """\
A strategy says where the model's layers run and in which number format:
  DEVICE DTYPE [*N[+]] [-> DEVICE DTYPE ...]
  DEVICE   cpu, cuda, cuda:1, mps or dml
  DTYPE    fp32 (exact; on the CPU the only fast one), bf16 (half the memory), fp16 (GPUs);
           add i8 (8-bit weights, half the memory again), i4 (4-bit, GPTQ layout) or f8 (fp8 e4m3: GPUs
           of compute capability 8.9+, or the CPU, emulated): fp16i8, fp16i4, bf16f8, fp32f8
  *N       this stage holds N layers; *N+ keeps N layers on the GPU and streams the rest from CPU memory
  ->       the next stage takes the layers that follow
Examples: "cpu fp32", "cuda fp16", "cuda fp16i8", "cuda fp16 *10 -> cpu fp32", "cuda fp16 *10+\""""


def exchanges(info) -> int:
    """Exchanges (a message and its reply) of a ``ConversationInfo``: what the sidebar and ``conversations
    list`` count (``info.turns`` counts single messages; a message without a reply counts as one)."""
    return (info.turns + 1) // 2


def queued_reason(active: int) -> str:
    """Why a request waits (a ``Queued`` event's ``active``): the generations ahead of it, or, with none running,
    the model (it waits while a model loads: one unloaded by keep-alive or ``rwkv-chat unload``, another
    client's ``load``)."""
    return f"{active} generation(s) running" if active else "waiting for the model"


def plural(n: int, word: str) -> str:
    """``"1 exchange"``, ``"3 exchanges"``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


#: a low bound of a number setting: more than 0 (0 itself refused)
POSITIVE = "positive"
#: the largest integer a request carries (the protocol's signed 64-bit fields)
MAX_INT = 2**63 - 1


def in_range(value, lo=None, hi=None) -> bool:
    """Whether ``value`` is within [lo, hi] (None: unbounded; ``lo`` = ``POSITIVE``: more than 0)."""
    if lo == POSITIVE:
        return value > 0 and (hi is None or value <= hi)
    return (lo is None or value >= lo) and (hi is None or value <= hi)


def between(lo=None, hi=None) -> str:
    """A range in words: ``"must be between 0 and 1"``, ``"must be 0 or more"``, ``"must be 1 or less"``,
    ``"must be more than 0"`` (``lo`` = ``POSITIVE``)."""
    if lo == POSITIVE:
        return "must be more than 0"
    if lo is not None and hi is not None:
        return f"must be between {_num(lo)} and {_num(hi)}"
    if lo is not None:
        return f"must be {_num(lo)} or more"
    return f"must be {_num(hi)} or less"


#: C0 controls but newline and tab, DEL and the C1 controls -> visible stand-ins (Unicode's control pictures)
_UNSAFE = {**{c: chr(0x2400 + c) for c in range(0x20) if c not in (0x09, 0x0A)}, 0x7F: "\u2421",
           **{c: "\ufffd" for c in range(0x80, 0xA0)}}


def terminal_safe(text: str) -> str:
    """``text`` with every control character a terminal would act on (escape sequences, carriage returns,
    bells, ...; newline and tab excepted) shown as a visible stand-in, for model output written to a terminal."""
    return text.translate(_UNSAFE)


def build_line(build: dict) -> str:
    """A kernel build's progress (``kernels.BackgroundBuild.progress()``) in words."""
    dev = build.get("device", "?").upper() if build.get("device") == "cpu" else build.get("device", "?")
    if build.get("state") == "building":
        return (f"{dev} kernels building: {build.get('compiled', 0)}/{build.get('total', '?')} sources compiled, "
                f"{build.get('seconds', 0):.0f} s")
    if build.get("state") == "failed":
        return f"{dev} kernels: {build.get('error') or 'build failed'}"
    return f"{dev} kernels built in {build.get('seconds', 0):.0f} s"


def serving(model: dict) -> str:
    """What serves the daemon's model (a status reply's ``model``): its backend, and the kernel build it waits
    for (until then the pure-torch path answers)."""
    line = model.get("backend") or "?"
    building = [b for b in model.get("kernel_build") or [] if b.get("state") == "building"]
    if building:
        line += ("; takes the compiled kernels where they serve it once built ("
                 + "; ".join(map(build_line, building)) + ")")
    elif model.get("kernels_error"):
        line += f"; {model['kernels_error']}"
    return line


def serving_short(model: dict) -> str:
    """:func:`serving` in a few words for the status bar: ``"fused-cpu"``, ``"torch · kernels 3/7"`` (while
    the kernels build: sources compiled of all)."""
    name = (model.get("backend") or "").split(" ")[0]
    building = [b for b in model.get("kernel_build") or [] if b.get("state") == "building"]
    if building:
        b = building[0]
        return f"{name} · kernels {b.get('compiled', 0)}/{b.get('total', '?')}"
    return name


def render_tree(turns: list, leaf: int, width: int = 60) -> str:
    """The tree ``turns`` (every ``TurnInfo`` of a conversation) as indented lines, ``*`` marking the chosen
    path (the one that ends at ``leaf``): a turn's children under it, one level deeper where it has more than
    one; texts cut to ``width`` characters."""
    kids: dict[int, list] = {}
    for t in turns:
        kids.setdefault(t.parent, []).append(t)
    by = {t.index: t for t in turns}
    chosen, i = set(), leaf
    while i in by:
        chosen.add(i)
        i = by[i].parent
    lines: list[str] = []
    stack = [(t, 0) for t in reversed(kids.get(-1, []))]
    while stack:
        t, depth = stack.pop()
        text = " ".join(t.text.split())
        text = text if len(text) <= width else text[:width - 1] + "…"
        mark = "*" if t.index in chosen else " "
        sib = f" [{t.branch + 1}/{t.branches}]" if t.branches > 1 else ""
        lines.append(f"{mark} {'  ' * depth}{t.index:>3} {t.role:<9}{sib} {text}")
        below = kids.get(t.index, [])
        step = 1 if len(below) > 1 else 0
        stack += [(c, depth + step) for c in reversed(below)]
    return "\n".join(lines)
