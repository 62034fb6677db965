"""Strategy strings: where each layer of an RWKV model lives and in which dtype.

Grammar (the ``rwkv`` pip package 0.8.32, ``RWKV.__init__``, ``STRATEGY_REGEX``)::

    strategy = stage ( '->' stage )*
    stage    = DEVICE ' ' DTYPE [QUANT] [ ' *' N [ '+' ] ]
    DEVICE   = cpu | cuda | cuda:N | mps | dml
    DTYPE    = fp16 | fp32 | bf16          (activation dtype; weights too unless quantized)
    QUANT    = i8 | i4 | f8                 (the weight format, see ``rwkv_chat.models.formats``)

Whitespace: any run of spaces/tabs separates the parts of a stage, and spaces around ``->`` and at
either end are ignored (the reference accepts exactly one space inside a stage; this is a superset).

Placement (the reference's "Compute strategy" block, reproduced step by step in ``_allocate``):
the model has ``n_layer + 1`` layers, the last one being the head (``ln_out`` + ``head``). Stages are
filled in order. ``*N`` pins N layers to a stage (a count reaching past the end is clamped). Stages
without ``*N`` share what is left evenly, the remainder of the division going to the last of them; if
every stage has ``*N`` and layers remain, the last stage takes them. ``*N+`` keeps N layers resident
and streams every unassigned layer to that device from pinned CPU memory.

The reference's silent traps are ``StrategyError`` here:

* quantization ``i3`` (the reference runs it unquantized; ``i4`` is the GPTQ-layout int4 format here, where
  the reference silently ran ``i4`` unquantized);
* ``*0`` without ``+`` (the reference divides by zero, or hands the stage all remaining layers);
* a stage that ends up with no layers: ``*N`` counts before it already cover every layer, stages
  without ``*N`` beside a stream stage (the reference gives them nothing), or fewer layers left
  than stages without ``*N``;
* more than one ``*N+`` stage (the reference streams only to the last one);
* ``*N+`` on ``cpu`` (streaming copies from CPU memory to an accelerator; on the CPU there is
  nothing to stream to).

Weight formats: ``i8`` (the reference's uint8 scheme), ``i4`` (int4, GPTQ layout, group 128) and ``f8``
(float8 e4m3 with per-output-channel scales). Every layer of a stage carries its stage's format
(``LayerPlacement.quant``, shown per layer by ``str(plan)``), except the head of an ``i4`` stage, which stays in
the activation dtype (``HEAD_IN_ACTIVATION``: its placement has ``quant`` None; ``str(plan)`` says so).
Whether a device can run a format is checked when the plan's devices are known
(``rwkv_chat.models.formats.check_plan``): ``f8`` needs CUDA compute capability >= 8.9 and runs on the CPU as
an exact emulation (shown as ``f8 (emulated)``).

A stream stage whose ``N`` already covers the remaining layers streams nothing; that is accepted
and shown by ``Plan.describe`` (``streamed: 0``). Every RWKV generation, v7 included, uses the
whole plan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from rwkv_chat.models.errors import DeviceError, StrategyError

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
QUANTS = ("i8", "i4", "f8")
_UNSUPPORTED_QUANTS = ("i3",)
#: how each weight format is stored: the dtype of its packed matrix (i4: eight nibbles per int32)
QUANT_WTYPES = {"i8": torch.uint8, "i4": torch.int32, "f8": torch.float8_e4m3fn}
_QUANT_WORDS = " | ".join(QUANTS)
#: formats whose stage keeps the head matrix in the activation dtype (as the GPTQ ecosystem keeps ``lm_head``:
#: AutoGPTQ and llama.cpp leave the output projection in higher precision by default; on small models a 4-bit
#: head costs most of the top-1 agreement). A pre-quantized checkpoint that quantized its head keeps it so.
HEAD_IN_ACTIVATION = ("i4",)
_DEVICE_RE = re.compile(r"(cpu|mps|dml|cuda)(?::([0-9]+))?", re.ASCII)
_DTYPE_RE = re.compile(r"(fp16|fp32|bf16)(.*)", re.ASCII)
_COUNT_RE = re.compile(r"\*([0-9]+)(\+?)", re.ASCII)
STREAM_DEVICES = ("cuda", "mps", "dml")
RESCALE_LAYER_FP16 = 6  # reference: ``RESCALE_LAYER = 6 if 'fp16' in strategy else 0``


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Stage:
    """One ``->``-separated part of a strategy.

    Attributes:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"`` or ``"dml"``.
        dtype: activation dtype (``torch.float16``/``float32``/``bfloat16``).
        quant: the weight format, ``"i8"``, ``"i4"`` or ``"f8"``, or ``None`` for plain float weights.
        count: ``N`` of ``*N``/``*N+``, or ``None`` when the stage shares the remaining layers.
        stream: ``True`` for ``*N+`` (N resident, the unassigned layers streamed).

    Raises:
        StrategyError: on any field outside the grammar.
    """

    device: str
    dtype: torch.dtype
    quant: str | None = None
    count: int | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        m = _DEVICE_RE.fullmatch(self.device) if isinstance(self.device, str) else None
        if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
            raise StrategyError(f"unknown device {self.device!r} (expected cpu, cuda, cuda:N, mps or dml)")
        if self.dtype not in _DTYPE_NAMES:
            raise StrategyError(f"unsupported activation dtype {self.dtype!r} (expected fp16, fp32 or bf16)")
        if self.quant is not None and self.quant not in QUANTS:
            raise StrategyError(f"quantization {self.quant!r} is not supported (expected {_QUANT_WORDS})")
        if self.count is not None and (isinstance(self.count, bool) or not isinstance(self.count, int)
                                       or self.count < 0):
            raise StrategyError(f"layer count {self.count!r} must be a non-negative integer")
        if self.stream and self.count is None:
            raise StrategyError("a stream stage needs a resident count: '*N+'")
        if self.count == 0 and not self.stream:
            raise StrategyError(f"'*0' in stage {str(self)!r} pins no layers (drop the stage, or use '*0+' "
                                "to stream every unassigned layer)")
        if self.stream and self.device == "cpu":
            raise StrategyError(f"stream stage {str(self)!r} is on cpu: '*N+' streams layers from pinned CPU "
                                f"memory to an accelerator ({', '.join(STREAM_DEVICES)})")

    @property
    def wtype(self) -> torch.dtype:
        """Weight storage dtype: ``torch.uint8`` for ``i8``, ``torch.int32`` for ``i4`` (packed nibbles),
        ``torch.float8_e4m3fn`` for ``f8``, else the activation dtype."""
        return QUANT_WTYPES.get(self.quant, self.dtype)

    @property
    def format_name(self) -> str:
        """The weight format as the plan shows it: ``"fp16"`` (plain, the activation dtype), ``"i8"``, ``"i4"``,
        ``"f8"``, or ``"f8 (emulated)"`` for ``f8`` on the CPU (e4m3 values dequantized exactly, products in the
        activation dtype)."""
        if self.quant is None:
            return _DTYPE_NAMES[self.dtype]
        return f"{self.quant} (emulated)" if self.quant == "f8" and self.device == "cpu" else self.quant

    def __str__(self) -> str:
        text = f"{self.device} {_DTYPE_NAMES[self.dtype]}{self.quant or ''}"
        if self.count is not None:
            text += f" *{self.count}{'+' if self.stream else ''}"
        return text


@dataclass(frozen=True)
class LayerPlacement:
    """Where layer ``index`` lives. ``index == n_layer`` is the head (``ln_out`` + ``head``).

    Attributes: device (as in the strategy), atype (activation dtype), wtype (weight dtype, uint8 for
    i8, int32 for i4, float8_e4m3fn for f8), stream (weights kept in pinned CPU memory and copied to
    ``device`` at use), stage (index of the stage that placed it), quant (the weight format of the layer's
    matrices: "i8", "i4", "f8" or None for plain float weights; None for the head of an ``i4`` stage, see
    ``HEAD_IN_ACTIVATION``).
    """

    index: int
    device: str
    atype: torch.dtype
    wtype: torch.dtype
    stream: bool
    stage: int
    quant: str | None = None

    def __str__(self) -> str:
        """The reference's per-layer notation, e.g. ``3-cuda-float16-uint8-stream``; the formats the reference
        lacks are named: ``3-cuda-float16-i4``, ``3-cuda-float16-f8``, ``3-cpu-float32-f8(emulated)``."""
        if self.quant in (None, "i8"):
            w = _short(self.wtype)
        else:
            w = self.quant + ("(emulated)" if self.quant == "f8" and self.device == "cpu" else "")
        return f"{self.index}-{self.device}-{_short(self.atype)}-{w}{'-stream' if self.stream else ''}"


@dataclass(frozen=True)
class Plan:
    """A strategy applied to a model of ``n_layer`` blocks.

    Attributes:
        strategy: normalized text, stages joined by ``" -> "``.
        stages: the parsed stages.
        n_layer: number of blocks.
        layers: ``n_layer + 1`` placements; the last is the head.
        backend: what serves the placed model (its backend's name and detail, set by the model at load;
            None for a plan not yet placed).
    """

    strategy: str
    stages: tuple[Stage, ...]
    n_layer: int
    layers: tuple[LayerPlacement, ...]
    backend: str | None = None

    @property
    def devices(self) -> tuple[str, ...]:
        """Distinct devices in stage order, e.g. ``("cuda", "cpu")``."""
        return tuple(dict.fromkeys(s.device for s in self.stages))

    @property
    def head(self) -> LayerPlacement:
        """Placement of the head (``ln_out`` + ``head``), the last layer."""
        return self.layers[-1]

    def describe(self) -> list[dict]:
        """One JSON-able dict per stage: ``stage`` (index), ``text``, ``device``, ``atype``, ``wtype``
        (dtype names such as ``"float16"``), ``quant``, ``format`` (``Stage.format_name``, e.g. ``"i4"`` or
        ``"f8 (emulated)"``), ``first``/``last`` (layer indices, inclusive),
        ``resident``, ``streamed`` (layer counts) and ``head`` (whether the head is in this stage)."""
        out = []
        for i, stage in enumerate(self.stages):
            mine = [p for p in self.layers if p.stage == i]
            out.append({
                "stage": i, "text": str(stage), "device": stage.device,
                "atype": _short(stage.dtype), "wtype": _short(stage.wtype), "quant": stage.quant,
                "format": stage.format_name, "first": mine[0].index, "last": mine[-1].index,
                "resident": sum(not p.stream for p in mine), "streamed": sum(p.stream for p in mine),
                "head": mine[-1].index == self.n_layer,
            })
        return out

    def __str__(self) -> str:
        """Readable table in the reference's layout: one line per stage, then every layer (then the backend,
        once placed)."""
        lines = [f"Strategy: {self.strategy} (total {self.n_layer}+1={self.n_layer + 1} layers)"]
        for d in self.describe():
            line = f"* {d['device']} {d['text'].split()[1]}, store {d['resident']} layers"
            if self.stages[d["stage"]].stream:
                line += f", stream {d['streamed']} layers"
            if d["quant"] is not None:
                line += f", weights {d['format']}"
                if d["head"] and self.head.quant is None:
                    line += f" (head in {_short(self.head.atype)})"
            lines.append(line)
        lines.append(" ".join(str(p) for p in self.layers))
        if self.backend is not None:
            lines.append(f"Backend: {self.backend}")
        return "\n".join(lines)


def _parse_stage(part: str, number: int, strategy: str) -> Stage:
    where = f"stage {part!r} of strategy {strategy!r}"
    tokens = part.split()
    if not tokens:
        raise StrategyError(f"empty stage #{number + 1} in strategy {strategy!r} (nothing around '->')")
    if len(tokens) < 2:
        raise StrategyError(f"{where} needs a device and a dtype, e.g. 'cuda fp16'")
    if len(tokens) > 3:
        extra = tokens[3:] if _COUNT_RE.fullmatch(tokens[2]) else tokens[2:]
        raise StrategyError(f"unexpected {' '.join(extra)!r} in {where} (expected DEVICE DTYPE [*N[+]])")
    dev = _DEVICE_RE.fullmatch(tokens[0])
    if dev is None or (dev.group(2) is not None and dev.group(1) != "cuda"):
        raise StrategyError(f"unknown device {tokens[0]!r} in {where} (expected cpu, cuda, cuda:N, mps or dml)")
    device = dev.group(1) if dev.group(2) is None else f"cuda:{int(dev.group(2))}"
    dt = _DTYPE_RE.fullmatch(tokens[1])
    if dt is None:
        raise StrategyError(f"unknown dtype {tokens[1]!r} in {where} (expected fp16, fp32 or bf16, "
                            "optionally followed by i8, i4 or f8)")
    quant = dt.group(2) or None
    if quant in _UNSUPPORTED_QUANTS:
        raise StrategyError(f"quantization {quant!r} in {tokens[1]!r} ({where}) is not supported "
                            f"(expected {_QUANT_WORDS})")
    if quant is not None and quant not in QUANTS:
        raise StrategyError(f"unknown quantization {quant!r} in {tokens[1]!r} ({where}) (expected {_QUANT_WORDS})")
    count, stream = None, False
    if len(tokens) == 3:
        cm = _COUNT_RE.fullmatch(tokens[2])
        if cm is None:
            raise StrategyError(f"bad layer count {tokens[2]!r} in {where} (expected *N or *N+)")
        count, stream = int(cm.group(1)), cm.group(2) == "+"
    try:
        return Stage(device, DTYPES[dt.group(1)], quant, count, stream)
    except StrategyError as e:
        raise StrategyError(f"{e} in strategy {strategy!r}") from None


def _check_streams(stages: tuple[Stage, ...], strategy: str) -> None:
    streams = [str(s) for s in stages if s.stream]
    if len(streams) > 1:
        raise StrategyError(f"more than one stream stage (*N+) in strategy {strategy!r}: "
                            f"{', '.join(map(repr, streams))}; only one stage can stream")


def parse_strategy(strategy: str) -> tuple[Stage, ...]:
    """Parse a strategy string into stages (grammar in the module docstring).

    Raises:
        StrategyError: malformed text (the message quotes the bad part), ``i3``, ``*0``,
            ``*N+`` on cpu, or more than one ``*N+`` stage.
    """
    if not isinstance(strategy, str):
        raise StrategyError(f"a strategy is a string such as 'cuda fp16', got {type(strategy).__name__}")
    if not strategy.strip():
        raise StrategyError(f"strategy {strategy!r} is empty (expected e.g. 'cpu fp32' or 'cuda fp16 *10 -> cpu fp32')")
    stages = tuple(_parse_stage(part, i, strategy) for i, part in enumerate(strategy.split("->")))
    _check_streams(stages, strategy)
    return stages


def _allocate(stages: tuple[Stage, ...], n_layer: int) -> tuple[list[int], int, int, int]:
    """The reference's allocation, line for line. Returns (layers per stage, stream stage index or -1,
    streamed count, index of the stage where the ``*N`` loop stopped or -1)."""
    plan = [0] * len(stages)
    stream_i, stream_count, broke_at = -1, 0, -1
    to_allocate, allocated, free_slots = n_layer + 1, 0, 0
    for i, s in enumerate(stages):
        if s.count is not None:
            plan[i] = s.count
            if s.stream:
                stream_i = i
            allocated += plan[i]
            if allocated >= to_allocate:
                plan[i] += to_allocate - allocated
                broke_at = i
                break
        else:
            free_slots += 1
    if stream_i < 0:
        if free_slots > 0 and to_allocate > allocated:
            for i in range(len(stages)):
                if plan[i] == 0 and free_slots > 0:
                    plan[i] = (to_allocate - allocated) // free_slots
                    allocated += plan[i]
                    free_slots -= 1
        if to_allocate > allocated:
            plan[-1] += to_allocate - allocated
    elif to_allocate > allocated:
        stream_count = to_allocate - allocated
        plan[stream_i] += stream_count
    return plan, stream_i, stream_count, broke_at


def _empty_stage_error(stages, i, n_layer, stream_i, broke_at, strategy) -> StrategyError:
    total = n_layer + 1
    head = f"stage {str(stages[i])!r} of strategy {strategy!r} gets no layers"
    if broke_at >= 0 and i > broke_at:
        why = (f"the *N counts up to {str(stages[broke_at])!r} already cover all {n_layer}+1={total} layers")
    elif stream_i >= 0 and stages[i].count is None:
        why = (f"beside the stream stage {str(stages[stream_i])!r}, stages without *N get no layers "
               "(give this stage *N)")
    elif stages[i].count is None:
        free = sum(s.count is None for s in stages)
        why = f"too few layers left ({n_layer}+1={total} in all) for {free} stages without *N"
    else:
        why = f"nothing is left to stream ({n_layer}+1={total} layers in all)"
    return StrategyError(f"{head}: {why}")


def plan_layers(strategy: str | tuple[Stage, ...], n_layer: int) -> Plan:
    """Place the ``n_layer + 1`` layers (head last) of a model on the stages of ``strategy``.

    Allocation is the reference's (module docstring); the result equals the reference's per-layer
    printout ``0-cuda-float16-uint8 1-...`` for every strategy it accepts without a trap.

    Raises:
        StrategyError: a parse error, ``n_layer`` below 1, or a stage left with no layers.
    """
    stages = parse_strategy(strategy) if isinstance(strategy, str) else tuple(strategy)
    if not stages or not all(isinstance(s, Stage) for s in stages):
        raise StrategyError(f"a strategy is a string or a non-empty tuple of Stage, got {strategy!r}")
    text = " -> ".join(str(s) for s in stages)
    _check_streams(stages, text)
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise StrategyError(f"cannot place strategy {text!r} on a model with n_layer={n_layer!r} (need >= 1)")
    plan, stream_i, stream_count, broke_at = _allocate(stages, n_layer)
    for i, n in enumerate(plan):
        if n <= 0:
            raise _empty_stage_error(stages, i, n_layer, stream_i, broke_at, text)
    layers, start = [], 0
    for i, (s, n) in enumerate(zip(stages, plan)):
        for index in range(start, start + n):
            streamed = i == stream_i and index >= start + n - stream_count
            quant = None if index == n_layer and s.quant in HEAD_IN_ACTIVATION else s.quant
            wtype = s.dtype if quant is None else s.wtype
            layers.append(LayerPlacement(index, s.device, s.dtype, wtype, streamed, i, quant))
        start += n
    return Plan(text, stages, n_layer, tuple(layers))


def rescale_layer_for(stages: str | tuple[Stage, ...]) -> int:
    """Layers between fp16 overflow rescales (``x = x / 2`` every N layers): 6 if any stage runs fp16,
    else 0 (off). Source: reference ``RESCALE_LAYER = 6 if 'fp16' in strategy else 0``.

    Raises:
        StrategyError: if ``stages`` is a malformed strategy string.
    """
    if isinstance(stages, str):
        stages = parse_strategy(stages)
    return RESCALE_LAYER_FP16 if any(s.dtype == torch.float16 for s in stages) else 0


def torch_device(name: str) -> torch.device:
    """The ``torch.device`` for a strategy device name (``dml`` through ``torch_directml.device()``).

    Raises:
        DeviceError: unknown name, CUDA missing from the torch build or without a GPU, CUDA index
            out of range, MPS not built/available, or torch-directml not installed.
    """
    m = _DEVICE_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"unknown device {name!r} (expected cpu, cuda, cuda:N, mps or dml)")
    kind, index = m.group(1), m.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise DeviceError(f"{name!r}: CUDA is not available in this torch build (torch {torch.__version__})")
        if not torch.cuda.is_available():
            raise DeviceError(f"{name!r}: CUDA is not available: torch {torch.__version__} is built with CUDA "
                              f"{torch.version.cuda} but no GPU/driver is usable")
        count = torch.cuda.device_count()
        i = int(index) if index is not None else torch.cuda.current_device()
        if i >= count:
            raise DeviceError(f"{name!r}: CUDA device index {i} out of range ({count} device(s) visible: "
                              f"cuda:0..cuda:{count - 1})")
        return torch.device("cuda", i)
    if kind == "mps":
        if not torch.backends.mps.is_built():
            raise DeviceError(f"'mps': MPS is not available in this torch build (torch {torch.__version__})")
        if not torch.backends.mps.is_available():
            raise DeviceError("'mps': MPS is not available on this machine (needs macOS 12.3+ on Apple silicon)")
        return torch.device("mps")
    try:
        import torch_directml  # noqa: PLC0415 — optional, Windows only
    except ImportError as e:
        raise DeviceError(f"'dml': torch-directml is not installed (pip install torch-directml): {e}") from None
    return torch_directml.device()
