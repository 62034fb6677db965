"""Dry-run memory plans: what a strategy puts on each device, read from a checkpoint's header only.

``plan_memory(path, strategy)`` places the model's layers as a load would (``strategy.plan_layers``) and sums,
without reading any weight data:

* per stage and per device: the weight bytes by storage format (``fp16``/``fp32``/``bf16`` tensors; ``i8``
  at one byte per element plus its four scale vectors; any format of ``rwkv_chat.models.formats``: the
  format's own ``pack`` runs on ``meta`` tensors, so the sizes are the ones a load allocates);
* the state of one conversation (RWKV: the recurrent state; Qwen2: the KV cache of ``context`` tokens);
* for a ``*N+`` stage: the pinned host copies of the streamed matrices, the two device buffers of the
  streamer (``rwkv_chat.models.stream``) and the bytes copied per forward (one token in decode);
* the transfers between stages per token: the residual stream x [C] in the receiving layer's activation
  dtype, and RWKV-7's ``v_first`` [C] with it;
* whether each device's need fits its free memory (CPU: ``psutil.virtual_memory().available`` where
  psutil is installed, else ``MemAvailable`` of ``/proc/meminfo``; CUDA: ``torch.cuda.mem_get_info``; other
  devices or an absent GPU: unknown).

Need per device = weights + stream buffers + (conversations + 1) states (the model keeps one zero state)
+ pinned host copies (on the CPU). Activations and allocator slack are not counted.

Checkpoints: an RWKV ``.pth`` (``torch.load(map_location="meta")``: tensor shapes and dtypes, no data) or
``.safetensors`` (its JSON header; a file of ``rwkv-chat convert``: its packed weights as the loader places
them, each stage required to ask for their format); a Hugging Face folder (``config.json`` +
``*.safetensors``) of the Qwen2 family (matrices in the stage's weight format, norms and biases in the
activation dtype, the embedding on the first device, ``model.norm`` + ``lm_head`` as the head layer; a tied
``lm_head`` counted as its own copy unless it is the embedding table itself: plain, resident, on the
embedding's device and in its dtype; a GPTQ folder's packed parts counted as i4 bytes as stored, its stages
required to be i4 as the loader requires).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rwkv_chat.models import formats
from rwkv_chat.models.errors import CheckpointError, StrategyError
from rwkv_chat.models.header import read_header, safetensors_header
from rwkv_chat.models.strategy import Plan, Stage, parse_strategy, plan_layers
from rwkv_chat.models.stream import slot_bytes

_NAMES = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}
_META = torch.device("meta")
#: the parts of a GPTQ Linear (a pre-quantized Qwen2 folder): counted as i4 bytes as stored
_GPTQ = (".qweight", ".qzeros", ".scales", ".g_idx")


@dataclass(frozen=True)
class StageBytes:
    """One stage: ``first``..``last`` layers (inclusive; ``n_layer`` is the head), ``weights`` on its device
    by format name (bytes), ``pinned`` host bytes of its streamed matrices, ``buffers`` (the streamer's two
    device slots), ``state`` bytes of one conversation on its device, ``streamed_per_token`` bytes copied
    per forward."""

    stage: int
    text: str
    device: str
    first: int
    last: int
    resident: int
    streamed: int
    weights: dict[str, int]
    pinned: int = 0
    buffers: int = 0
    state: int = 0
    streamed_per_token: int = 0


@dataclass(frozen=True)
class DeviceBytes:
    """One device: its ``layers``, ``weights`` (bytes, every format), ``pinned`` (host bytes, on "cpu"),
    ``buffers``, ``state`` (one conversation), ``need`` (see the module docstring), ``free`` (bytes, None
    when unknown) and ``fits`` (None when unknown)."""

    device: str
    layers: int
    weights: int
    pinned: int
    buffers: int
    state: int
    need: int
    free: int | None
    fits: bool | None


@dataclass(frozen=True)
class Transfer:
    """Activations handed from ``src`` to ``dst`` before layer ``layer`` (``n_layer``: the head), per token."""

    layer: int
    src: str
    dst: str
    bytes: int
    what: str


@dataclass(frozen=True)
class MemoryPlan:
    """The dry-run result (see the module docstring). ``describe``: the model in one line; ``plan``: the layer
    placement; ``conversations`` and ``context`` (Qwen2 KV cache tokens): what ``need`` assumes."""

    path: str
    family: str
    describe: str
    plan: Plan
    stages: tuple[StageBytes, ...]
    devices: tuple[DeviceBytes, ...]
    transfers: tuple[Transfer, ...]
    conversations: int
    context: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fits(self) -> bool | None:
        """False if any device does not fit, None if any is unknown, else True."""
        vals = [d.fits for d in self.devices]
        return False if False in vals else (None if None in vals else True)

    def to_dict(self) -> dict:
        """JSON-able: every field, the plan as its strategy text and ``describe()`` rows."""
        d = {k: v for k, v in asdict(self).items() if k != "plan"}
        d["strategy"] = self.plan.strategy
        d["layers"] = [str(p) for p in self.plan.layers]
        d["fits"] = self.fits
        return d

    def __str__(self) -> str:
        lines = [f"{Path(self.path).name}: {self.describe}",
                 f"Strategy: {self.plan.strategy} ({self.plan.n_layer}+1 layers, the head last)"]
        for s in self.stages:
            w = ", ".join(f"{k} {human(v)}" for k, v in sorted(s.weights.items())) or "-"
            line = (f"  stage {s.stage} {s.text}: layers {s.first}-{s.last} ({s.resident} resident"
                    f"{f', {s.streamed} streamed' if s.streamed else ''}); weights {w}; state {human(s.state)}"
                    "/conversation")
            if s.streamed:
                line += (f"; pinned host {human(s.pinned)}, device buffers {human(s.buffers)}, copied "
                         f"{human(s.streamed_per_token)}/token")
            lines.append(line)
        lines.append(f"Per device ({self.conversations} conversation{'s' if self.conversations != 1 else ''}"
                     f"{f', {self.context} tokens of context' if self.context else ''}):")
        for d in self.devices:
            free = "free unknown" if d.free is None else f"free {human(d.free)}"
            verdict = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[d.fits]
            lines.append(f"  {d.device}: {d.layers} layers, weights {human(d.weights)}"
                         f"{f', pinned {human(d.pinned)}' if d.pinned else ''}"
                         f"{f', buffers {human(d.buffers)}' if d.buffers else ''}, state {human(d.state)}; "
                         f"need {human(d.need)}, {free}: {verdict}")
        if self.transfers:
            lines.append("Transfers per token: " + "; ".join(
                f"{t.src} -> {t.dst} before layer {t.layer}: {human(t.bytes)} ({t.what})" for t in self.transfers))
        else:
            runs = sorted({s.device for s in self.stages})
            lines.append(f"Transfers per token: none (every layer runs on {', '.join(runs)})")
        lines += list(self.notes)
        return "\n".join(lines)


def human(n: int) -> str:
    """Bytes as ``123 B``, ``4.5 KiB``, ``1.23 GiB``."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


# -- free memory ---------------------------------------------------------------------------------------
def absent_device(device: str) -> str | None:
    """Why a strategy device is not on this machine ("cuda:1" with one GPU, "cuda" in a CPU build of torch,
    "mps" off Apple silicon), or None where it is (or cannot be checked: "dml")."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return f"this machine has no CUDA device (torch {torch.__version__})"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s), no {device}"
    if device.startswith("mps") and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "this machine has no MPS device"
    return None


def free_memory(device: str) -> int | None:
    """Free bytes on a strategy device ("cpu", "cuda", "cuda:N"), or None when it cannot be known here (no
    such GPU, another device kind)."""
    if device == "cpu":
        try:
            import psutil  # noqa: PLC0415 — optional

            return int(psutil.virtual_memory().available)
        except ImportError:
            pass
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    if device.startswith("cuda") and torch.cuda.is_available():
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        if index < torch.cuda.device_count():
            return int(torch.cuda.mem_get_info(index)[0])
    return None


# -- per family: (layer index -> [(name, kind, meta tensor)]), state bytes per layer, describe ----------
def _nb(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return t.numel() * (torch.empty((), dtype=dtype).element_size() if dtype else t.element_size())


def _rwkv_tensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict | None]:
    """``(w, packed, meta)`` of an RWKV checkpoint's header, as ``rwkv.convert.read_packed`` reads the file (on
    meta tensors): a file pre-quantized by ``rwkv-chat convert`` has each packed key's parts assembled into
    ``packed`` and a placeholder [out, in] in ``w``; ``meta``: its metadata (None for any other checkpoint)."""
    from rwkv_chat.models.header import safetensors_json
    from rwkv_chat.models.rwkv.convert import MAGIC, packed_table, unpack

    w = read_header(p)
    meta = safetensors_json(p)[0].get("__metadata__") if p.suffix == ".safetensors" else None
    if not isinstance(meta, dict) or meta.get("format") != MAGIC:
        return w, {}, None
    placeholders, packed = unpack(packed_table(p, meta), w)
    w.update(placeholders)
    return w, packed, meta


def _rwkv(w: dict[str, torch.Tensor], packed: dict[str, Any], meta: dict | None, strategy: str,
          context: int | None):
    from rwkv_chat.models.rwkv import checkpoint as loader
    from rwkv_chat.models.rwkv.convert import adopt
    from rwkv_chat.models.rwkv.generations import module_for

    spec = loader.inspect(w)
    plan = plan_layers(strategy, spec.n_layer)
    gen = module_for(spec.version)

    def matrix(key: str, i: int, name: str, t: torch.Tensor) -> tuple[str, str, Any]:
        if key not in packed:
            return name, "matrix", t
        pl = plan.layers[i]           # placed as the loader places it (its check: the stage's format)
        return name, "packed", adopt(packed[key], key, plan.stages[pl.stage], pl.atype, _META, False, meta or {})

    layers: list[list[tuple[str, str, Any]]] = [[] for _ in range(spec.n_layer + 1)]
    for key, t in w.items():
        if not key.startswith("blocks.") or ".ln0." in key or key.endswith("ffn.s_emb_x.weight"):
            continue
        i = int(key.split(".")[1])
        name, t, kind = gen.convert(key.split(".", 2)[2], t, spec)
        layers[i].append(matrix(key, i, name, t) if kind == "matrix" else (name, kind, t))
    C = spec.n_embd
    layers[0].append(("emb", "act", w["emb.weight"]))
    layers[-1] += [("ln_out.weight", "act", w["ln_out.weight"]), ("ln_out.bias", "act", w["ln_out.bias"]),
                   matrix("head.weight", spec.n_layer, "head", w["head.weight"].t())]
    states = []
    for i in range(spec.n_layer):
        pl = plan.layers[i]
        params = {n: t.to(torch.float32 if k == "fp32" else pl.atype) for n, k, t in layers[i]
                  if k not in ("matrix", "packed")}
        states.append(sum(_nb(t) for t in gen.zero_state(spec, 1, _META, pl.atype, params)))
    states.append(0)
    handoff = 2 if spec.version == "7" else 1              # x, and RWKV-7's v_first beside it
    what = "x and v_first" if handoff == 2 else "x"
    transfer = [(handoff if i < spec.n_layer else 1) * C for i in range(spec.n_layer + 1)]
    whats = [what if i < spec.n_layer else "x" for i in range(spec.n_layer + 1)]
    desc = (f"RWKV-{spec.version}, {spec.n_layer} layers, n_embd {C}, vocab {spec.vocab_size}"
            f"{', DeepEmbed' if spec.deep_embed else ''}")
    return plan, layers, states, transfer, whats, desc, None


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Name -> meta tensor of every ``*.safetensors`` file of ``folder`` (their headers only)."""
    w: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        w.update(safetensors_header(f))
    return w


def _held_format(p: Path) -> tuple[str | None, str | None]:
    """``(format, strategy)``: the one weight format a checkpoint holds its matrices in, which every stage must
    use ("i4" for a GPTQ folder, the format of a file pre-quantized by ``rwkv-chat convert``; None for float
    weights), and the strategy a pre-quantized file with several formats was converted for (else None)."""
    if p.is_dir():
        return ("i4" if _gptq(_folder_tensors(p)) else None), None
    _, packed, meta = _rwkv_tensors(p) if p.suffix == ".safetensors" else (None, {}, None)
    suffixes = {formats.format_of(q).suffix for q in packed.values()}
    recorded = (meta or {}).get("strategy")
    if len(suffixes) > 1 or (suffixes and _mixes_formats(recorded)):
        return None, recorded
    return (suffixes.pop() if suffixes else None), None


def _mixes_formats(strategy: str | None) -> bool:
    """Whether a recorded strategy gives its stages different weight formats (plain float counting as one:
    ``cpu fp32 *3 -> cpu fp32i4``); False for none or one outside the grammar."""
    try:
        return bool(strategy) and len({stage.quant for stage in parse_strategy(strategy)}) > 1
    except StrategyError:
        return False


def _merged(stages: list[Stage]) -> list[Stage]:
    """``stages`` with each counted stage folded into the next where the two are alike but for the count (no
    streaming) and the layers each gets stay the same: ``A *4 -> A *3 -> B`` -> ``A *7 -> B``; into a stage
    without a count only where it is the one such stage (``cpu fp32i4 *4 -> cpu fp32i4`` -> ``cpu fp32i4``; with
    several, they share the remaining layers and one more would change the split)."""
    uncounted = sum(stage.count is None for stage in stages)
    out: list[Stage] = []
    for stage in stages:
        prev = out[-1] if out else None
        if (prev is not None and prev.count is not None and not prev.stream and not stage.stream
                and (prev.device, prev.dtype, prev.quant) == (stage.device, stage.dtype, stage.quant)
                and (stage.count is not None or uncounted == 1)):
            out[-1] = replace(prev, count=None if stage.count is None else prev.count + stage.count)
        else:
            out.append(stage)
    return out


def _gptq(w: dict) -> bool:
    """Whether a folder's tensors (name -> meta tensor) are a GPTQ checkpoint's (packed ``.qweight`` parts)."""
    return any(k.endswith(".qweight") for k in w)


def _shares_embedding(plan: Plan) -> bool:
    """Whether a tied head is the embedding table itself (its transposed view, as ``qwen2/weights.place`` makes
    it): a plain, resident head on the embedding's device, in its dtype."""
    first, head = plan.layers[0], plan.layers[-1]
    cuda0 = {first.device, head.device} <= {"cuda", "cuda:0"}      # "cuda": the current device, 0 in a new process
    same = cuda0 or (first.device == head.device and head.device.split(":")[0] in ("cpu", "cuda"))
    return head.quant is None and not head.stream and same and head.atype == first.atype


def _qwen2(folder: Path, strategy: str, context: int | None):
    try:
        cfg = json.loads((folder / "config.json").read_text())
        L, C = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        kv, hd = int(cfg.get("num_key_value_heads", heads)), int(cfg.get("head_dim") or C // heads)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {e}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has a config.json but no .safetensors weights")
    w = _folder_tensors(folder)
    if "model.embed_tokens.weight" not in w:
        raise CheckpointError(f"{folder}: no 'model.embed_tokens.weight': not a Qwen2 checkpoint")
    plan = plan_layers(strategy, L)
    if _gptq(w):                                    # the loader's check: i4 stages only
        from rwkv_chat.models.qwen2.model import gptq_plan

        plan = gptq_plan(plan, folder, "lm_head.qweight" in w)
    layers: list[list[tuple[str, str, torch.Tensor]]] = [[] for _ in range(L + 1)]
    for key, t in w.items():
        part = key.split(".")[2] if key.startswith("model.layers.") else ""
        if part.isdigit():
            i = int(part)
            if i < L:
                layers[i].append((key, "stored", t) if key.endswith(_GPTQ) else
                                 (key, "matrix", t.t()) if t.dim() == 2 else (key, "act", t))
    emb = w["model.embed_tokens.weight"]
    layers[0].append(("emb", "act", emb))
    layers[-1].append(("model.norm.weight", "act", w.get("model.norm.weight", torch.empty(C, device=_META))))
    tied = "lm_head.weight" not in w and "lm_head.qweight" not in w
    if "lm_head.qweight" in w:                      # a GPTQ folder that quantized its head
        layers[-1] += [(k, "stored", t) for k, t in w.items() if k.startswith("lm_head.") and k.endswith(_GPTQ)]
    elif not (tied and _shares_embedding(plan)):
        layers[-1].append(("head", "matrix", w.get("lm_head.weight", emb).t()))
    ctx = int(cfg.get("max_position_embeddings") or 4096) if context is None else int(context)
    states = [2 * kv * hd * ctx * torch.empty((), dtype=plan.layers[i].atype).element_size() for i in range(L)]
    states.append(0)
    desc = (f"Qwen2, {L} layers, hidden {C}, {heads} heads ({kv} KV) of {hd}, vocab {emb.shape[0]}"
            f"{', tied head' if tied else ''}"
            f"{', GPTQ 4-bit' if _gptq(w) else ''}")
    return plan, layers, states, [C] * (L + 1), ["x"] * (L + 1), desc, ctx


def _fmt_bytes(t: torch.Tensor, kind: str, quant: str | None, atype: torch.dtype) -> tuple[str, int, Any]:
    """(format name, bytes, the packed meta weight or None) of one tensor as ``_place`` stores it; ``quant``: the
    layer's weight format (``LayerPlacement.quant``: the head of an ``i4`` stage is plain)."""
    if kind == "stored":
        return "i4", _nb(t), None
    if kind == "packed":                       # a pre-quantized file's weight as the loader places it
        fmt = formats.format_of(t)
        return fmt.suffix, fmt.nbytes(t), t
    if kind != "matrix":
        dt = torch.float32 if kind == "fp32" else atype
        return _NAMES.get(dt, str(dt)), _nb(t, dt), None
    fmt = formats.get(quant)
    try:
        packed = fmt.pack(t, atype, _META)
    except Exception:  # a format whose packing needs values: pack zeros of the same shape on the CPU
        try:
            packed = fmt.pack(torch.zeros(t.shape, dtype=atype), atype, torch.device("cpu"))
        except Exception as e:
            raise StrategyError(f"cannot plan the {fmt.suffix!r} weight format on this machine: {e}") from None
    return (fmt.suffix or _NAMES[atype]), fmt.nbytes(packed), packed


def plan_memory(path: str | Path, strategy: str, *, conversations: int = 1, context: int | None = None,
                free: dict[str, int | None] | None = None) -> MemoryPlan:
    """The memory plan of ``strategy`` for the checkpoint at ``path`` (see the module docstring).

    Args:
        path: an RWKV ``.pth`` / ``.safetensors`` file, or a Qwen2 Hugging Face folder.
        strategy: a strategy string (``rwkv_chat.models.strategy``).
        conversations: conversations whose state the need counts (>= 1).
        context: Qwen2: KV cache tokens per conversation (default: the model's own limit, ``max_position_embeddings``
            of config.json, 4096 where it has none); ignored for RWKV.
        free: device -> free bytes, instead of measuring (``free_memory``).
    Raises:
        CheckpointError: unreadable checkpoint. StrategyError: a bad strategy for this model.
    """
    p = Path(str(path).strip()).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"{p} is a folder without config.json (expected a Hugging Face model folder)")
        plan, layers, states, transfer, whats, desc, ctx = _qwen2(p, strategy, context)
        family = "qwen2"
    else:
        from rwkv_chat.models.qwen2.config import check_not_a_folder_file

        check_not_a_folder_file(p)
        if not p.exists() and not p.suffix and p.with_suffix(".pth").exists():
            p = p.with_suffix(".pth")
        plan, layers, states, transfer, whats, desc, ctx = _rwkv(*_rwkv_tensors(p), strategy, context)
        family = "rwkv"
    stages = []
    for d in plan.describe():
        weights: dict[str, int] = {}
        pinned = state = 0
        streamed_layers = []
        for i in range(d["first"], d["last"] + 1):
            pl = plan.layers[i]
            state += states[i]
            streamed = {}
            for name, kind, t in layers[i]:
                fname, n, packed = _fmt_bytes(t, kind, pl.quant, pl.atype)
                if pl.stream and kind == "matrix":
                    pinned += n
                    streamed[name] = packed
                else:
                    weights[fname] = weights.get(fname, 0) + n
            if streamed:
                streamed_layers.append(streamed)
        buffers = 2 * slot_bytes(streamed_layers) if streamed_layers else 0
        per_token = pinned if len(streamed_layers) > 2 else 0
        stages.append(StageBytes(d["stage"], d["text"], d["device"], d["first"], d["last"], d["resident"],
                                 d["streamed"], weights, pinned, buffers, state, per_token))
    devices = []
    for dev in dict.fromkeys(["cpu"] * any(s.pinned for s in stages) + [s.device for s in stages]):
        mine = [s for s in stages if s.device == dev]
        wb = sum(sum(s.weights.values()) for s in mine)
        pin = sum(s.pinned for s in stages) if dev == "cpu" else 0
        buf = sum(s.buffers for s in mine)
        state = sum(s.state for s in mine)
        need = wb + pin + buf + state * (conversations + 1)
        fb = free.get(dev) if free is not None else free_memory(dev)
        devices.append(DeviceBytes(dev, sum(s.last - s.first + 1 for s in mine), wb, pin, buf, state, need, fb,
                                   None if fb is None else need <= fb))
    transfers = []
    for i in range(1, plan.n_layer + 1):
        a, b = plan.layers[i - 1], plan.layers[i]
        if a.device != b.device:
            transfers.append(Transfer(i, a.device, b.device, transfer[i] * _nb(torch.empty(1), b.atype), whats[i]))
    notes = ()
    if any(s.streamed and s.streamed_per_token == 0 for s in stages):
        notes = ("Two streamed layers or fewer stay in the streamer's two device buffers: nothing is copied per token.",)
    absent = {d.device: why for d in devices if (why := absent_device(d.device))}
    notes += tuple(f"{dev}: {why}; this plan is for a machine that has it (loading it here is refused)."
                   for dev, why in absent.items())
    return MemoryPlan(str(p), family, desc, plan, tuple(stages), tuple(devices), tuple(transfers),
                      conversations, ctx, notes)


def gpus() -> list[str]:
    """The CUDA devices torch sees here, as strategy device names ("cuda:0", ...)."""
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def fitted_strategy(path: str | Path, strategy: str) -> str:
    """A default ``strategy`` fitted to the weights the checkpoint at ``path`` holds: every stage in the checkpoint's
    one weight format where it holds one (a GPTQ folder: ``i4``; a file of ``rwkv-chat convert``: its format),
    devices, dtypes and layer counts kept (``"cuda fp16"`` -> ``"cuda fp16i4"``; stages that become alike merged:
    ``"cpu fp32 *4 -> cpu fp32i8"`` -> ``"cpu fp32i4"``); the strategy a converted file of several formats (plain
    float layers beside packed ones counting as two) was converted for; ``strategy`` itself for float weights. For defaults only (the config's
    strategy when the user names none): a strategy the user gives is loaded as given, and a mismatch is refused
    with a message that names the fix.

    Raises:
        CheckpointError: unreadable checkpoint. StrategyError: ``strategy`` outside the grammar.
    """
    held, converted_for = _held_format(Path(str(path).strip()).expanduser())
    if converted_for:
        return converted_for
    if held is None:
        return strategy
    return " -> ".join(str(stage) for stage in _merged([replace(stage, quant=held) for stage in parse_strategy(strategy)]))


def suggest(path: str | Path, devices: list[str] | None = None, *, free: dict[str, int | None] | None = None,
            conversations: int = 1, limit: int = 6) -> list[str]:
    """Strategies for the checkpoint at ``path`` that fit the free memory of ``devices`` (strategy device names,
    default: ``gpus()``), best first, at most ``limit``.

    With GPUs: each GPU in fp16, then fp16i8; the layers split evenly over every GPU (fp16, then fp16i8);
    the first GPU in fp16 streaming from pinned CPU memory with as many resident layers as fit. Without any
    (or when none fits): ``cpu fp32``, ``cpu bf16`` (and ``cpu fp32i8``), those that fit. A checkpoint that
    holds one weight format (a GPTQ folder: i4; a file of ``rwkv-chat convert``: its format) loads only as
    that format: fp16 with it on the GPUs, fp32 and bf16 with it on the CPU; a converted file with several
    formats, only as the strategy it was converted for. A device whose free memory is unknown counts as
    fitting.

    Raises:
        CheckpointError: unreadable checkpoint.
    """
    devices = gpus() if devices is None else [d for d in devices if d.startswith("cuda")]
    q, converted_for = _held_format(Path(str(path).strip()).expanduser())
    if converted_for:                               # several formats: the strategy it was converted for
        return [converted_for]
    gpu_formats, cpu = (("fp16", "fp16i8"), ("cpu fp32", "cpu bf16", "cpu fp32i8")) if q is None else \
        ((f"fp16{q}",), (f"cpu fp32{q}", f"cpu bf16{q}"))

    def ok(s: str) -> bool:
        return plan_memory(path, s, conversations=conversations, free=free).fits is not False

    out: list[str] = []
    for q in gpu_formats:
        out += [f"{d} {q}" for d in devices if ok(f"{d} {q}")]
        if len(devices) > 1 and ok(s := " -> ".join(f"{d} {q}" for d in devices)):
            out.append(s)
    q = gpu_formats[0]
    if devices and not any(" -> " not in s and s.endswith(q) for s in out):
        n_layer = plan_memory(path, cpu[0], free={}).plan.n_layer
        lo, hi = -1, n_layer                       # largest resident N that fits in "*N+"
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(f"{devices[0]} {q} *{mid}+") else (lo, mid)
        if lo >= 0:
            out.append(f"{devices[0]} {q} *{lo}+")
    out += [s for s in cpu if ok(s)]
    return out[:limit] or list(cpu[:2])
