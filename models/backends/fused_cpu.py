"""Fused CPU inference: the whole model (embedding, every layer, ln_out, head) in one compiled call.

The eager block functions issue ~60 torch ops per layer per token, each with microseconds of dispatch
overhead; for small models that overhead is the whole cost of a decode step. ``FusedCpu`` packs a
model's weights once (no copies: the compiled object keeps references to the model's tensors) into the
TorchBind class ``torch.classes.rwkv_chat.FusedCpuModel`` (``csrc/fused_cpu/``, built into the CPU
kernel library) and runs B sequences of T tokens through every layer in one call: hand loops for the
small products, ``at::mm`` (MKL/oneDNN) and the compiled mm8 kernel for the large ones. The formulas are
those of ``models/rwkv/v4.py`` … ``models/rwkv/v7.py`` (ChatRWKV ``rwkv/model.py``, pip 0.8.32); results equal the
eager path to float32 rounding.

Served: every layer on the CPU with float32 activations and float32 or i8 weights (``cpu fp32``,
``cpu fp32i8``, mixes of those), generations 4, 5, 5.1, 5.2, 6 and 7 (not RWKV-7 DeepEmbed). Anything
else (bf16/fp16 activations, CUDA layers, kernels not built) keeps the eager path; ``reason(model)``
says why (``RWKV.fused_cpu_reason``).
"""

from __future__ import annotations

import torch

from rwkv_chat.models.errors import StateError
from rwkv_chat.models.formats.i8 import Int8Weight
from rwkv_chat.models.state import State

_EMPTY = torch.empty(0)
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
        if model._devices[i].type != "cpu":
            return f"layer {i} is on {model._devices[i]}"
        if pl.atype != torch.float32:
            return f"layer {i} computes in {pl.atype} (the fused CPU path serves float32 activations)"
        if pl.wtype not in (torch.float32, torch.uint8):
            return f"layer {i} has {pl.wtype} weights (the fused CPU path serves float32 and i8)"
    return None


def _mat(w) -> list[torch.Tensor]:
    if isinstance(w, Int8Weight):
        return [w.w, w.mx, w.rx, w.my, w.ry]
    return [w, _EMPTY, _EMPTY, _EMPTY, _EMPTY]


def _vec(p: dict, name: str) -> torch.Tensor:
    t = p.get(name)
    return _EMPTY if t is None else t.contiguous()


def _layer_weights(version: int, p: dict) -> list[torch.Tensor]:
    """The tensors of one layer in the order ``FusedCpuModel``'s constructor reads them."""
    v = lambda n: _vec(p, n)  # noqa: E731
    m = lambda n: _mat(p[n]) if n in p else [_EMPTY] * 5  # noqa: E731
    out = [v("ln1.weight"), v("ln1.bias"), v("ln2.weight"), v("ln2.bias")]
    if version in (4, 5):
        out += [v("att.time_decay"), v("att.time_first"), v("att.time_mix_k"), v("att.time_mix_v"),
                v("att.time_mix_r")]
        if version == 5:
            out += [v("att.time_mix_g"), v("att.ln_x.weight"), v("att.ln_x.bias")]
        out += m("att.key.weight") + m("att.value.weight") + m("att.receptance.weight")
        if version == 5:
            out += m("att.gate.weight")
        out += m("att.output.weight")
        out += [v("ffn.time_mix_k"), v("ffn.time_mix_r")]
        out += m("ffn.key.weight") + m("ffn.value.weight") + m("ffn.receptance.weight")
    elif version == 6:
        out += [v(f"att.time_maa_{c}") for c in "xwkvrg"]
        out += [v("att.time_maa_w1"), v("att.time_maa_w2"), v("att.time_decay"), v("att.time_decay_w1"),
                v("att.time_decay_w2"), v("att.time_first"), v("att.ln_x.weight"), v("att.ln_x.bias")]
        out += (m("att.key.weight") + m("att.value.weight") + m("att.receptance.weight") + m("att.gate.weight")
                + m("att.output.weight"))
        out += [v("ffn.time_maa_k"), v("ffn.time_maa_r")]
        out += m("ffn.key.weight") + m("ffn.value.weight") + m("ffn.receptance.weight")
    else:
        out += [v(f"att.x_{c}") for c in "rwkvag"]
        out += [v("att.w0"), v("att.w1"), v("att.w2"), v("att.a0"), v("att.a1"), v("att.a2"),
                v("att.v0"), v("att.v1"), v("att.v2"), v("att.g1"), v("att.g2"),
                v("att.k_k"), v("att.k_a"), v("att.r_k"), v("att.ln_x.weight"), v("att.ln_x.bias")]
        out += m("att.key.weight") + m("att.value.weight") + m("att.receptance.weight") + m("att.output.weight")
        out += [v("ffn.x_k")] + m("ffn.key.weight") + m("ffn.value.weight")
    return out


class FusedCpu:
    """A model's weights packed for the fused CPU call (references, no copies).

    Args:
        model: an ``RWKV`` for which ``reason(model)`` is None.
    Raises:
        RuntimeError: the compiled class refused the weights (a layout it does not know).
    """

    def __init__(self, model):
        spec = model.spec
        self.version = _VERSION_CODE[spec.version]
        self.n_layer = spec.n_layer
        self.n_state = len(model._gen.STATE_NAMES)
        weights = [model.emb, model.ln_out[0], model.ln_out[1], *_mat(model.head)]
        for i in range(spec.n_layer):
            weights += _layer_weights(self.version, model.layers[i])
        dims = [self.version, spec.n_layer, spec.n_embd, spec.n_att, spec.n_ffn, max(spec.n_head, 1),
                max(spec.head_size, 1), spec.vocab_size, int(model.rescale_layer or 0)]
        self.obj = _class()(dims, weights)

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
        if len(state.layers) != self.n_layer or state.names != model._gen.STATE_NAMES:
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
