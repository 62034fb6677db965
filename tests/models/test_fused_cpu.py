"""The fused CPU call (models/backends/fused_cpu.py, csrc/fused_cpu/) against the eager block path, on the real tiny
models of every generation: logits and states within float32 rounding, identical greedy tokens, the
BatchDecoder step, the eager fallback where the fused call does not serve a strategy, and the named-weight
constructor's refusals (a missing, misshapen or unknown weight, named in the error)."""

from __future__ import annotations

import pytest
import torch

from rwkv_chat.models import RWKV, State
from rwkv_chat.models.rwkv.decode import BatchDecoder, decode_greedy
from rwkv_chat.models.errors import StateError

VERSIONS = ("4", "5", "5.2", "6", "7")
PROMPT = [int(c) for c in b"The quick brown fox"]


def _close(a, b, tol=1e-5):
    assert torch.allclose(a, b, rtol=tol, atol=tol), f"max diff {(a - b).abs().max().item():.3e}"


class _Eager:
    """Run a model through the eager blocks for the duration of a ``with``."""

    def __init__(self, model):
        self.model, self.fused = model, model.fused_cpu

    def __enter__(self):
        self.model.fused_cpu = None
        return self.model

    def __exit__(self, *exc):
        self.model.fused_cpu = self.fused


def _count_blocks(monkeypatch, model) -> list[int]:
    calls = [0]
    block = model.generation.block

    def counting(*args, **kwargs):
        calls[0] += 1
        return block(*args, **kwargs)

    monkeypatch.setattr(model.generation, "block", counting)
    return calls


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8", "cpu fp32i4", "cpu fp32f8"])
@pytest.mark.parametrize("version", VERSIONS)
def test_fused_matches_eager(model_path, version, strategy, monkeypatch):
    model = RWKV(model_path(version), strategy)
    assert model.fused_cpu is not None, model.fused_cpu_reason
    assert model.fused_cpu_reason is None
    # i8: the factored product (rx·Σ x·ry·w + Σ x·my + mx·Σ x) cancels large terms, so float32 rounding
    # differences of its inputs (layer/group norm reductions in another order) grow ~4x; the i8 products
    # themselves are bitwise the compiled mm8 kernel's.
    tol = 1e-5 if strategy == "cpu fp32" else 1e-4
    calls = _count_blocks(monkeypatch, model)
    # prompt (T > 1, every position) then greedy one-token steps
    seq_f, st_f = model.forward(PROMPT, None, full_output=True)
    assert calls[0] == 0, "the fused call must serve the forward"
    with _Eager(model):
        seq_e, st_e = model.forward(PROMPT, None, full_output=True)
    assert calls[0] == model.n_layer
    _close(seq_f, seq_e, tol)
    for a, b in zip(st_f, st_e):
        _close(a, b, tol)
    assert st_f.token_count == st_e.token_count == len(PROMPT)
    lf, le = seq_f[-1], seq_e[-1]
    toks_f, toks_e = [], []
    for _ in range(24):
        toks_f.append(int(lf.argmax()))
        toks_e.append(int(le.argmax()))
        lf, st_f = model.forward([toks_f[-1]], st_f)
        with _Eager(model):
            le, st_e = model.forward([toks_e[-1]], st_e)
        _close(lf, le, tol)
    assert toks_f == toks_e
    for a, b in zip(st_f, st_e):
        _close(a, b, tol)


@pytest.mark.parametrize("version", VERSIONS)
def test_fused_batch_decoder_step(model_path, version):
    model = RWKV(model_path(version), "cpu fp32")
    logits, state = model.forward(PROMPT, None)
    _, other = model.forward([9, 8, 7], None)
    dec = BatchDecoder(model, max_batch=3)
    h1, h2 = dec.add(state), dec.add(other)
    out = dec.step({h1: 5, h2: 6})
    with _Eager(model):
        ref1, s1 = model.forward([5], state)
        ref2, _ = model.forward([6], other)
        _close(out[h1], ref1)
        _close(out[h2], ref2)
        out = dec.step({h1: 3})                      # h2 is held: its state must not move
        ref1b, _ = model.forward([3], s1)
    _close(out[h1], ref1b)
    kept = dec.remove(h2)
    for a, b in zip(kept, model.forward([6], other)[1]):
        _close(a, b)
    # greedy through the decoder (fused) equals greedy through eager forward
    fused_toks = decode_greedy(model, logits, state, 16)
    with _Eager(model):
        eager_toks = decode_greedy(model, logits, state, 16)
    assert fused_toks == eager_toks


def test_forward_leaves_the_given_state_alone(model_path):
    model = RWKV(model_path("7"), "cpu fp32")
    _, st = model.forward(PROMPT, None)
    before = st.clone()
    model.forward([1], st)
    model.forward([1, 2, 3], st)
    for a, b in zip(st, before):
        assert torch.equal(a, b)


def test_mixed_fp32_i8_strategy_is_fused(model_path):
    model = RWKV(model_path("6"), "cpu fp32 *4 -> cpu fp32i8")
    assert model.fused_cpu is not None, model.fused_cpu_reason
    lf, _ = model.forward(PROMPT, None)
    with _Eager(model):
        le, _ = model.forward(PROMPT, None)
    _close(lf, le)


@pytest.mark.parametrize("strategy,why", [("cpu bf16", "bfloat16"), ("cpu bf16i8", "bfloat16")])
def test_unserved_strategy_takes_the_eager_path(model_path, strategy, why, monkeypatch):
    model = RWKV(model_path("7"), strategy)
    assert model.fused_cpu is None
    assert why in model.fused_cpu_reason
    calls = _count_blocks(monkeypatch, model)
    logits, state = model.forward(PROMPT, None)
    assert calls[0] == model.n_layer and torch.isfinite(logits).all()
    dec = BatchDecoder(model, max_batch=1)
    h = dec.add(state)
    dec.step({h: 3})
    assert calls[0] == 2 * model.n_layer


def test_kernels_off_takes_the_eager_path(model_path):
    model = RWKV(model_path("5.2"), "cpu fp32", kernels=False)
    assert model.fused_cpu is None and "kernels=False" in model.fused_cpu_reason


def test_state_errors_keep_their_meaning(model_path):
    model = RWKV(model_path("7"), "cpu fp32")
    other = RWKV(model_path("6"), "cpu fp32")
    with pytest.raises(StateError):
        model.forward([1], other.zero_state())
    good = model.zero_state()
    bad_layers = list(good.layers)
    att_x, kv, ffn_x = bad_layers[1]
    bad_layers[1] = (att_x, kv[:, :, :-1].contiguous(), ffn_x)
    bad = State(good.version, good.fingerprint, good.names, bad_layers)
    with pytest.raises(StateError):
        model.forward([1], bad)
    # a state in another dtype (e.g. loaded from disk for a bf16 model) still runs: the eager path serves it
    half = good.to(dtype=torch.bfloat16)
    logits, _ = model.forward([1], half)
    assert torch.isfinite(logits).all()


def test_long_prompt_takes_the_eager_path(model_path, monkeypatch):
    from rwkv_chat.models.backends import fused_cpu

    model = RWKV(model_path("5.2"), "cpu fp32")
    ids = [(i * 37) % 256 for i in range(fused_cpu.SEQ_TOKENS + 6)]
    calls = _count_blocks(monkeypatch, model)
    whole, st = model.forward(ids, None)
    assert calls[0] == model.n_layer                     # eager (chunked WKV) for a long prompt
    _, s1 = model.forward(ids[:40], None)                # the fused call, in two pieces
    part, s2 = model.forward(ids[40:], s1)
    assert calls[0] == model.n_layer
    _close(whole, part)
    for a, b in zip(st, s2):
        _close(a, b)


def test_rescale_layer_matches_eager(model_path):
    model = RWKV(model_path("6"), "cpu fp32", rescale_layer=3)
    assert model.fused_cpu is not None and model.rescale_layer == 3
    lf, sf = model.forward(PROMPT, None)
    with _Eager(model):
        le, se = model.forward(PROMPT, None)
    _close(lf, le)
    for a, b in zip(sf, se):
        _close(a, b)


def _packed(model):
    """``(dims, model-level dict, per-layer dicts)`` as ``FusedCpu`` passes them to ``FusedCpuModel``."""
    from rwkv_chat.models.backends import fused_cpu

    spec = model.spec
    dims = [fused_cpu._VERSION_CODE[spec.version], spec.n_layer, spec.n_embd, spec.n_att, spec.n_ffn,
            max(spec.n_head, 1), max(spec.head_size, 1), spec.vocab_size, 0]
    return dims, fused_cpu.model_weights(model), [fused_cpu.named_weights(p) for p in model.layers]


def test_named_weights_i4_parts(model_path):
    from rwkv_chat.models.backends import fused_cpu

    model = RWKV(model_path("7"), "cpu fp32i4")
    assert model.fused_cpu is not None, model.fused_cpu_reason
    named = fused_cpu.named_weights(model.layers[1])
    w = model.layers[1]["ffn.key.weight"]
    assert named["ffn.key.weight"] is w.qweight and w.qweight.dtype == torch.int32
    assert named["ffn.key.weight.qzeros"] is w.qzeros and named["ffn.key.weight.scales"] is w.scales
    dims, top, layers = _packed(model)
    cls = fused_cpu._class()
    for name, t, match in [
        ("ffn.key.weight.qzeros", w.qzeros[:, :-1].contiguous(), r"layer 1 'ffn.key.weight.qzeros' must be int32"),
        ("ffn.key.weight.scales", w.scales.to(torch.float64), r"layer 1 'ffn.key.weight.scales' must be float32"),
        ("ffn.key.weight", w.qweight[:-1].contiguous(), r"layer 1 'ffn.key.weight' \(int4 qweight\) has shape"),
    ]:
        bad = [dict(p) for p in layers]
        bad[1][name] = t
        with pytest.raises(RuntimeError, match=match):
            cls(dims, top, bad)
    bad = [dict(p) for p in layers]
    del bad[1]["ffn.key.weight.scales"]
    with pytest.raises(RuntimeError, match="layer 1 lacks 'ffn.key.weight.scales'"):
        cls(dims, top, bad)


def test_named_weights_f8_parts(model_path):
    from rwkv_chat.models.backends import fused_cpu

    model = RWKV(model_path("5.2"), "cpu fp32f8")
    assert model.fused_cpu is not None, model.fused_cpu_reason
    w = model.layers[1]["ffn.key.weight"]
    named = fused_cpu.named_weights(model.layers[1])
    assert named["ffn.key.weight"] is w.w8 and named["ffn.key.weight.scale"] is w.scale
    dims, top, layers = _packed(model)
    cls = fused_cpu._class()
    for name, t, match in [
        ("ffn.key.weight.scale", w.scale[:-1].contiguous(), r"layer 1 'ffn.key.weight.scale' must be float32"),
        ("ffn.key.weight", w.w8.t().contiguous(), r"layer 1 'ffn.key.weight' \(fp8, output-major\) has shape"),
    ]:
        bad = [dict(p) for p in layers]
        bad[1][name] = t
        with pytest.raises(RuntimeError, match=match):
            cls(dims, top, bad)
    model.layers[1]["ffn.key.weight"] = w.with_layout(True)
    assert fused_cpu.attach(model) is None and "input-major" in model.fused_cpu_reason


def test_i4_with_g_idx_takes_the_eager_path(model_path):
    from rwkv_chat.models.backends import fused_cpu
    from rwkv_chat.models.formats.i4 import Int4Weight

    model = RWKV(model_path("7"), "cpu fp32i4")
    w = model.layers[2]["att.key.weight"]
    model.layers[2]["att.key.weight"] = Int4Weight(w.qweight, w.qzeros, w.scales,
                                                   torch.arange(w.shape[0], dtype=torch.int32) // w.group_size,
                                                   w.group_size, w.shape)
    assert fused_cpu.attach(model) is None
    assert "layer 2 'att.key.weight'" in model.fused_cpu_reason and "g_idx" in model.fused_cpu_reason


def test_named_weights_i8_parts(model_path):
    from rwkv_chat.models.backends import fused_cpu

    model = RWKV(model_path("7"), "cpu fp32i8")
    named = fused_cpu.named_weights(model.layers[1])
    w = model.layers[1]["att.key.weight"]
    assert named["att.key.weight"] is w.w and named["att.key.weight"].dtype == torch.uint8
    for part in ("mx", "rx", "my", "ry"):
        assert named[f"att.key.weight.{part}"] is getattr(w, part)
    assert named["att.x_r"].data_ptr() == model.layers[1]["att.x_r"].data_ptr()    # no copy
    assert set(fused_cpu.model_weights(model)) == {"emb.weight", "ln_out.weight", "ln_out.bias", "head.weight",
                                                   "head.weight.mx", "head.weight.rx", "head.weight.my",
                                                   "head.weight.ry"}


@pytest.mark.parametrize("version,layer,name", [
    ("7", 2, "att.v0"), ("7", 1, "att.k_k"), ("6", 0, "att.time_maa_w2"), ("4", 3, "ffn.receptance.weight"),
    ("5.2", 1, "att.time_mix_g"),                  # the gate is optional, but with a gate time_mix_g is not
])
def test_missing_weight_is_named(model_path, version, layer, name):
    from rwkv_chat.models.backends import fused_cpu

    model = RWKV(model_path(version), "cpu fp32")
    dims, top, layers = _packed(model)
    del layers[layer][name]
    with pytest.raises(RuntimeError, match=f"layer {layer} lacks '{name}'"):
        fused_cpu._class()(dims, top, layers)
    del model.layers[layer][name]                    # attach turns the refusal into the reason
    assert fused_cpu.attach(model) is None and name in model.fused_cpu_reason


def test_bad_named_weights_are_refused(model_path):
    from rwkv_chat.models.backends import fused_cpu

    model = RWKV(model_path("7"), "cpu fp32i8")
    dims, top, layers = _packed(model)
    cls = fused_cpu._class()
    cls(dims, top, layers)                           # layer 0 has no v0/v1/v2: optional there
    assert "att.v0" not in layers[0] and "att.v0" in layers[1]

    def refused(match, top=top, layers=layers):
        with pytest.raises(RuntimeError, match=match):
            cls(dims, top, layers)

    refused("the model lacks 'head.weight.ry'", top={k: v for k, v in top.items() if k != "head.weight.ry"})
    for name, t, match in [
        ("att.bogus", torch.zeros(3), "layer 1 has weights the RWKV-7 fused path does not read: 'att.bogus'"),
        ("att.x_r", torch.zeros(3), "layer 1 'att.x_r' must be float32 with 64 elements"),
        ("att.x_r", torch.zeros(64, 2)[:, 0], "layer 1 'att.x_r' must be a contiguous CPU tensor"),
        ("att.key.weight", torch.zeros(64, 32, dtype=torch.uint8), r"layer 1 'att.key.weight' has shape"),
        ("att.key.weight.mx", torch.zeros(3), r"layer 1 'att.key.weight.mx' \(i8 scale\) must be float32"),
    ]:
        bad = [dict(p) for p in layers]
        bad[1][name] = t
        refused(match, layers=bad)
    refused(f"{model.n_layer - 1} layer weight dicts for {model.n_layer} layers", layers=layers[:-1])


def test_v5_without_gate_is_fused(model_path):
    model = RWKV(model_path("5"), "cpu fp32")       # RWKV-5.0: no att.gate.weight / att.time_mix_g
    assert model.version == "5"
    assert "att.gate.weight" not in model.layers[0]
    assert model.fused_cpu is not None, model.fused_cpu_reason
