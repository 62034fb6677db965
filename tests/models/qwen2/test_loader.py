"""Reading Qwen checkpoint folders: bad folders give a CheckpointError naming the file and the key; the strategy
grammar (``*N`` placement, ``i8``) applies unchanged; ``load_model`` recognises the folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rwkv_chat.models.errors import CheckpointError, StrategyError
from rwkv_chat.models.qwen2.model import Qwen2


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite(folder, change):
    path = folder / "model.safetensors"
    w = load_file(str(path))
    change(w)
    save_file(w, str(path), metadata={"format": "pt"})
    return path


def test_missing_key_names_file_and_key(qwen_folders, tmp_path):
    folder = copy(qwen_folders["tied"][0], tmp_path / "m")
    rewrite(folder, lambda w: w.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"m: key 'model\.layers\.1\.self_attn\.k_proj\.bias' is missing"):
        Qwen2(folder, "cpu fp32", kernels=False)


def test_bad_shape_names_file_and_key(qwen_folders, tmp_path):
    folder = copy(qwen_folders["untied"][0], tmp_path / "m")

    def bad(w):
        w["lm_head.weight"] = w["lm_head.weight"][:-1].clone()
    path = rewrite(folder, bad)
    with pytest.raises(CheckpointError) as e:
        Qwen2(folder, "cpu fp32", kernels=False)
    assert str(path) in str(e.value) and "'lm_head.weight'" in str(e.value) and "shape" in str(e.value)


def test_truncated_shard_names_file_and_key(qwen_folders, tmp_path):
    folder = copy(qwen_folders["sharded"][0], tmp_path / "m")
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        Qwen2(folder, "cpu fp32", kernels=False)
    assert str(shard) in str(e.value) and "tensor '" in str(e.value)


def test_config_problems_name_file_and_key(qwen_folders, tmp_path):
    folder = copy(qwen_folders["tied"][0], tmp_path / "m")
    cfg_path = folder / "config.json"
    good = json.loads(cfg_path.read_text())
    for change, key in ((lambda c: c.pop("num_hidden_layers"), "num_hidden_layers"),
                        (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads"),
                        (lambda c: c.update(hidden_size="64"), "hidden_size"),
                        (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
                        (lambda c: c.update(architectures=["LlamaForCausalLM"]), "architectures")):
        c = dict(good)
        change(c)
        cfg_path.write_text(json.dumps(c))
        with pytest.raises(CheckpointError, match=f"config.json: key '{key}'"):
            Qwen2(folder, "cpu fp32", kernels=False)
    for quant, match in (({"quant_method": "awq", "bits": 4}, "quantization_config.*'awq'"),
                         ({"quant_method": "gptq", "bits": 8}, "config.json: quantization_config.bits = 8"),
                         ({"quant_method": "gptq", "bits": 4, "group_size": 32}, "q_proj.qweight' is missing")):
        cfg_path.write_text(json.dumps(dict(good, quantization_config=quant)))
        with pytest.raises(CheckpointError, match=match):
            Qwen2(folder, "cpu fp32i4", kernels=False)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: not found"):
        Qwen2(folder, "cpu fp32", kernels=False)


def test_unknown_key_is_refused(qwen_folders, tmp_path):
    folder = copy(qwen_folders["tied"][0], tmp_path / "m")
    rewrite(folder, lambda w: w.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected key 'model.layers.0.mlp.extra.weight'"):
        Qwen2(folder, "cpu fp32", kernels=False)


def test_layer_placement_equals_one_stage(qwen_folders):
    folder = qwen_folders["tied"][0]
    one = Qwen2(folder, "cpu fp32", kernels=False)
    two = Qwen2(folder, "cpu fp32 *1 -> cpu fp32", kernels=False)
    assert [p.stage for p in two.plan.layers] == [0, 1, 1, 1]
    ids = list(range(20, 45))
    a, sa = one.forward(ids, None, full_output=True)
    b, sb = two.forward(ids, None, full_output=True)
    assert torch.equal(a, b)
    assert torch.equal(one.forward([3], sa)[0], two.forward([3], sb)[0])
    with pytest.raises(StrategyError):
        Qwen2(folder, "cpu fp32 *9 -> cpu fp32", kernels=False)


def test_i8_runs_and_mostly_agrees(qwen_folders):
    folder = qwen_folders["untied"][0]
    ref = Qwen2(folder, "cpu fp32", kernels=False)
    q8 = Qwen2(folder, "cpu fp32i8", kernels=False)
    assert "uint8" in str(q8.plan)
    ids = torch.randint(0, 320, (64,), generator=torch.Generator().manual_seed(2)).tolist()
    a = ref.forward(ids, None, full_output=True)[0]
    b = q8.forward(ids, None, full_output=True)[0]
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(f"i8 vs fp32 top-1 agreement: {agree:.3f}")
    assert torch.isfinite(b).all() and agree >= 0.5
    dec = q8.decoder(2)
    h = dec.add(q8.forward(ids[:5], None)[1])
    assert torch.allclose(dec.step({h: ids[5]})[h], q8.forward(ids[:6], None)[0], atol=1e-4, rtol=0)


def test_load_model_recognises_a_qwen_folder(tmp_path, shared_dir):
    from rwkv_chat.models import load_model

    from .conftest import build

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(empty, "cpu fp32")
    (empty / "config.json").write_text("{bad")                      # the file is there: say what is wrong with it
    with pytest.raises(CheckpointError, match="config.json: cannot read it as JSON"):
        load_model(empty, "cpu fp32")
    (empty / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="'architectures' is \\['LlamaForCausalLM'\\]; served: Qwen2ForCausalLM"):
        load_model(empty, "cpu fp32")
    folder = tmp_path / "m"         # the real Qwen vocabulary on a one-layer model
    build("qwen2", seed=7, vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shared_dir / "tokenizers" / "qwen" / name, folder / name)
    model = load_model(folder, "cpu fp32", kernels=False, context_limit=100)
    assert model.family == "qwen2" and model.context_limit == 100
    ids = model.tokenizer.encode("Hello, 世界")
    logits, state = model.forward(ids, None)
    assert logits.shape == (151936,) and state.tokens[0].tolist() == ids
    for part in ("model.safetensors", "config.json"):    # a file of the folder: the folder is what loads
        with pytest.raises(CheckpointError, match=f"{part} is a file of the Hugging Face folder .*: load the folder"):
            load_model(folder / part, "cpu fp32")
