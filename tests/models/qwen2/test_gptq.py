"""Pre-quantized GPTQ Qwen2 folders: a folder made from a tiny random Qwen2 by the reference GPTQ formula below
(AutoGPTQ "v1": asymmetric round-to-nearest per group of input rows, stored zero = z - 1, 4-bit values packed
eight per int32, low nibble first: ``qweight`` along the input, ``qzeros`` along the output) loads directly and
gives the logits of ``transformers`` running the same model with each Linear replaced by its dequantized matrix
(plain torch from the same quantized values)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from rwkv_chat.models.errors import CheckpointError, StrategyError
from rwkv_chat.models.plan import plan_memory
from rwkv_chat.models.qwen2.model import Qwen2

from .conftest import build

GROUP = 32


def pack(q: torch.Tensor, dim: int) -> torch.Tensor:
    """Values 0..15 packed eight per int32 along ``dim`` (0 or 1), low nibble first, wrapped to int32."""
    q = q.to(torch.int64) if dim == 0 else q.t().to(torch.int64)
    words = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64)
    for j in range(8):
        words |= q[j::8] << (4 * j)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words if dim == 0 else words.t().contiguous()


def gptq_quantize(w: torch.Tensor, g_idx: torch.Tensor):
    """An nn.Linear weight [N, K] -> (qweight, qzeros, scales, the dequantized [N, K]) by the reference formula:
    per group g (rows k with g_idx[k] == g) and output n: scale = (max - min) / 15 over the range widened to 0,
    z = round(-min / scale), q = clamp(round(w / scale) + z, 0, 15); stored zero z - 1; w' = (q - z) * scale."""
    wt = w.t().float()                                               # [K, N]
    K, N = wt.shape
    G = int(g_idx.max()) + 1
    scales, zeros = torch.zeros(G, N), torch.zeros(G, N)
    for g in range(G):
        rows = wt[g_idx == g]
        lo, hi = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8).half().float()
        scales[g], zeros[g] = s, torch.round(-lo / s).clamp(0, 15)
    q = torch.clamp(torch.round(wt / scales[g_idx]) + zeros[g_idx], 0, 15)
    deq = ((q - zeros[g_idx]) * scales[g_idx]).t()
    return pack(q, 0), pack((zeros.to(torch.int64) - 1) & 15, 1), scales.half(), deq


def make_gptq_folder(path, desc_act: bool, head: bool, seed: int = 4):
    """(folder, the transformers model with the dequantized matrices) for a random untied Qwen2."""
    hf = build("qwen2", seed=seed, tie_word_embeddings=False)
    hf.save_pretrained(path)
    tensors = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if not isinstance(mod, torch.nn.Linear) or (name == "lm_head" and not head):
                continue
            K = mod.weight.shape[1]
            g_idx = torch.arange(K) // GROUP
            if desc_act:                                             # act-order: groups over a permutation of rows
                g_idx = g_idx[torch.argsort(torch.randperm(K, generator=gen))]
            qweight, qzeros, scales, deq = gptq_quantize(mod.weight, g_idx)
            del tensors[f"{name}.weight"]
            tensors.update({f"{name}.qweight": qweight, f"{name}.qzeros": qzeros, f"{name}.scales": scales,
                            f"{name}.g_idx": g_idx.to(torch.int32)})
            mod.weight.copy_(deq)
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": desc_act,
                                  "sym": False, "lm_head": head}
    (path / "config.json").write_text(json.dumps(cfg))
    return path, hf


@pytest.mark.parametrize("desc_act, head", [(False, False), (True, True)])
def test_gptq_folder_gives_the_logits_of_its_dequantized_matrices(desc_act, head, tmp_path):
    folder, ref = make_gptq_folder(tmp_path, desc_act, head)
    model = Qwen2(folder, "cpu fp32i4", kernels=False)
    assert model.plan.head.quant == ("i4" if head else None)
    assert ("head in float32" in str(model.plan)) != head
    ids = torch.randint(0, 320, (48,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got, state = model.forward(ids, None, full_output=True)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())
    nxt, _ = model.forward(ids[-1:], model.forward(ids[:-1], None)[1])   # the decode path agrees too
    assert torch.allclose(nxt, want[-1], atol=1e-4, rtol=0)


def test_gptq_folder_needs_i4_stages_and_a_served_config(tmp_path):
    folder, _ = make_gptq_folder(tmp_path, False, False)
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    dry = plan_memory(folder, "cpu fp32i4", free={})                 # the dry run counts the parts as stored
    assert "GPTQ 4-bit" in dry.describe and 0 < dry.stages[0].weights["i4"] < stored
    with pytest.raises(StrategyError, match=r"stage 'cpu fp32 \*1'.*'cpu fp32i4 \*1 -> cpu bf16i4'"):
        Qwen2(folder, "cpu fp32 *1 -> cpu bf16i4", kernels=False)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, match in (({"bits": 8}, "quantization_config.bits = 8"),
                          ({"checkpoint_format": "marlin"}, "quantization_config.checkpoint_format"),
                          ({"group_size": 48}, "group_size 48")):
        cfg_path.write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **change}}))
        with pytest.raises(CheckpointError, match=match):
            Qwen2(folder, "cpu fp32i4", kernels=False)


@pytest.mark.parametrize("head", [False, True])
def test_the_planner_plans_and_suggests_only_what_a_gptq_folder_loads_as(tmp_path, head):
    """The memory planner refuses a strategy the loader refuses (in the loader's words), and suggests only i4
    strategies (each of which loads)."""
    from rwkv_chat.models.plan import suggest

    folder, _ = make_gptq_folder(tmp_path, False, head)
    for bad in ("cpu fp32", "cpu fp32i8 *1 -> cpu bf16i4"):
        with pytest.raises(StrategyError) as loaded:
            Qwen2(folder, bad, kernels=False)
        with pytest.raises(StrategyError) as planned:
            plan_memory(folder, bad, free={})
        assert str(planned.value) == str(loaded.value)
    assert suggest(folder, []) == ["cpu fp32i4", "cpu bf16i4"]
    for strategy in suggest(folder, []):
        assert Qwen2(folder, strategy, kernels=False).plan.strategy == strategy
    room = {"cpu": 1 << 40, "cuda:0": 1 << 40}
    assert suggest(folder, ["cuda:0"], free=room)[0] == "cuda:0 fp16i4"
    assert plan_memory(folder, "cpu fp32i4", free={}).plan.layers[-1].quant == ("i4" if head else None)


def test_convert_writes_a_gptq_folder_that_loads_without_quantizing(tmp_path):
    """``rwkv-chat convert`` of a float folder: a GPTQ folder (group 128: every width of this model is 128 or 256)
    whose load gives exactly the logits of quantizing the float folder at load, the float head kept."""
    hf = build("qwen2", seed=6, tie_word_embeddings=False, hidden_size=128, intermediate_size=256)
    src = tmp_path / "float"
    hf.save_pretrained(src)
    out = tmp_path / "gptq"
    cli = [sys.executable, "-m", "rwkv_chat.app.cli", "convert", str(src), "-o", str(out)]
    done = subprocess.run([*cli, "--strategy", "cpu fp32i4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Qwen2" in done.stderr and "21 i4" in done.stderr                 # 3 layers x 7 Linears
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": False,
                     "checkpoint_format": "gptq"}
    ids = list(range(7, 47))
    pre = Qwen2(out, "cpu fp32i4", kernels=False)
    at_load = Qwen2(src, "cpu fp32i4", kernels=False)
    assert torch.equal(pre.forward(ids, None, full_output=True)[0], at_load.forward(ids, None, full_output=True)[0])
    assert (out / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    for strategy, match in (("cpu fp32i8", "every stage must be i4"), (None, "give --strategy with i4 stages")):
        bad = subprocess.run([*cli[:-1], str(tmp_path / "x")] + (["--strategy", strategy] if strategy else []),
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and match in bad.stderr, bad.stderr


def test_convert_refuses_an_output_that_is_a_file_or_a_full_folder(tmp_path):
    """A GPTQ output is a folder: a file there, or a folder with files, is refused in words that say which."""
    from rwkv_chat.models.qwen2.convert import convert

    src = tmp_path / "float"
    build("qwen2", seed=7).save_pretrained(src)
    (tmp_path / "file.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"file\.safetensors is a file: .*GPTQ folder"):
        convert(src, tmp_path / "file.safetensors", "cpu fp32i4")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("a")
    with pytest.raises(CheckpointError, match="full exists and is not an empty folder"):
        convert(src, tmp_path / "full", "cpu fp32i4")
    with pytest.raises(CheckpointError, match=r"new\.safetensors: a Qwen2 folder converts to a GPTQ folder, not a "
                                              r"\.safetensors file"):
        convert(src, tmp_path / "new.safetensors", "cpu fp32i4")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(src, tmp_path / "no" / "gptq", "cpu fp32i4")
    assert not (tmp_path / "new.safetensors").exists() and not (tmp_path / "no").exists()
