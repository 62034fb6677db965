"""RWKV-6 "Finch": data-dependent token shift (``time_maa`` LoRA) and data-dependent decay.

Formulas: ChatRWKV ``rwkv/model.py`` (pip 0.8.32) ``att_one_v6_0``/``att_seq_v6_0``/``ffn_one_v6``;
B. Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (2024).
``block`` follows the contract of ``rwkv_chat.models.rwkv.generations`` (x the residual stream [B, T, C] in and
out; products and the WKV through ``ctx.ops``). State ``att_kv`` is float32 [B, H, N, N] indexed [key, value].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_chat.models.rwkv.nn import head_group_norm, layer_norm, time_shift
from rwkv_chat.models.rwkv.v4 import MATRICES
from rwkv_chat.models.rwkv import v5

# the same state layout as v5
STATE_NAMES, FP32_STATE, zero_state = v5.STATE_NAMES, v5.FP32_STATE, v5.zero_state


def layer_keys(spec, i: int) -> dict:
    C, A, F_ = spec.n_embd, spec.n_att, spec.n_ffn
    return {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        "att.time_maa_x": (C,), "att.time_maa_w": (C,), "att.time_maa_k": (C,), "att.time_maa_v": (C,),
        "att.time_maa_r": (C,), "att.time_maa_g": (C,), "att.time_maa_w1": None, "att.time_maa_w2": None,
        "att.time_decay": (A,), "att.time_decay_w1": None, "att.time_decay_w2": None,
        "att.time_faaaa|att.time_first": (A,),
        "att.key.weight": (A, C), "att.value.weight": (A, C), "att.receptance.weight": (A, C),
        "att.gate.weight": (A, C), "att.output.weight": (C, A), "att.ln_x.weight": (A,), "att.ln_x.bias": (A,),
        "ffn.time_maa_k": (C,), "ffn.time_maa_r": (C,), "ffn.key.weight": (F_, C),
        "ffn.value.weight": (C, F_), "ffn.receptance.weight": (C, C),
    }


def convert(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor, str]:
    """See ``v4.convert``. ``time_decay`` stays in log-log form (float32 [H, N]); the decay per token is
    ``exp(-exp(time_decay + lora(x)))``. The LoRA matrices (``*_w1``, ``*_w2``) stay in the activation dtype."""
    H, N = spec.n_head, spec.head_size
    if name.endswith(MATRICES):
        return name, t.t(), "matrix"
    if ".time_" in name and not name.endswith(("_w1", "_w2")):
        t = t.squeeze()
    if name == "att.time_decay":
        return name, t.float().reshape(H, N), "fp32"
    if name == "att.time_faaaa":
        return "att.time_first", t.float().reshape(H, N), "fp32"
    if name == "att.time_first":  # stored as log u
        return name, torch.exp(t.float()).reshape(H, N), "fp32"
    if name == "att.time_state":
        return name, t.float().reshape(H, N, N).transpose(1, 2).contiguous(), "fp32"
    if name.startswith("att.ln_x"):
        return name, t.float(), "fp32"
    return name, t, "act"


def _time_mix(x, att_x, s, p, spec, ops):
    """x: [B, T, C] -> (x + att(x), new att_x [B, C], new s float32 [B, H, N, N])."""
    matmul = ops.matmul
    B, T, C = x.shape
    H, N = spec.n_head, spec.head_size
    xx = layer_norm(x, p["ln1.weight"], p["ln1.bias"])
    sx = time_shift(xx, att_x) - xx
    xxx = torch.tanh((xx + sx * p["att.time_maa_x"]) @ p["att.time_maa_w1"])       # [B, T, 5*D]
    xxx = xxx.view(B * T, 5, -1).transpose(0, 1)                                    # [5, BT, D]
    mw, mk, mv, mr, mg = torch.bmm(xxx, p["att.time_maa_w2"]).view(5, B, T, C).unbind(0)
    wx = xx + sx * (p["att.time_maa_w"] + mw)
    kx = xx + sx * (p["att.time_maa_k"] + mk)
    vx = xx + sx * (p["att.time_maa_v"] + mv)
    rx = xx + sx * (p["att.time_maa_r"] + mr)
    gx = xx + sx * (p["att.time_maa_g"] + mg)
    r = matmul(rx, p["att.receptance.weight"], output_dtype=torch.float32).view(B, T, H, N)
    k = matmul(kx, p["att.key.weight"], output_dtype=torch.float32).view(B, T, H, N)
    v = matmul(vx, p["att.value.weight"], output_dtype=torch.float32).view(B, T, H, N)
    g = F.silu(matmul(gx, p["att.gate.weight"]))
    w = p["att.time_decay"] + (torch.tanh(wx @ p["att.time_decay_w1"]) @ p["att.time_decay_w2"]).float().view(B, T, H, N)
    y, s = ops.wkv5(r, k, v, torch.exp(-torch.exp(w)), p["att.time_first"], s)
    out = head_group_norm(y.reshape(B, T, H * N), H, p["att.ln_x.weight"], p["att.ln_x.bias"]).to(x.dtype) * g
    return x + matmul(out, p["att.output.weight"]), xx[:, -1], s


def _channel_mix(x, ffn_x, p, ops):
    """x: [B, T, C] -> (x + ffn(x), new ffn_x [B, C])."""
    matmul = ops.matmul
    xx = layer_norm(x, p["ln2.weight"], p["ln2.bias"])
    sx = time_shift(xx, ffn_x) - xx
    kx = xx + sx * p["ffn.time_maa_k"]
    rx = xx + sx * p["ffn.time_maa_r"]
    r = torch.sigmoid(matmul(rx, p["ffn.receptance.weight"]))
    vx = torch.relu(matmul(kx, p["ffn.key.weight"])) ** 2
    return x + r * matmul(vx, p["ffn.value.weight"]), xx[:, -1]


def block(x: torch.Tensor, st: tuple, p: dict, ctx) -> tuple[torch.Tensor, tuple]:
    """One RWKV-6 layer: x [B, T, C] -> (x [B, T, C], new st); st = (att_x [B, C], att_kv float32
    [B, H, N, N], ffn_x [B, C])."""
    att_x, s, ffn_x = st
    x, att_x, s = _time_mix(x, att_x, s, p, ctx.spec, ctx.ops)
    x, ffn_x = _channel_mix(x, ffn_x, p, ctx.ops)
    return x, (att_x, s, ffn_x)
