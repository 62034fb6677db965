"""RWKV-4: time-mix with the (aa, bb, pp) WKV state, squared-ReLU channel-mix.

Formulas: ChatRWKV ``rwkv/model.py`` (pip 0.8.32) ``att_one``/``att_seq``/``ffn_one``/``ffn_seq``;
B. Peng et al., "RWKV: Reinventing RNNs for the Transformer Era" (2023). ``block`` follows the contract of
``rwkv_chat.models.rwkv.generations``: x is the residual stream [B, T, C] in and out (one token, a sequence
and a batch alike); products and the WKV go through ``ctx.ops``.
"""

from __future__ import annotations

import torch

from rwkv_chat.models.rwkv.nn import layer_norm, time_shift

STATE_NAMES = ("att_x", "att_a", "att_b", "att_p", "ffn_x")
FP32_STATE = ("att_a", "att_b", "att_p")
MATRICES = ("key.weight", "value.weight", "receptance.weight", "gate.weight", "output.weight")


def layer_keys(spec, i: int) -> dict:
    C, A = spec.n_embd, spec.n_att
    return {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        "att.time_decay": (A,), "att.time_first": (A,),
        "att.time_mix_k": (C,), "att.time_mix_v": (C,), "att.time_mix_r": (C,),
        "att.key.weight": (A, C), "att.value.weight": (A, C), "att.receptance.weight": (A, C),
        "att.output.weight": (C, A),
        **channel_mix_keys(spec),
    }


def channel_mix_keys(spec) -> dict:
    C, F = spec.n_embd, spec.n_ffn
    return {"ffn.time_mix_k": (C,), "ffn.time_mix_r": (C,), "ffn.key.weight": (F, C),
            "ffn.value.weight": (C, F), "ffn.receptance.weight": (C, C)}


def convert(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor, str]:
    """Bring one block tensor (``name`` without the ``blocks.N.`` prefix) to the layout the block uses.

    Returns ``(name, tensor, kind)``; kind is "matrix" (a weight [in, out] that follows the strategy's weight
    dtype and may be quantized), "fp32" (kept in float32), or "act" (activation dtype).
    """
    if name.endswith(MATRICES):
        return name, t.t(), "matrix"
    if ".time_" in name:
        t = t.squeeze()
    if name == "att.time_decay":
        return name, -torch.exp(t.float()), "fp32"
    if name == "att.time_first":
        return name, t.float(), "fp32"
    return name, t, "act"


def zero_state(spec, batch: int, device, atype: torch.dtype, params: dict) -> tuple[torch.Tensor, ...]:
    C, A = spec.n_embd, spec.n_att
    z = lambda n, dt: torch.zeros(batch, n, dtype=dt, device=device)  # noqa: E731
    return (z(C, atype), z(A, torch.float32), z(A, torch.float32), z(A, torch.float32) - 1e30, z(C, atype))


def _time_mix(x, att_x, aa, bb, pp, p, ops):
    """x: [B, T, C] (activation dtype) -> (x + att(x), new att_x [B, C], aa, bb, pp [B, A] float32)."""
    matmul = ops.matmul
    xx = layer_norm(x, p["ln1.weight"], p["ln1.bias"])
    sx = time_shift(xx, att_x)
    kx = xx * p["att.time_mix_k"] + sx * (1 - p["att.time_mix_k"])
    vx = xx * p["att.time_mix_v"] + sx * (1 - p["att.time_mix_v"])
    rx = xx * p["att.time_mix_r"] + sx * (1 - p["att.time_mix_r"])
    r = torch.sigmoid(matmul(rx, p["att.receptance.weight"]))
    k = matmul(kx, p["att.key.weight"], output_dtype=torch.float32)
    v = matmul(vx, p["att.value.weight"], output_dtype=torch.float32)
    y, aa, bb, pp = ops.wkv4(p["att.time_decay"], p["att.time_first"], k, v, aa, bb, pp)
    out = matmul(r * y.to(x.dtype), p["att.output.weight"])
    return x + out, xx[:, -1], aa, bb, pp


def _channel_mix(x, ffn_x, p, ops):
    """The v4/v5 channel-mix. x: [B, T, C] -> (x + ffn(x), new ffn_x [B, C])."""
    matmul = ops.matmul
    xx = layer_norm(x, p["ln2.weight"], p["ln2.bias"])
    sx = time_shift(xx, ffn_x)
    kx = xx * p["ffn.time_mix_k"] + sx * (1 - p["ffn.time_mix_k"])
    rx = xx * p["ffn.time_mix_r"] + sx * (1 - p["ffn.time_mix_r"])
    r = torch.sigmoid(matmul(rx, p["ffn.receptance.weight"]))
    vx = torch.relu(matmul(kx, p["ffn.key.weight"])) ** 2
    return x + r * matmul(vx, p["ffn.value.weight"]), xx[:, -1]


def block(x: torch.Tensor, st: tuple, p: dict, ctx) -> tuple[torch.Tensor, tuple]:
    """One RWKV-4 layer: x [B, T, C] -> (x [B, T, C], new st); st = (att_x, att_a, att_b, att_p, ffn_x)
    (``STATE_NAMES``; att_a/b/p float32 [B, A], the others [B, C] in x's dtype)."""
    att_x, aa, bb, pp, ffn_x = st
    x, att_x, aa, bb, pp = _time_mix(x, att_x, aa, bb, pp, p, ctx.ops)
    x, ffn_x = _channel_mix(x, ffn_x, p, ctx.ops)
    return x, (att_x, aa, bb, pp, ffn_x)
