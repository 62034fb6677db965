"""RWKV-7 "Goose": the generalized delta rule with vector-valued decay and in-context learning rate.

Formulas: ChatRWKV ``rwkv/model.py`` (pip 0.8.32) ``RWKV_x070_TMix_one/seq`` and ``RWKV_x070_CMix_*``
(including DeepEmbed ``ffn.s_emb``); B. Peng et al., "RWKV-7 Goose with Expressive Dynamic State
Evolution" (2025). ``block`` follows the contract of ``rwkv_chat.models.rwkv.generations`` (x the residual
stream [B, T, C] in and out; products and the WKV through ``ctx.ops``). State ``att_kv`` is float32
[B, H, N, N] indexed [value, key]. The first layer's value ``v_first`` is carried to later layers through
``ctx.v_first``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_chat.models.rwkv.nn import head_group_norm, layer_norm, time_shift

STATE_NAMES = ("att_x", "att_kv", "ffn_x")
FP32_STATE = ("att_kv",)
MATRICES = ("key.weight", "value.weight", "receptance.weight", "output.weight")
_DECAY_SCALE = 0.606531  # exp(-0.5), as in the reference


def layer_keys(spec, i: int) -> dict:
    C, A, F_ = spec.n_embd, spec.n_att, spec.n_ffn
    keys = {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        **{f"att.x_{m}": (C,) for m in "rwkvag"},
        "att.w0": (A,), "att.w1": None, "att.w2": None, "att.a0": (A,), "att.a1": None, "att.a2": None,
        "att.g1": None, "att.g2": None, "att.k_k": (A,), "att.k_a": (A,), "att.r_k": (A,),
        "att.key.weight": (A, C), "att.value.weight": (A, C), "att.receptance.weight": (A, C),
        "att.output.weight": (C, A), "att.ln_x.weight": (A,), "att.ln_x.bias": (A,),
        "ffn.x_k": (C,), "ffn.key.weight": (F_, C), "ffn.value.weight": (C, F_),
    }
    if i > 0:
        keys.update({"att.v0": (A,), "att.v1": None, "att.v2": None})
    return keys


def convert(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor, str]:
    """See ``v4.convert``. Vectors are squeezed to [C]; ``r_k`` is flattened to [H·N]; the low-rank
    matrices (w1, w2, a1, a2, g1, g2, v1, v2) and DeepEmbed tensors stay in the activation dtype."""
    if name.endswith(MATRICES):
        return name, t.t(), "matrix"
    if name == "att.r_k" or (t.dim() == 3 and t.shape[0] == t.shape[1] == 1):
        t = t.reshape(-1)
    if name.startswith("att.w0"):
        return name, t.float(), "fp32"
    return name, t, "act"


def zero_state(spec, batch: int, device, atype: torch.dtype, params: dict) -> tuple[torch.Tensor, ...]:
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    return (torch.zeros(batch, C, dtype=atype, device=device),
            torch.zeros(batch, H, N, N, dtype=torch.float32, device=device),
            torch.zeros(batch, C, dtype=atype, device=device))


def _time_mix(x, att_x, s, p, ctx):
    """x: [B, T, C] (layer-normed input) -> (att(x), new att_x [B, C], new s float32 [B, H, N, N])."""
    B, T, C = x.shape
    H, N = ctx.spec.n_head, ctx.spec.head_size
    xs = time_shift(x, att_x) - x
    xr, xw, xk, xv, xa, xg = (x + xs * p[f"att.x_{m}"] for m in "rwkvag")
    mm = ctx.ops.matmul
    r = mm(xr, p["att.receptance.weight"])
    w = mm(torch.tanh(mm(xw, p["att.w1"])), p["att.w2"])
    k = mm(xk, p["att.key.weight"])
    v = mm(xv, p["att.value.weight"])
    a = torch.sigmoid(p["att.a0"] + mm(mm(xa, p["att.a1"]), p["att.a2"]))
    g = mm(torch.sigmoid(mm(xg, p["att.g1"])), p["att.g2"])
    kk = F.normalize((k * p["att.k_k"]).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
    k = k * (1 + (a - 1) * p["att.k_a"])
    if ctx.v_first is None:  # the first layer
        ctx.v_first = v
    else:
        v = v + (ctx.v_first.to(device=v.device, dtype=v.dtype) - v) * torch.sigmoid(p["att.v0"] + mm(mm(xv, p["att.v1"]), p["att.v2"]))
    w = torch.exp(-_DECAY_SCALE * torch.sigmoid(p["att.w0"] + w.float()))
    shp = (B, T, H, N)
    y, s = ctx.ops.wkv7(r.view(shp), w.view(shp), k.view(shp), v.view(shp), (-kk).view(shp), (kk * a).view(shp), s)
    y = head_group_norm(y.reshape(B, T, C).to(x.dtype), H, p["att.ln_x.weight"], p["att.ln_x.bias"])
    y = y + ((r * k * p["att.r_k"]).view(B, T, H, N).sum(dim=-1, keepdim=True) * v.view(B, T, H, N)).view(B, T, C)
    return mm(y * g, p["att.output.weight"]), x[:, -1], s


def _channel_mix(x, ffn_x, p, ctx):
    """x: [B, T, C] (layer-normed input) -> (ffn(x), new ffn_x [B, C])."""
    xs = time_shift(x, ffn_x) - x
    mm = ctx.ops.matmul
    k = torch.relu(mm(x + xs * p["ffn.x_k"], p["ffn.key.weight"])) ** 2
    if "ffn.s_emb.weight" in p:  # DeepEmbed: a per-token 32×32 modulation of the hidden layer
        B, T, _ = x.shape
        semb = p["ffn.s_emb.weight"][ctx.tokens.to(p["ffn.s_emb.weight"].device)].to(x.device).view(B, T, 32, 32)
        ss = ((x @ p["ffn.s1"]).view(B, T, 1, 32) @ semb).view(B, T, 32)
        k = k * ((ss @ p["ffn.s2"]) + p["ffn.s0"])
    return mm(k, p["ffn.value.weight"]), x[:, -1]


def block(x: torch.Tensor, st: tuple, p: dict, ctx) -> tuple[torch.Tensor, tuple]:
    """One RWKV-7 layer: x [B, T, C] -> (x [B, T, C], new st); st = (att_x [B, C], att_kv float32
    [B, H, N, N], ffn_x [B, C]). Layer 0 sets ``ctx.v_first``; DeepEmbed layers read ``ctx.tokens``."""
    att_x, s, ffn_x = st
    xx, att_x, s = _time_mix(layer_norm(x, p["ln1.weight"], p["ln1.bias"]), att_x, s, p, ctx)
    x = x + xx
    xx, ffn_x = _channel_mix(layer_norm(x, p["ln2.weight"], p["ln2.bias"]), ffn_x, p, ctx)
    return x + xx, (att_x, s, ffn_x)
