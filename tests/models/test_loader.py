"""Checkpoint loading: formats, version detection, and clear typed errors for bad files."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from rwkv_chat.models import RWKV, CheckpointError, DeviceError, StrategyError
from rwkv_chat.models.rwkv.checkpoint import detect_version, inspect, read_checkpoint


@pytest.fixture(scope="module")
def weights(model_path):
    return torch.load(model_path("5.2"), map_location="cpu", weights_only=True)


def _save(tmp_path, w, name="m.pth"):
    p = tmp_path / name
    torch.save(w, p)
    return p


def test_safetensors_equals_pth(model_path, tmp_path):
    from safetensors.torch import save_file

    for v in ("4", "7"):
        w = torch.load(model_path(v), map_location="cpu", weights_only=True)
        st = tmp_path / f"m{v}.safetensors"
        save_file({k: t.contiguous() for k, t in w.items()}, st)
        a, b = RWKV(model_path(v), "cpu fp32"), RWKV(st, "cpu fp32")
        assert a.fingerprint == b.fingerprint
        assert torch.equal(a.forward([1, 2, 3], None)[0], b.forward([1, 2, 3], None)[0])


def test_path_without_suffix_like_reference(model_path):
    m = RWKV(str(model_path("6"))[:-4], "cpu fp32")
    assert m.version == "6"


@pytest.mark.parametrize("version", ["4", "5", "5.2", "6", "7"])
def test_detect_version(model_path, version):
    w = torch.load(model_path(version), map_location="cpu", weights_only=True)
    assert detect_version(w) == version


def test_detect_5_1_and_deep_embed_and_time_state(weights):
    w = dict(weights)
    w["blocks.0.att.time_decay"] = torch.zeros(8)  # 1-D decay with a gate: 5.1
    assert detect_version(w) == "5.1"
    w = dict(weights)
    for i in range(4):
        w[f"blocks.{i}.att.time_state"] = torch.zeros(8, 8, 8)
    assert inspect(w).time_state


def test_time_state_is_the_initial_state(weights, tmp_path):
    w = dict(weights)
    n_layer = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    g = torch.Generator().manual_seed(0)
    for i in range(n_layer):
        w[f"blocks.{i}.att.time_state"] = torch.randn(8, 8, 8, generator=g) * 0.1
    m = RWKV(_save(tmp_path, w), "cpu fp32")
    z = m.zero_state()
    assert torch.allclose(z.layers[0][1][0], w["blocks.0.att.time_state"].transpose(1, 2))
    plain = RWKV(_save(tmp_path, weights, "plain.pth"), "cpu fp32")
    assert not torch.allclose(m.forward([5], None)[0], plain.forward([5], None)[0])


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        RWKV(tmp_path / "nope.pth", "cpu fp32")


def test_empty_and_truncated_and_garbage(model_path, tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_checkpoint(tmp_path / "empty.pth")
    data = model_path("4").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "trunc.pth")
    (tmp_path / "junk.pth").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "junk.pth")
    # a pickle whose STOP finds an empty stack: torch's unpickler raises IndexError
    (tmp_path / "stop.pth").write_bytes(b"\x80\x02.")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "stop.pth")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "junk.safetensors")


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    """A JSON or text file given as a .pth is no checkpoint (not "pickled objects other than tensors")."""
    for name, data in (("config.json", b'{"hidden_size": 64}'), ("notes.pth", b"hello\n")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=f"{name} is not a checkpoint") as e:
            RWKV(tmp_path / name, "cpu fp32")
        assert "pickled" not in str(e.value) and "corrupt" not in str(e.value)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_payload_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Evil()}, p)
    with pytest.raises(CheckpointError, match="refused"):
        RWKV(p, "cpu fp32")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        RWKV(raw, "cpu fp32")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_not_a_mapping(tmp_path):
    p = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], p)
    with pytest.raises(CheckpointError, match="mapping"):
        RWKV(p, "cpu fp32")


def test_missing_key(weights, tmp_path):
    w = dict(weights)
    del w["blocks.2.att.gate.weight"]
    with pytest.raises(CheckpointError, match="blocks.2.att.gate.weight"):
        RWKV(_save(tmp_path, w), "cpu fp32")


def test_unknown_key(weights, tmp_path):
    w = dict(weights)
    w["blocks.0.att.mystery"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="mystery"):
        RWKV(_save(tmp_path, w), "cpu fp32")


def test_wrong_shape(weights, tmp_path):
    w = dict(weights)
    w["blocks.1.ffn.key.weight"] = torch.zeros(10, 64)
    with pytest.raises(CheckpointError, match="blocks.1.ffn.key.weight"):
        RWKV(_save(tmp_path, w), "cpu fp32")


def test_missing_block(weights, tmp_path):
    w = {k: v for k, v in weights.items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointError, match="missing"):
        RWKV(_save(tmp_path, w), "cpu fp32")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(weights, tmp_path, bad):
    w = dict(weights)
    t = w["blocks.3.ffn.value.weight"].clone()
    t[5, 7] = bad
    w["blocks.3.ffn.value.weight"] = t
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        RWKV(_save(tmp_path, w), "cpu fp32")


def test_converted_reference_checkpoint_is_refused(weights, tmp_path):
    w = dict(weights)
    w["_strategy"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="convert"):
        RWKV(_save(tmp_path, w), "cpu fp32")


def test_strategy_and_device_errors(model_path):
    with pytest.raises(StrategyError, match="gpu"):
        RWKV(model_path("7"), "gpu fp16")
    with pytest.raises(StrategyError, match="i3"):
        RWKV(model_path("7"), "cpu fp16i3")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA"):
            RWKV(model_path("7"), "cuda fp16")
