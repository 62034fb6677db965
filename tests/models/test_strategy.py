"""Strategy grammar and layer placement, checked against the reference ``rwkv`` package 0.8.32.

The reference runs in one long-lived subprocess (``RWKV_JIT_ON=0``, ``RWKV_CUDA_ON=0``) that builds
``rwkv.model.RWKV(model, strategy, verbose=True)`` on request and returns what it printed. It prints its
placement ("* cuda [float16, uint8], store 2 layers" and "0-cuda-float16-uint8 1-...") before it moves
weights, so strategies naming CUDA/MPS are read even though construction then fails on this CPU machine.
Other ``n_layer`` values come from small random checkpoints with the v4 key layout.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rwkv_chat.models.errors import DeviceError, StrategyError
from rwkv_chat.models.strategy import (
    LayerPlacement, Plan, Stage, parse_strategy, plan_layers, rescale_layer_for, torch_device,
)

# Two speed-ups that leave the reference's placement untouched: gc.collect (0.1 s a call, once per layer
# on CPU) becomes a no-op, and each checkpoint is unpickled once (the reference gets a fresh dict copy;
# it replaces entries, it does not modify tensors in place).
RUNNER = r"""
import contextlib, io, json, sys
import rwkv.model, torch
from rwkv.model import RWKV
rwkv.model.gc.collect = lambda *a: 0
_load, _cache = torch.load, {}
def cached_load(path, *a, **k):
    if path not in _cache:
        _cache[path] = _load(path, *a, **k)
    return dict(_cache[path])
rwkv.model.torch.load = cached_load
for line in sys.stdin:
    req = json.loads(line)
    buf, err = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(buf):
            RWKV(model=req["model"], strategy=req["strategy"], verbose=True)
    except Exception as e:
        err = f"{type(e).__name__}: {e}"
    sys.stdout.write(json.dumps({"out": buf.getvalue(), "error": err}) + "\n")
    sys.stdout.flush()
"""
# "* cuda [float16, uint8], store 2 layers, stream 3 layers"; a stage after the reference's early `break` keeps
# its unconverted dtype text: "* cpu fp32, store 0 layers".
STAGE_LINE = re.compile(r"^\* (\S+) (?:\[(\w+), (\w+)\]|\S+), store (\d+) layers(?:, stream (\d+) layers)?$", re.M)


class Reference:
    """What the reference printed for one (model, strategy)."""

    def __init__(self, out: str, error: str | None):
        self.out, self.error = out, error
        self.stages = [(d, a, w, int(n), int(s) if s else None) for d, a, w, n, s in STAGE_LINE.findall(out)]
        self.layers = next((ln.strip() for ln in out.splitlines() if ln.startswith("0-")), None)
        m = re.search(r"RESCALE_LAYER (\d+)", out)
        self.rescale = int(m.group(1)) if m else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    env = dict(os.environ, RWKV_JIT_ON="0", RWKV_CUDA_ON="0")
    env.pop("RWKV_V7_ON", None)
    log = open(tmp_path_factory.mktemp("ref") / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log, text=True, env=env)

    def ask(model, strategy: str) -> Reference:
        proc.stdin.write(json.dumps({"model": str(model), "strategy": strategy}) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            log.seek(0)
            pytest.fail(f"reference process died:\n{log.read()[-3000:]}")
        r = json.loads(line)
        return Reference(r["out"], r["error"])

    yield ask
    proc.stdin.close()
    proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def fake_model(tmp_path_factory):
    """``fake_model(n_layer)`` -> path of a random v4 checkpoint (C=8, vocab 16) with n_layer blocks."""
    root, made = tmp_path_factory.mktemp("fake"), {}

    def get(n_layer: int):
        if n_layer not in made:
            g = torch.Generator().manual_seed(n_layer)
            r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
            w = {"emb.weight": r(16, 8), "blocks.0.ln0.weight": r(8), "blocks.0.ln0.bias": r(8),
                 "ln_out.weight": r(8), "ln_out.bias": r(8), "head.weight": r(16, 8)}
            for i in range(n_layer):
                p = f"blocks.{i}."
                for k in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.time_decay", "att.time_first"):
                    w[p + k] = r(8)
                for k in ("att.time_mix_k", "att.time_mix_v", "att.time_mix_r", "ffn.time_mix_k", "ffn.time_mix_r"):
                    w[p + k] = r(1, 1, 8)
                for k in ("att.key", "att.value", "att.receptance", "att.output", "ffn.receptance"):
                    w[p + k + ".weight"] = r(8, 8)
                w[p + "ffn.key.weight"], w[p + "ffn.value.weight"] = r(32, 8), r(8, 32)
            made[n_layer] = root / f"fake-{n_layer}.pth"
            torch.save(w, made[n_layer])
        return made[n_layer]

    return get


def check_against_reference(ref: Reference, strategy: str, n_layer: int) -> str:
    """Compare our plan with the reference's printout; returns "same" or "trap"."""
    assert ref.stages, f"reference printed no plan for {strategy!r}: {ref.error}\n{ref.out}"
    try:
        plan = plan_layers(strategy, n_layer)
    except StrategyError as e:
        # Ours refuses: the reference must show the trap, a stage without layers, the first one we name.
        empty = [i for i, s in enumerate(ref.stages) if s[3] + (s[4] or 0) == 0]
        assert empty, f"we reject {strategy!r} ({e}) but the reference places it: {ref.stages}"
        assert "gets no layers" in str(e)
        assert repr(str(parse_strategy(strategy)[empty[0]])) in str(e)
        return "trap"
    assert ref.layers == " ".join(str(p) for p in plan.layers), strategy
    for (dev, atype, wtype, store, stream), d in zip(ref.stages, plan.describe(), strict=True):
        assert (dev, atype, wtype) == (d["device"], d["atype"], d["wtype"])
        assert store == d["resident"] and (stream or 0) == d["streamed"], (strategy, ref.stages, d)
    assert ref.rescale == rescale_layer_for(strategy)
    return "same"


# ---------------------------------------------------------------------------------------------- grammar

VALID = [  # text, normalized, first stage (device, dtype, quant, count, stream)
    ("cpu fp32", "cpu fp32", ("cpu", torch.float32, None, None, False)),
    ("cuda fp16", "cuda fp16", ("cuda", torch.float16, None, None, False)),
    ("cuda:1 bf16", "cuda:1 bf16", ("cuda:1", torch.bfloat16, None, None, False)),
    ("mps fp32", "mps fp32", ("mps", torch.float32, None, None, False)),
    ("dml fp16", "dml fp16", ("dml", torch.float16, None, None, False)),
    ("cuda fp16i8", "cuda fp16i8", ("cuda", torch.float16, "i8", None, False)),
    ("cpu bf16i8 *3", "cpu bf16i8 *3", ("cpu", torch.bfloat16, "i8", 3, False)),
    ("cuda fp16i8 *10+", "cuda fp16i8 *10+", ("cuda", torch.float16, "i8", 10, True)),
    ("cuda fp16i8 *0+ -> cpu fp32 *1", "cuda fp16i8 *0+ -> cpu fp32 *1", ("cuda", torch.float16, "i8", 0, True)),
    ("  cuda fp16 *2 ->cpu fp32  ", "cuda fp16 *2 -> cpu fp32", ("cuda", torch.float16, None, 2, False)),
    ("cuda:0 fp16 *3->cuda:1 fp16i8 *5 ->  cpu fp32", "cuda:0 fp16 *3 -> cuda:1 fp16i8 *5 -> cpu fp32",
     ("cuda:0", torch.float16, None, 3, False)),
    ("cpu fp32\n", "cpu fp32", ("cpu", torch.float32, None, None, False)),
]

INVALID = [  # text, quoted bad part, does the reference reject it too?
    ("", "''", True),
    ("   ", "'   '", True),
    ("gpu fp16", "'gpu'", True),
    ("cuda:x fp16", "'cuda:x'", True),
    ("cpu:0 fp32", "'cpu:0'", True),
    ("CUDA fp16", "'CUDA'", True),
    ("cuda", "'cuda'", True),
    ("cuda fp64", "'fp64'", True),
    ("cuda fp16i4x", "'i4x'", True),
    ("cuda fp16i3 *2 -> cpu fp32", "'i3'", False),
    ("cuda fp16q8", "'q8'", True),
    ("cuda fp16 *x", "'*x'", True),
    ("cuda fp16 *-1", "'*-1'", True),
    ("cuda fp16 *3++", "'*3++'", True),
    ("cuda fp16 * 3", "'* 3'", True),
    ("cuda fp16 *3 extra", "'extra'", True),
    ("cpu fp32 ->", "'cpu fp32 ->'", True),
    ("-> cpu fp32", "'-> cpu fp32'", False),
    ("cpu fp32 -> -> cpu fp32", "'cpu fp32 -> -> cpu fp32'", True),
    ("cuda fp16 > cpu fp32", "'> cpu fp32'", True),
    ("cpu fp32 *0", "'*0'", False),
    ("cpu fp32 *1+", "'cpu fp32 *1+'", False),
    ("cuda fp16 *1+ -> cuda:1 fp16 *2+", "'cuda fp16 *1+', 'cuda:1 fp16 *2+'", False),
]


@pytest.mark.parametrize("text,normalized,first", VALID)
def test_valid_strategies_parse_like_the_reference(text, normalized, first, reference, fake_model):
    stages = parse_strategy(text)
    s = stages[0]
    assert (s.device, s.dtype, s.quant, s.count, s.stream) == first
    assert s.wtype == {"i8": torch.uint8, "i4": torch.int32, "f8": torch.float8_e4m3fn}.get(s.quant, s.dtype)
    assert " -> ".join(map(str, stages)) == normalized
    if "dml" not in text:  # the reference needs torch_directml for dml
        ref = reference(fake_model(6), text)
        assert "Invalid strategy" not in (ref.error or ""), ref.error
        assert ref.layers is not None


@pytest.mark.parametrize("text,bad,ref_rejects", INVALID)
def test_invalid_strategies_raise_and_quote(text, bad, ref_rejects, reference, fake_model):
    with pytest.raises(StrategyError) as info:
        plan_layers(text, 6)
    assert isinstance(info.value, ValueError)
    assert bad in str(info.value), str(info.value)
    ref = reference(fake_model(6), text)
    assert ("Invalid strategy" in (ref.error or "")) == ref_rejects, (text, ref.error)


def test_whitespace_beyond_the_reference_is_tolerated():
    assert parse_strategy("\tcuda   fp16i8\t*4 ->cpu  fp32 ") == parse_strategy("cuda fp16i8 *4 -> cpu fp32")
    assert parse_strategy("cuda:01 fp16")[0].device == "cuda:1"


def test_stage_validates_its_fields():
    assert Stage("cpu", torch.float32).wtype == torch.float32
    assert Stage("cuda", torch.float16, "i8").wtype == torch.uint8
    for bad in [dict(device="tpu", dtype=torch.float32), dict(device="cpu", dtype=torch.float64),
                dict(device="cpu", dtype=torch.float32, quant="i3"),
                dict(device="cpu", dtype=torch.float32, count=-1),
                dict(device="cuda", dtype=torch.float32, stream=True)]:
        with pytest.raises(StrategyError):
            Stage(**bad)


# ----------------------------------------------------------------------------- placement vs reference

CUDA_STRATEGIES = [
    "cuda fp16", "cuda fp16i8", "cuda bf16", "cuda fp32 -> cpu fp32", "cuda fp16 *1 -> cpu fp32",
    "cuda fp16 *2 -> cpu fp32 *1", "cuda fp16i8 *2+", "cuda fp16i8 *0+ -> cpu fp32 *1",
    "cpu fp32 *1 -> cuda fp16 *1+", "cuda fp16 -> cuda:1 fp16 -> cpu fp32", "cpu fp32 -> cuda fp16i8 *2 -> mps fp32",
    "cuda:0 fp16 *1 -> cuda:1 fp16i8 *1 -> cpu fp32", "cuda fp16 *100", "cuda fp16 *3 -> cpu fp32 -> cuda:1 bf16",
    "mps fp16 *2+ -> cpu fp32 *2", "cuda fp16 -> cpu fp32 -> cuda:1 fp16 -> cpu bf16",
]
TRAPS = ["cuda fp16 *2+ -> cpu fp32", "cpu fp32 -> cuda fp16 *1+", "cuda fp16 *100 -> cpu fp32",
         "cuda fp16 *3 -> cpu fp32 *200 -> cuda:1 fp16", "cpu fp32 -> cuda fp16 *400"]


@pytest.mark.parametrize("name", ["4", "5", "5.2", "6"])
def test_plans_match_reference_on_tiny_models(name, model_path, reference):
    n_layer = 4 if name == "4" else 12
    outcomes = [check_against_reference(reference(model_path(name), s), s, n_layer)
                for s in CUDA_STRATEGIES + TRAPS]
    assert outcomes[-len(TRAPS):] == ["trap"] * len(TRAPS)


@pytest.mark.parametrize("n_layer", [1, 2, 3, 5, 8, 13, 24, 32])
def test_plans_match_reference_for_many_depths(n_layer, fake_model, reference):
    path = fake_model(n_layer)
    more = ["cpu fp32", "cpu fp32 -> cpu bf16", "cpu fp32 *2 -> cpu fp32 -> cpu bf16i8",
            "cuda fp16 -> cpu fp32 -> cuda fp16 -> cpu fp32 -> cuda fp16", "cuda fp16i8 *7+ -> cpu fp32 *2"]
    outcomes = {s: check_against_reference(reference(path, s), s, n_layer) for s in CUDA_STRATEGIES + TRAPS + more}
    assert all(outcomes[s] == "trap" for s in TRAPS)


def _stage_text(device, dtype, quant, count):
    return f"{device} {dtype}{quant}" + ("" if count is None else f" *{count}")


plain_stage = st.builds(_stage_text, st.sampled_from(["cpu", "cuda", "cuda:1", "mps"]),
                        st.sampled_from(["fp16", "fp32", "bf16"]), st.sampled_from(["", "i8"]),
                        st.one_of(st.none(), st.integers(1, 14)))
stream_stage = st.builds(lambda d, t, q, n: _stage_text(d, t, q, n) + "+", st.sampled_from(["cuda", "cuda:1", "mps"]),
                         st.sampled_from(["fp16", "fp32", "bf16"]), st.sampled_from(["", "i8"]), st.integers(0, 14))


@st.composite
def strategies(draw):
    stages = draw(st.lists(plain_stage, min_size=1, max_size=4))
    if draw(st.booleans()):
        stages.insert(draw(st.integers(0, len(stages))), draw(stream_stage))
    arrows = [draw(st.sampled_from(["->", " -> ", "  ->", "-> "])) for _ in stages[1:]]
    text = stages[0] + "".join(a + s for a, s in zip(arrows, stages[1:]))
    return draw(st.sampled_from(["", " "])) + text + draw(st.sampled_from(["", "  "]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(strategy=strategies(), n_layer=st.integers(1, 30))
def test_random_strategies_match_reference(strategy, n_layer, fake_model, reference):
    check_against_reference(reference(fake_model(n_layer), strategy), strategy, n_layer)


# --------------------------------------------------------------- the reference's silent traps, shown


def test_reference_ignores_i4_which_we_quantize(reference, fake_model):
    ref = reference(fake_model(4), "cuda fp16i4")
    assert ref.layers.split()[0] == "0-cuda-float16-float16"  # no quantization happened
    plan = plan_layers("cuda fp16i4", 4)
    assert str(plan.layers[0]) == "0-cuda-float16-i4" and plan.layers[0].quant == "i4"
    with pytest.raises(StrategyError, match="'i3'.*not supported"):
        parse_strategy("cuda fp16i3")


def test_reference_streams_only_to_the_last_stream_stage(reference, fake_model):
    ref = reference(fake_model(8), "cuda fp16 *1+ -> cuda:1 fp16 *2+")
    assert [s[4] is not None for s in ref.stages] == [False, True]
    with pytest.raises(StrategyError, match="more than one stream stage"):
        parse_strategy("cuda fp16 *1+ -> cuda:1 fp16 *2+")


def test_reference_mishandles_star_zero(reference, fake_model):
    ref = reference(fake_model(4), "cuda fp16 *0 -> cpu fp32")
    assert ref.error.startswith("ZeroDivisionError") and ref.layers is None
    ref = reference(fake_model(4), "cpu fp32 -> cuda fp16 *0")
    assert ref.error.startswith("ZeroDivisionError") and ref.layers is None
    ref = reference(fake_model(4), "cuda fp16 *2 -> cpu fp32 *0")
    assert ref.stages[-1][3] == 3  # ... or the '*0' stage silently takes the remainder
    ref = reference(fake_model(4), "cpu fp32 *0")
    assert ref.stages[-1][3] == 5
    for text in ("cuda fp16 *0 -> cpu fp32", "cpu fp32 -> cuda fp16 *0", "cuda fp16 *2 -> cpu fp32 *0", "cpu fp32 *0"):
        with pytest.raises(StrategyError, match=r"'\*0'"):
            parse_strategy(text)


# ------------------------------------------------------------------------------------------ Plan API


def test_plan_api():
    plan = plan_layers(" cuda fp16i8 *2+ ->cpu fp32 *1", 4)
    assert isinstance(plan, Plan) and plan.strategy == "cuda fp16i8 *2+ -> cpu fp32 *1"
    assert plan.n_layer == 4 and len(plan.layers) == 5 and plan.head is plan.layers[-1]
    assert all(isinstance(p, LayerPlacement) and p.index == i for i, p in enumerate(plan.layers))
    assert plan.devices == ("cuda", "cpu")
    assert [p.stage for p in plan.layers] == sorted(p.stage for p in plan.layers)
    desc = plan.describe()
    assert json.loads(json.dumps(desc)) == desc
    assert [(d["first"], d["last"], d["resident"] + d["streamed"]) for d in desc] == [(0, 3, 4), (4, 4, 1)]
    assert desc[-1]["head"] and not desc[0]["head"]
    text = str(plan)
    assert "(total 4+1=5 layers)" in text
    assert "* cuda fp16i8, store 2 layers, stream 2 layers" in text and "* cpu fp32, store 1 layers" in text
    assert " ".join(str(p) for p in plan.layers) in text
    assert plan_layers(parse_strategy("cuda fp16 -> cpu fp32"), 7) == plan_layers("cuda fp16 -> cpu fp32", 7)
    assert plan_layers("cuda:0 fp16 -> cuda:1 fp16", 3).devices == ("cuda:0", "cuda:1")


@pytest.mark.parametrize("n_layer", [0, -1, 2.0, True])
def test_plan_needs_a_positive_layer_count(n_layer):
    with pytest.raises(StrategyError, match="n_layer"):
        plan_layers("cpu fp32", n_layer)


def test_rescale_layer():
    assert rescale_layer_for("cuda fp16i8 -> cpu fp32") == rescale_layer_for(parse_strategy("cuda fp16")) != 0
    assert rescale_layer_for("cpu fp32 -> cuda bf16i8") == 0  # equality with the reference: placement tests


# ------------------------------------------------------------------------------------------ devices


def test_torch_device_cpu():
    assert torch_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_torch_device_without_cuda(name):
    with pytest.raises(DeviceError, match="CUDA is not available") as info:
        torch_device(name)
    assert repr(name) in str(info.value) and torch.__version__ in str(info.value)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the error of a machine without MPS")
def test_torch_device_without_mps():
    with pytest.raises(DeviceError, match="MPS is not available"):
        torch_device("mps")


def test_torch_device_without_directml():
    try:
        import torch_directml  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceError, match="torch-directml is not installed"):
            torch_device("dml")
    else:
        pytest.skip("torch-directml is installed here")


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cpu:0", "", "CUDA"])
def test_torch_device_unknown(name):
    with pytest.raises(DeviceError, match="unknown device"):
        torch_device(name)
