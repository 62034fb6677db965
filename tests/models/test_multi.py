"""Layers across several stages, streamed layers, and the dry-run memory plan, on the CPU.

Two CPU stages (``cpu fp32 *2 -> cpu fp32``) run the same code path as two GPUs (x, RWKV-7's ``v_first`` and the
state handed from stage to stage); a streamed stage is simulated on the CPU by marking layers streamed and
attaching the streamer (the grammar refuses ``*N+`` on the CPU). Expected values come from the one-stage,
all-resident model; expected bytes from a real load's tensors.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from rwkv_chat.models import RWKV, formats
from rwkv_chat.models.formats.i8 import quantize_i8
from rwkv_chat.models.plan import fitted_strategy, plan_memory, read_header, suggest
from rwkv_chat.models.rwkv.decode import BatchDecoder
from rwkv_chat.models.stream import LayerStreamer

VERSIONS = ["4", "5", "5.2", "6", "7"]
PROMPT = list(b"The quick brown fox")


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _streamed(path, strategy: str, first: int) -> RWKV:
    """A model whose layers ``first``.. (the head included) are served by the streamer, on the CPU."""
    m = RWKV(path, strategy, kernels=False)
    m.plan = dataclasses.replace(m.plan, layers=tuple(dataclasses.replace(p, stream=p.index >= first)
                                                       for p in m.plan.layers))
    m.attach_streamer()
    return m


@pytest.mark.parametrize("version", VERSIONS)
def test_two_cpu_stages_equal_one(model_path, version):
    one = RWKV(model_path(version), "cpu fp32", kernels=False)
    two = RWKV(model_path(version), "cpu fp32 *2 -> cpu fp32", kernels=False)
    assert [d["last"] for d in two.plan.describe()] == [1, one.n_layer]
    # sequence, then one token from the returned state
    a, sa = one.forward(PROMPT, None, full_output=True)
    b, sb = two.forward(PROMPT, None, full_output=True)
    _exact(a, b)
    a1, _ = one.forward([65], sa)
    b1, _ = two.forward([65], sb)
    _exact(a1, b1)
    # a batch
    rows = [PROMPT[:6], PROMPT[6:12], PROMPT[12:18]]
    ab, _ = one.forward_batch(rows, None)
    bb, _ = two.forward_batch(rows, None)
    _exact(ab, bb)
    # batched decode: three conversations stepping together, then greedy
    d1, d2 = BatchDecoder(one, max_batch=4), BatchDecoder(two, max_batch=4)
    h1 = [d1.add(sa), d1.add(None), d1.add(sa)]
    h2 = [d2.add(sb), d2.add(None), d2.add(sb)]
    for tok in (10, 20, 30):
        o1 = d1.step({h: tok + k for k, h in enumerate(h1)})
        o2 = d2.step({h: tok + k for k, h in enumerate(h2)})
        for x, y in zip(h1, h2):
            _exact(o1[x], o2[y])
    assert d1.greedy({h1[0]: 5, h1[1]: 6}, 6) == {h2[i] - h2[0] + h1[0]: v for i, v in
                                                  enumerate(d2.greedy({h2[0]: 5, h2[1]: 6}, 6).values())}
    for x, y in zip(d1.state(h1[1]), d2.state(h2[1])):
        _exact(x, y)
    assert not d2.graphs            # no CUDA graph on the CPU
    # the per-stage decode of several GPUs (segments, static hand-over buffers), run without graphs
    from rwkv_chat.models.rwkv.decode_stages import StagedGraphs

    d3 = BatchDecoder(two, max_batch=4)
    d3._staged, d3.graphs = StagedGraphs(d3), True
    assert [(s, e) for _, s, e in d3._staged.segments] == [(0, 2), (2, two.n_layer + 1)]
    d1 = BatchDecoder(one, max_batch=4)
    h3 = [d3.add(sb), d3.add(None)]
    h1 = [d1.add(sa), d1.add(None)]
    o1, o3 = d1.step({h1[0]: 7, h1[1]: 8}), d3.step({h3[0]: 7, h3[1]: 8})
    for x, y in zip(h1, h3):
        _exact(o1[x], o3[y])
    assert list(d1.greedy({h1[0]: 3, h1[1]: 4}, 5).values()) == list(d3.greedy({h3[0]: 3, h3[1]: 4}, 5).values())


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i8"])
def test_streamed_layers_equal_resident(model_path, version, strategy):
    ref = RWKV(model_path(version), strategy, kernels=False)
    s = _streamed(model_path(version), strategy, 2)
    k = ref.n_layer + 1 - 2                          # streamed layers, the head included
    assert s.streamer.order == list(range(2, ref.n_layer + 1))
    a, sa = ref.forward(PROMPT, None, full_output=True)
    b, sb = s.forward(PROMPT, None, full_output=True)
    _exact(a, b)
    # every streamed layer copied once per forward, one ahead (the wrap-around prefetches the next forward's first)
    assert s.streamer.copies == k + 1
    a1, _ = ref.forward([66], sa)
    b1, _ = s.forward([66], sb)
    _exact(a1, b1)
    assert s.streamer.copies == 2 * k + 1
    da, db = BatchDecoder(ref, max_batch=2), BatchDecoder(s, max_batch=2)
    ha, hb = [da.add(sa), da.add(None)], [db.add(sb), db.add(None)]
    assert list(da.greedy({ha[0]: 1, ha[1]: 2}, 5).values()) == list(db.greedy({hb[0]: 1, hb[1]: 2}, 5).values())


def test_two_streamed_layers_stay_in_the_buffers(model_path):
    s = _streamed(model_path("7"), "cpu fp32", 11)       # layer 11 and the head
    ref = RWKV(model_path("7"), "cpu fp32", kernels=False)
    for _ in range(3):
        _exact(s.forward(PROMPT, None)[0], ref.forward(PROMPT, None)[0])
    assert s.streamer.copies == 2


def test_streamer_buffers_are_reused_and_keep_layouts():
    """Two slots of buffers allocated once; packed weights (i8, output-major) rebuilt on them, values equal."""
    g = torch.Generator().manual_seed(0)
    host = {i: {"w": torch.randn(8, 16, generator=g), "q": quantize_i8(torch.randn(16, 8, generator=g), torch.float32,
                                                                      output_major=True)} for i in range(5)}
    st = LayerStreamer(torch.device("cpu"), host)
    ptrs = set()
    for _ in range(3):
        for i in range(5):
            p = st.acquire(i)
            _exact(p["w"], host[i]["w"])
            assert p["q"].output_major and p["q"].w.stride() == host[i]["q"].w.stride()
            _exact(p["q"].dequantize(), host[i]["q"].dequantize())
            assert p["w"].data_ptr() != host[i]["w"].data_ptr()
            ptrs.add(p["w"].data_ptr())
    assert len(ptrs) == 2                             # two slots, never a new buffer
    assert st.copies == 15 + 1
    assert st.buffer_bytes == 2 * (formats.nbytes(host[0]["w"]) + formats.nbytes(host[0]["q"]))
    with pytest.raises(KeyError):
        st.acquire(7)


# -- the dry-run plan ---------------------------------------------------------------------------------
def _loaded_bytes(m: RWKV) -> dict[int, int]:
    """Bytes of a loaded model's tensors per stage (the embedding with layer 0, ln_out and the head last)."""
    per: dict[int, int] = {}
    pl = m.plan.layers
    for stage, v in [(pl[i].stage, v) for i, layer in enumerate(m.layers) for v in layer.values()] + \
            [(pl[0].stage, m.emb), (pl[-1].stage, m.head)] + [(pl[-1].stage, t) for t in m.ln_out]:
        per[stage] = per.get(stage, 0) + formats.nbytes(v)
    return per


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu bf16 *3 -> cpu fp32i8", "cpu fp16i8 *1 -> cpu bf16 -> cpu fp32"])
def test_plan_bytes_equal_a_real_load(model_path, version, strategy):
    m = RWKV(model_path(version), strategy, kernels=False)
    mp = plan_memory(model_path(version), strategy, free={"cpu": 1 << 40})
    assert {s.stage: sum(s.weights.values()) for s in mp.stages} == _loaded_bytes(m)
    state = m.zero_state()
    assert sum(s.state for s in mp.stages) == sum(t.numel() * t.element_size() for layer in state.layers
                                                   for t in layer)
    assert [str(p) for p in mp.plan.layers] == [str(p) for p in m.plan.layers]
    assert mp.fits is True and mp.devices[0].device == "cpu" and not mp.transfers


@pytest.mark.parametrize("strategy", ["cpu fp32i8", "cpu bf16i4", "cpu fp32f8", "cpu fp32i8 *2 -> cpu fp32i4",
                                      "cpu fp32 *2 -> cpu fp32i4"])
def test_plan_of_a_converted_file_equals_a_real_load(model_path, tmp_path, strategy):
    """A file of ``rwkv-chat convert``: planned as the loader places its packed weights, refused (in the
    loader's words) for a strategy asking other formats, and suggested only as strategies that load it."""
    from rwkv_chat.models.errors import StrategyError
    from rwkv_chat.models.rwkv.convert import convert

    out = tmp_path / "packed.safetensors"
    convert(model_path("5.2"), out, strategy)
    m = RWKV(out, strategy, kernels=False)
    mp = plan_memory(out, strategy, free={"cpu": 1 << 40})
    assert {s.stage: sum(s.weights.values()) for s in mp.stages} == _loaded_bytes(m)
    with pytest.raises(StrategyError) as loaded:
        RWKV(out, "cpu fp32", kernels=False)
    with pytest.raises(StrategyError) as planned:
        plan_memory(out, "cpu fp32", free={})
    assert str(planned.value) == str(loaded.value)
    fits = suggest(out, [])
    assert fits and all(RWKV(out, s, kernels=False).plan.strategy == s for s in fits), fits
    # a default strategy (the config's) fitted to what the file holds loads it
    fitted = fitted_strategy(out, "cpu fp32")
    assert RWKV(out, fitted, kernels=False).plan.strategy == fitted
    assert fitted == (strategy if " -> " in strategy else f"cpu fp32{strategy.split()[1][4:]}")
    assert fitted_strategy(model_path("5.2"), "cpu bf16 *2 -> cpu fp32") == "cpu bf16 *2 -> cpu fp32"
    if " -> " not in strategy:      # stages that become alike merge
        quant = strategy.split()[1][4:]
        assert fitted_strategy(out, "cpu fp32 *2 -> cpu fp32i8") == f"cpu fp32{quant}"
        assert fitted_strategy(out, "cpu bf16 *1 -> cpu bf16 *2 -> cpu fp32") == f"cpu bf16{quant} *3 -> cpu fp32{quant}"
        # two stages sharing the remaining layers: folding one more into them would move layers between devices
        assert fitted_strategy(out, "cpu fp32 *2 -> cpu fp32i8 -> cpu bf16") == \
            f"cpu fp32{quant} *2 -> cpu fp32{quant} -> cpu bf16{quant}"


@pytest.mark.parametrize("strategy", [None, "cpu fp32i8"])
def test_a_truncated_converted_file_is_named_truncated_by_planner_loader_and_cli(model_path, tmp_path, strategy):
    """A safetensors file cut short (a download or a copy interrupted): its header still reads, but the tensors
    it describes end past the file; the planner, the loader and ``rwkv-chat plan`` (with or without a strategy)
    say so in the same words instead of planning it as if it fit."""
    from rwkv_chat.app.plan import main as plan_main
    from rwkv_chat.models import load_model
    from rwkv_chat.models.errors import CheckpointError
    from rwkv_chat.models.rwkv.convert import convert

    whole = tmp_path / "whole.safetensors"
    convert(model_path("7"), whole, "cpu fp32i8")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as planned:
        plan_memory(cut, "cpu fp32i8", free={})
    with pytest.raises(CheckpointError) as loaded:
        load_model(cut, "cpu fp32i8")
    assert str(planned.value) == str(loaded.value)
    assert "tensor '" in str(planned.value) and str(cut) in str(planned.value)
    argv = [str(cut)] + (["--strategy", strategy] if strategy else [])
    assert plan_main(argv) == 2
    assert plan_memory(whole, "cpu fp32i8", free={}).fits is not False       # the whole file still plans


def test_plan_of_a_file_that_is_no_checkpoint_says_so_as_the_loader_does(tmp_path):
    """The planner's words for a JSON file, or a file of a Qwen folder, are the loader's."""
    from rwkv_chat.models import load_model
    from rwkv_chat.models.errors import CheckpointError

    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "q", safe_serialization=True)
    (tmp_path / "notes.json").write_text('{"a": 1}')
    for path, words in ((tmp_path / "notes.json", "is not a checkpoint"),
                        (tmp_path / "q" / "model.safetensors", "load the folder")):
        with pytest.raises(CheckpointError, match=words) as planned:
            plan_memory(path, "cpu fp32", free={})
        with pytest.raises(CheckpointError) as loaded:
            load_model(path, "cpu fp32")
        assert str(planned.value) == str(loaded.value)


def test_plan_streaming_and_transfers(model_path):
    path = model_path("7")
    m = RWKV(path, "cpu fp16", kernels=False)
    layer = sum(formats.nbytes(v) for k, v in m.layers[5].items() if k.endswith(".weight") and
                isinstance(v, torch.Tensor) and v.dim() == 2 and min(v.shape) == m.n_embd)
    mp = plan_memory(path, "cuda fp16 *4+", free={"cpu": 1 << 40, "cuda": 1 << 40})
    st = mp.stages[0]
    k = m.n_layer - 4                                         # streamed blocks (the head too)
    assert st.resident == 4 and st.streamed == k + 1
    assert st.pinned == k * layer + formats.nbytes(m.head) == st.streamed_per_token
    assert st.buffers == 2 * (layer + formats.nbytes(m.head))
    assert [d.device for d in mp.devices] == ["cpu", "cuda"] and mp.devices[0].pinned == st.pinned
    two = plan_memory(path, "cuda:0 fp16 *6 -> cuda:1 fp16i8", free={})
    (t,) = two.transfers
    assert (t.layer, t.src, t.dst, t.bytes) == (6, "cuda:0", "cuda:1", 2 * m.n_embd * 2)   # x and v_first, fp16
    assert two.fits is None and "fit unknown" in str(two)
    tight = plan_memory(path, "cpu fp32", free={"cpu": 1000})
    assert tight.fits is False and "DOES NOT FIT" in str(tight)
    # weights streamed from pinned host memory move no activations between devices
    assert "Transfers per token: none (every layer runs on cuda)" in str(mp)


def test_a_plan_for_devices_this_machine_lacks_says_so(model_path, monkeypatch):
    """A plan is read from headers and may be for another machine; it names the devices missing here."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mp = plan_memory(model_path("7"), "cuda fp16 *4+", free={"cpu": 1 << 40})
    assert any(n.startswith("cuda: this machine has no CUDA device") and "loading it here is refused" in n
               for n in mp.notes), mp.notes
    assert not plan_memory(model_path("7"), "cpu fp32", free={"cpu": 1 << 40}).notes


def test_plan_reads_safetensors_headers(model_path, tmp_path):
    from safetensors.torch import save_file

    path = model_path("6")
    w = torch.load(path, weights_only=True)
    save_file({k: v.contiguous() for k, v in w.items()}, tmp_path / "m.safetensors")
    hdr = read_header(tmp_path / "m.safetensors")
    assert {k: (tuple(v.shape), v.dtype) for k, v in hdr.items()} == {k: (tuple(v.shape), v.dtype) for k, v in w.items()}
    a = plan_memory(path, "cpu bf16i8", free={})
    b = plan_memory(tmp_path / "m.safetensors", "cpu bf16i8", free={})
    assert a.stages == b.stages


def test_plan_qwen2_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    mp = plan_memory(tmp_path, "cpu fp32 *2 -> cpu bf16", context=100, free={})
    per = [0, 0]
    for name, p in model.named_parameters():
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else (0 if "embed" in name else 3)
        per[0 if i < 2 else 1] += p.numel() * (4 if i < 2 else 2)
    assert [sum(s.weights.values()) for s in mp.stages] == per
    kv = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 100
    assert [s.state for s in mp.stages] == [2 * kv * 4, 1 * kv * 2]
    assert mp.family == "qwen2" and "Qwen2, 3 layers" in str(mp)
    own = plan_memory(tmp_path, "cpu fp32", free={})          # no --context: the folder's own limit
    assert own.context == cfg.max_position_embeddings
    assert sum(s.state for s in own.stages) == cfg.num_hidden_layers * kv * 4 * cfg.max_position_embeddings // 100


@pytest.mark.parametrize("strategy", ["cpu fp32", "cpu fp32i4", "cpu fp32 *2 -> cpu bf16", "cpu bf16 *1 -> cpu fp32"])
def test_plan_of_a_tied_qwen2_equals_a_real_load(tmp_path, strategy):
    """A tied head that the load makes the embedding table itself costs nothing of its own; where it cannot be
    (another dtype), it is counted. Bytes from the loaded model's tensors, the shared table counted once."""
    transformers = pytest.importorskip("transformers")
    from rwkv_chat.models.qwen2.model import Qwen2

    cfg = transformers.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    m = Qwen2(tmp_path, strategy, kernels=False)
    table = m.emb.untyped_storage().data_ptr()
    shared = isinstance(m.head, torch.Tensor) and m.head.untyped_storage().data_ptr() == table
    loaded = formats.nbytes(m.emb) + formats.nbytes(m.norm) + (0 if shared else formats.nbytes(m.head)) + \
        sum(formats.nbytes(v) for layer in m.layers for v in layer.values())
    mp = plan_memory(tmp_path, strategy, free={})
    assert sum(sum(st.weights.values()) for st in mp.stages) == loaded


def test_plan_cli_takes_the_daemons_context_limit(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from rwkv_chat.daemon.config import load_config, save_config
    from rwkv_chat.daemon.paths import get_paths

    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "q", safe_serialization=True)
    monkeypatch.setenv("RWKV_CHAT_HOME", str(tmp_path / "home"))
    r = _cli(tmp_path / "q", "--strategy", "cpu fp32", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["context"] == 2048, r.stderr
    conf = load_config(get_paths().config_file)
    conf.model.context_limit = 300
    get_paths().config_file.parent.mkdir(parents=True, exist_ok=True)
    save_config(conf, get_paths().config_file)
    r = _cli(tmp_path / "q", "--strategy", "cpu fp32", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["context"] == 300, r.stderr


def test_suggest_on_the_cpu(model_path):
    path = model_path("7")
    assert suggest(path, [])[:2] == ["cpu fp32", "cpu bf16"]
    fp16 = plan_memory(path, "cuda:0 fp16", free={}).devices[0].need
    room = {"cpu": 1 << 40, "cuda:0": fp16 - 1}
    got = suggest(path, ["cuda:0"], free=room)
    assert got[0] == "cuda:0 fp16i8" and "cuda:0 fp16" not in got
    assert any(s.startswith("cuda:0 fp16 *") and s.endswith("+") for s in got)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rwkv_chat.app.cli", "plan", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_plan_cli(model_path, tmp_path, capsys):
    from rwkv_chat.app.plan import main

    path = model_path("5.2")
    r = _cli(path, "--strategy", "cpu fp32 *2 -> cpu bf16")
    assert r.returncode == 0, r.stderr
    mp = plan_memory(path, "cpu fp32 *2 -> cpu bf16", free={})
    assert "Strategy: cpu fp32 *2 -> cpu bf16" in r.stdout and mp.describe in r.stdout
    for bad, why in [((path, "--strategy", "cpu fp64"), "unknown dtype 'fp64'"),
                     ((tmp_path / "nope.pth", "--strategy", "cpu fp32"), "checkpoint not found"),
                     ((tmp_path / "nope.pth",), "checkpoint not found")]:      # named before any strategy
        r = _cli(*bad)
        assert r.returncode == 2 and why in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    # the same entry point in this process for the other mistakes
    for bad, why in [((path, "--strategy", "cuda:0 fp16 *2+ -> cuda:1 fp16 *1+"), "more than one stream stage"),
                     ((tmp_path, "--strategy", "cpu fp32"), "without config.json"),
                     ((path, "--strategy", "cpu fp32 *99 -> cpu bf16"), "gets no layers")]:
        assert main([str(a) for a in bad]) == 2
        err = capsys.readouterr().err
        assert why in err and len(err.strip().splitlines()) == 1
    for flag, value in (("--conversations", "0"), ("--context", "-3")):
        with pytest.raises(SystemExit):
            main([str(path), "--strategy", "cpu fp32", flag, value])
        assert f"{flag} must be 1 or more, got {value}" in capsys.readouterr().err
    assert main([str(path), "--suggest"]) == 0
    assert "cpu fp32" in capsys.readouterr().out.splitlines()
