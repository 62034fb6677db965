"""Placing a Qwen2 checkpoint's weights on the strategy's devices and formats (``Qwen2`` calls ``place``).

Per layer, the parameters ``layers.block`` reads: the q, k, v projections packed side by side into one matrix
``wqkv`` [C, (H + 2K)·D] (and their biases into ``bqkv``), the MLP's gate and up into ``gate_up`` [C, 2F], so a
layer runs one product for q, k, v and one for gate|up. The float matrices are concatenated along their outputs
before a format packs them: ``fp`` keeps them as they are, ``i4`` and ``f8`` quantize per output column (per group
of inputs), so their packed values equal those of each matrix alone; ``i8`` (the reference's min/max row and
column scheme) takes its row ranges over the joined outputs, a valid quantization of the same matrix with the
same error bound. A pre-quantized GPTQ folder's q, k, v (gate, up) are joined along N as stored
(``formats.i4.concat_i4``) where their layouts allow; else the layer keeps the tuple of separate weights, which
``layers.linear`` and ``layers.gated_mlp`` also take.
"""

from __future__ import annotations

import torch

from rwkv_chat.models import formats

#: the packed parameters: name -> the checkpoint's Linear weights joined along their outputs
JOINED = {"wqkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          "wo": ("self_attn.o_proj.weight",),
          "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
          "down": ("mlp.down_proj.weight",)}
#: biases joined the same way (present in Qwen2 for q, k, v; Qwen3 with attention_bias also o)
BIASES = {"bqkv": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
          "bo": ("self_attn.o_proj.bias",)}
VECTORS = {"input_layernorm.weight": "ln1", "post_attention_layernorm.weight": "ln2",
           "self_attn.q_norm.weight": "q_norm", "self_attn.k_norm.weight": "k_norm"}


def pack(model, w: torch.Tensor, i: int):
    """An nn.Linear weight [out, in] of layer i (n_layer: the head) packed [in, out] by its stage's format.
    Plain float weights stay in nn.Linear's layout ([in, out] is the transposed view of a contiguous
    [out, in]: ``x @ W`` is ``F.linear``'s GEMM, and fused ops read the rows they expect)."""
    place = model.plan.layers[i]
    quant = place.quant                 # the head of an i4 stage: plain (strategy.HEAD_IN_ACTIVATION)
    if quant is None and not place.stream:
        return w.to(place.atype).to(model.devices[i]).contiguous().t()
    return formats.get(quant).pack(w.t(), place.atype, model.devices[i], stream=place.stream)


def stored(model, ck, key: str, i: int):
    """The GPTQ Linear ``key`` ("<stem>.weight", [out, in] in a float checkpoint) of layer i as the ``Int4Weight``
    [in, out] stored in the folder, on the layer's device (pinned CPU memory when streamed)."""
    from rwkv_chat.models.formats.i4 import gptq_linear

    stem = key[: -len(".weight")]
    parts = {f"{stem}.{n}": ck.get(f"{stem}.{n}") for n in ("qweight", "qzeros", "scales", "g_idx")
             if f"{stem}.{n}" in ck.files}
    q = gptq_linear(parts, stem, ck.gptq)
    if model.plan.layers[i].stream:       # in the layout the layer's device reads (output-major on CUDA)
        from rwkv_chat.models.formats.i8 import prefers_output_major

        q = q.with_layout(prefers_output_major(model.devices[i])).contiguous()
        return q.pin_memory() if torch.cuda.is_available() else q
    return q.to(model.devices[i]).contiguous()


def vector(model, w: torch.Tensor, i: int) -> torch.Tensor:
    return w.to(model.plan.layers[i].atype).to(model.devices[i]).contiguous()


def _joined_gptq(model, ck, keys: tuple, i: int):
    from rwkv_chat.models.formats.i4 import concat_i4

    parts = [stored(model, ck, k, i) for k in keys]
    if len(parts) == 1:
        return parts[0]
    joined = concat_i4(parts)
    return tuple(parts) if joined is None else joined


def layer(model, ck, i: int) -> dict:
    """Layer i's parameters (module docstring), placed on its device in its format."""
    pre = f"model.layers.{i}."
    if ck.gptq is not None:
        p = {name: _joined_gptq(model, ck, tuple(pre + k for k in keys), i) for name, keys in JOINED.items()}
    else:
        p = {name: pack(model, torch.cat([ck.get(pre + k) for k in keys]) if len(keys) > 1 else ck.get(pre + keys[0]),
                        i) for name, keys in JOINED.items()}
    for name, keys in BIASES.items():
        if all(pre + k in ck.files for k in keys):
            p[name] = vector(model, torch.cat([ck.get(pre + k) for k in keys]), i)
    p.update({name: vector(model, ck.get(pre + key), i) for key, name in VECTORS.items() if pre + key in ck.files})
    return p


def place(model, ck, progress) -> None:
    """Set ``model.emb`` [V, C], ``model.layers`` (one dict per layer), ``model.norm`` [C] and ``model.head``
    [C, V] (packed; the embedding table's transposed view where tied and plain on its device)."""
    cfg, plan = model.config, model.plan
    total = cfg.n_layer + 1
    emb_w = ck.get("model.embed_tokens.weight")
    model.emb = vector(model, emb_w, 0)                                        # [V, C]
    model.layers = []
    for i in range(cfg.n_layer):
        if progress is not None:
            progress(i, total)
        model.layers.append(layer(model, ck, i))
    head = plan.layers[-1]
    n = cfg.n_layer
    model.norm = vector(model, ck.get("model.norm.weight"), n)
    plain = head.quant is None
    if cfg.tie_word_embeddings and plain and not head.stream and model.devices[-1] == model.emb.device \
            and head.atype == model.emb.dtype:
        model.head = model.emb.t()                                             # [C, V], shares the table
    elif ck.head_quantized:
        model.head = stored(model, ck, "lm_head.weight", n)
    else:
        model.head = pack(model, emb_w if cfg.tie_word_embeddings else ck.get("lm_head.weight"), n)
    if progress is not None:
        progress(total, total)
