"""RWKV-5 "Eagle" (5, 5.1, 5.2): multi-head matrix-valued state, gate from 5.1, per-channel decay in 5.2.

Formulas: ChatRWKV ``rwkv/model.py`` (pip 0.8.32) ``att_one_v5``, ``att_one_v5_1``, ``att_seq_v5_2``;
B. Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence" (2024).
``block`` follows the contract of ``rwkv_chat.models.rwkv.generations`` (x the residual stream [B, T, C] in and
out; products and the WKV through ``ctx.ops``); the channel-mix is v4's. State ``att_kv`` is float32
[B, H, N, N] indexed [key, value].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rwkv_chat.models.rwkv import v4
from rwkv_chat.models.rwkv.nn import head_group_norm, layer_norm, time_shift
from rwkv_chat.models.rwkv.v4 import MATRICES, channel_mix_keys

STATE_NAMES = ("att_x", "att_kv", "ffn_x")
FP32_STATE = ("att_kv",)


def layer_keys(spec, i: int) -> dict:
    C, A, H = spec.n_embd, spec.n_att, spec.n_head
    keys = {
        "ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,),
        "att.time_decay": (A,) if spec.version == "5.2" else (H,),
        "att.time_mix_k": (C,), "att.time_mix_v": (C,), "att.time_mix_r": (C,),
        "att.ln_x.weight": (A,), "att.ln_x.bias": (A,),
        "att.key.weight": (A, C), "att.value.weight": (A, C), "att.receptance.weight": (A, C),
        "att.output.weight": (C, A),
        **channel_mix_keys(spec),
    }
    keys["att.time_first|att.time_faaaa"] = keys["att.time_decay"]
    if spec.version != "5":
        keys["att.time_mix_g"] = (C,)
        keys["att.gate.weight"] = (A, C)
    return keys


def convert(name: str, t: torch.Tensor, spec) -> tuple[str, torch.Tensor, str]:
    """See ``v4.convert``. Decay becomes ``exp(-exp(time_decay))`` and the bonus ``u``, both float32 [H, N].

    ``time_faaaa`` is the bonus itself; older checkpoints store ``log u`` in ``time_first``.
    """
    H, N = spec.n_head, spec.head_size
    per_head = lambda x: x.float().reshape(H, -1).expand(H, N).contiguous()  # noqa: E731
    if name.endswith(MATRICES):
        return name, t.t(), "matrix"
    if ".time_" in name:
        t = t.squeeze()
    if name == "att.time_decay":
        return name, per_head(torch.exp(-torch.exp(t.float()))), "fp32"
    if name == "att.time_faaaa":
        return "att.time_first", per_head(t), "fp32"
    if name == "att.time_first":
        return name, per_head(torch.exp(t.float())), "fp32"
    if name == "att.time_state":
        return name, t.float().reshape(H, N, N).transpose(1, 2).contiguous(), "fp32"
    if name.startswith("att.ln_x"):
        return name, t.float(), "fp32"
    return name, t, "act"


def zero_state(spec, batch: int, device, atype: torch.dtype, params: dict) -> tuple[torch.Tensor, ...]:
    C, H, N = spec.n_embd, spec.n_head, spec.head_size
    ts = params.get("att.time_state")
    kv = (ts.to(device).unsqueeze(0).repeat(batch, 1, 1, 1) if ts is not None
          else torch.zeros(batch, H, N, N, dtype=torch.float32, device=device))
    return (torch.zeros(batch, C, dtype=atype, device=device), kv,
            torch.zeros(batch, C, dtype=atype, device=device))


def _time_mix(x, att_x, s, p, spec, ops):
    """x: [B, T, C] -> (x + att(x), new att_x [B, C], new s float32 [B, H, N, N])."""
    matmul = ops.matmul
    B, T, C = x.shape
    H, N = spec.n_head, spec.head_size
    xx = layer_norm(x, p["ln1.weight"], p["ln1.bias"])
    sx = time_shift(xx, att_x)
    mix = lambda m: xx * p[m] + sx * (1 - p[m])  # noqa: E731
    r = matmul(mix("att.time_mix_r"), p["att.receptance.weight"], output_dtype=torch.float32)
    k = matmul(mix("att.time_mix_k"), p["att.key.weight"], output_dtype=torch.float32)
    v = matmul(mix("att.time_mix_v"), p["att.value.weight"], output_dtype=torch.float32)
    y, s = ops.wkv5(r.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
                    p["att.time_decay"], p["att.time_first"], s)
    out = head_group_norm(y.reshape(B, T, H * N), H, p["att.ln_x.weight"], p["att.ln_x.bias"]).to(x.dtype)
    if "att.gate.weight" in p:
        out = out * F.silu(matmul(mix("att.time_mix_g"), p["att.gate.weight"]))
    return x + matmul(out, p["att.output.weight"]), xx[:, -1], s


def block(x: torch.Tensor, st: tuple, p: dict, ctx) -> tuple[torch.Tensor, tuple]:
    """One RWKV-5.x layer: x [B, T, C] -> (x [B, T, C], new st); st = (att_x [B, C], att_kv float32
    [B, H, N, N], ffn_x [B, C])."""
    att_x, s, ffn_x = st
    x, att_x, s = _time_mix(x, att_x, s, p, ctx.spec, ctx.ops)
    x, ffn_x = v4._channel_mix(x, ffn_x, p, ctx.ops)
    return x, (att_x, s, ffn_x)
