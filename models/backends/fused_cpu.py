"""Fused CPU inference: the whole model (embedding, every layer, ln_out, head) in one compiled call.

The eager block functions issue ~60 torch ops per layer per token, each with microseconds of dispatch
overhead; for small models that overhead is the whole cost of a decode step. ``FusedCpu`` packs a
model's weights once, by checkpoint name (no copies: the compiled object keeps references to the
model's tensors), into the TorchBind class ``torch.classes.rwkv_chat.FusedCpuModel`` (``csrc/fused_cpu/``,
built into the CPU kernel library) and runs B sequences of T tokens through every layer in one call:
hand loops for the small products, ``at::mm`` (MKL/oneDNN) and the compiled mm8 kernel for the large
ones. The formulas are those of ``models/rwkv/v4.py`` … ``models/rwkv/v7.py`` (ChatRWKV ``rwkv/model.py``,
pip 0.8.32); results equal the eager path to float32 rounding.

Served: every layer on the CPU with float32 activations and float32, i8, i4 or f8 weights (``cpu fp32``,
``cpu fp32i8``, ``cpu fp32i4``, ``cpu fp32f8``, mixes of those; i4 in the GPTQ layout without g_idx, the group a
multiple of 8; f8 output-major), generations 4, 5, 5.1, 5.2, 6 and 7 (not RWKV-7 DeepEmbed). Anything
else (bf16/fp16 activations, CUDA layers, kernels not built) keeps the eager path; ``reason(model)``
says why (``RWKV.fused_cpu_reason``).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import StateError
from rwkv_chat.models.formats.f8 import Float8Weight
from rwkv_chat.models.formats.i4 import Int4Weight
from rwkv_chat.models.formats.i8 import Int8Weight
from rwkv_chat.models.state import State

_VERSION_CODE = {"4": 4, "5": 5, "5.1": 5, "5.2": 5, "6": 6, "7": 7}
#: the longest sequence (tokens per row) the fused call serves. Longer prompts go to the eager path,
#: whose products batch over tokens just as well and whose elementwise work is vectorized and threaded,
#: with the chunked WKV forms (measured on the tiny models: the fused call is 1.3-10x faster up to 64
#: tokens, 0.8-1.4x at 256).
SEQ_TOKENS = 64


def _class():
    try:
        return torch.classes.rwkv_chat.FusedCpuModel
    except (AttributeError, RuntimeError):
        return None


def reason(model) -> str | None:
    """Why ``model`` cannot use the fused CPU path, or None when it can.

    Args:
        model: an ``RWKV``.
    Returns:
        A one-line reason (str) or None.
    """
    if not getattr(model, "kernels", None):
        return "compiled kernels not requested (kernels=False)"
    status = model.kernels.get("cpu")
    if status is None:
        return "no layer on the CPU"
    if _class() is None:
        why = next((v for v in status.values() if v != "ok"), "FusedCpuModel missing from the CPU library")
        return f"CPU kernel library unavailable: {why}"
    if model.spec.version not in _VERSION_CODE:
        return f"RWKV version {model.spec.version} has no fused CPU path"
    if model.spec.deep_embed:
        return "RWKV-7 DeepEmbed has no fused CPU path"
    for i, pl in enumerate(model.plan.layers):
        if model.devices[i].type != "cpu":
            return f"layer {i} is on {model.devices[i]}"
        if pl.atype != torch.float32:
            return f"layer {i} computes in {pl.atype} (the fused CPU path serves float32 activations)"
        if pl.wtype not in (torch.float32, torch.uint8, torch.int32, torch.float8_e4m3fn):
            return f"layer {i} has {pl.wtype} weights (the fused CPU path serves float32, i8, i4 and f8)"
        for name, t in (model.layers[i].items() if i < len(model.layers) else (("head.weight", model.head),)):
            if isinstance(t, Int4Weight) and (t.g_idx is not None or t.output_major or t.group_size % 8):
                return (f"layer {i} '{name}': an i4 weight with g_idx, output-major or a group not a multiple of 8 "
                        f"(group {t.group_size})")
            if isinstance(t, Float8Weight) and not t.w8.is_contiguous():
                return f"layer {i} '{name}': an f8 weight held input-major"
    return None


_I8_PARTS = ("mx", "rx", "my", "ry")


def named_weights(p: dict) -> dict[str, torch.Tensor]:
    """Weights by name as ``FusedCpuModel`` reads them.

    Args:
        p: name -> float32 tensor, ``Int8Weight``, ``Int4Weight`` (GPTQ layout) or ``Float8Weight`` (a layer's dict from
            ``model.layers``, names without ``blocks.<i>.``, or the model-level names ``emb.weight``,
            ``ln_out.weight``, ``ln_out.bias``, ``head.weight``).
    Returns:
        name -> CPU tensor: each tensor as given (``.contiguous()``: a no-op for the loader's contiguous
        weights); an ``Int8Weight`` ``X`` as uint8 ``X`` [N, M] plus float32 ``X.mx``, ``X.rx`` [M] and
        ``X.my``, ``X.ry`` [N, 1]; an ``Int4Weight`` ``X`` as its int32 ``qweight`` [Kp/8, Np] under ``X`` plus
        ``X.qzeros`` and ``X.scales``; a ``Float8Weight`` ``X`` as its float8_e4m3fn ``w8`` [N_out, K_in] (output-major)
        plus float32 ``X.scale`` [N_out]. The tensors are the model's (no copies for contiguous weights).
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in p.items():
        if isinstance(t, Int8Weight):
            out[name] = t.w
            for part in _I8_PARTS:
                out[f"{name}.{part}"] = getattr(t, part)
        elif isinstance(t, Int4Weight):
            out[name] = t.qweight.contiguous()
            out[f"{name}.qzeros"] = t.qzeros.contiguous()
            out[f"{name}.scales"] = t.scales.contiguous()
        elif isinstance(t, Float8Weight):
            out[name] = t.w8.contiguous()
            out[f"{name}.scale"] = t.scale.contiguous()
        else:
            out[name] = t.contiguous()
    return out


def model_weights(model) -> dict[str, torch.Tensor]:
    """The model-level weights of ``model`` by checkpoint name (``named_weights`` form): ``emb.weight``
    float32 [vocab, C], ``ln_out.weight``, ``ln_out.bias`` float32 [C], ``head.weight`` [C, vocab]."""
    return named_weights({"emb.weight": model.emb, "ln_out.weight": model.ln_out[0],
                          "ln_out.bias": model.ln_out[1], "head.weight": model.head})


class FusedCpu:
    """A model's weights packed for the fused CPU call (references, no copies).

    The compiled object is ``FusedCpuModel(dims, model_weights(model), [named_weights(layer) ...])``:
    ``dims`` int [version code, n_layer, n_embd, n_att, n_ffn, n_head, head_size, vocab, rescale_layer],
    then name -> tensor dicts (checkpoint names; an i8 matrix as its five named parts, see
    ``named_weights``). It looks every name up once when built; the forward reads struct fields.

    Args:
        model: an ``RWKV`` for which ``reason(model)`` is None.
    Raises:
        RuntimeError: the compiled class refused the weights: a required name absent (the message names
            it), a wrong dtype, shape, device or layout, or a name it does not read (a layout it does not
            know).
    """

    def __init__(self, model):
        spec = model.spec
        self.version = _VERSION_CODE[spec.version]
        self.n_layer = spec.n_layer
        self.n_state = len(model.generation.STATE_NAMES)
        layers = [named_weights(model.layers[i]) for i in range(spec.n_layer)]
        dims = [self.version, spec.n_layer, spec.n_embd, spec.n_att, spec.n_ffn, max(spec.n_head, 1),
                max(spec.head_size, 1), spec.vocab_size, int(model.rescale_layer or 0)]
        self.obj = _class()(dims, model_weights(model), layers)

    def serves(self, tokens: int) -> bool:
        """Whether a forward of ``tokens`` tokens per sequence goes through the fused call (up to
        ``SEQ_TOKENS``)."""
        return tokens <= SEQ_TOKENS

    def __call__(self, ids: torch.Tensor, state_in: list[torch.Tensor], state_out: list[torch.Tensor],
                 full_output: bool = False):
        """ids int64 [B, T]; flat state tensors (layer-major, ``STATE_NAMES`` order), float32 contiguous
        CPU; ``state_out`` = ``state_in`` updates in place, ``[]`` makes new tensors.
        Returns ``(logits float32 [B, T or 1, vocab], flat new state)``. Raises RuntimeError on a layout
        mismatch (nothing is modified when ``state_out`` is ``[]``)."""
        return self.obj.forward(ids, state_in, state_out, full_output)

    def run(self, model, ids: torch.Tensor, state: State, full_output: bool):
        """``RWKV._run`` through the fused call: ``(logits float32 [B, T or 1, vocab], new State)``, or
        None when the state's tensors are not in the fused layout (float32, contiguous, CPU), so the
        caller takes the eager path. Raises StateError for a state of another model."""
        if not isinstance(state, State):
            raise StateError(f"expected a State, got {type(state).__name__}")
        if state.fingerprint != model.fingerprint or state.version != model.version:
            raise StateError(f"state belongs to another model (v{state.version}, {state.fingerprint}); "
                             f"this is v{model.version}, {model.fingerprint}")
        if len(state.layers) != self.n_layer or state.names != model.generation.STATE_NAMES:
            raise StateError("state layout does not match this model")
        flat = [t for layer in state.layers for t in layer]
        try:
            logits, new = self.obj.forward(ids, flat, [], full_output)
        except RuntimeError:
            return None          # shapes/dtypes/devices: the eager path checks and reports (StateError)
        ns = self.n_state
        layers = [tuple(new[i:i + ns]) for i in range(0, len(new), ns)]
        return logits, State(state.version, state.fingerprint, state.names, layers,
                             state.token_count + ids.shape[1], state.metadata)


def attach(model) -> FusedCpu | None:
    """Pack ``model`` for the fused CPU call where ``reason(model)`` allows; sets ``model.fused_cpu_reason``
    (None when the fused path serves it). Never raises: a refusal becomes the reason."""
    why = reason(model)
    fused = None
    if why is None:
        try:
            fused = FusedCpu(model)
        except RuntimeError as e:
            why = f"fused CPU model refused the weights: {str(e).splitlines()[0]}"
    model.fused_cpu_reason = why
    return fused
