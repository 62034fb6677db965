"""What a model is from its headers (no torch in the reader) against the engine's own checkpoint reading;
local names; the registry file."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

from rwkv_chat.daemon.headers import HeaderError, describe
from rwkv_chat.daemon.registry import ModelEntry, Registry, RegistryError, local_name, resolve
from rwkv_chat.models.rwkv.checkpoint import detect_version

from ..conftest import MODEL_NAMES


@pytest.mark.parametrize("version", sorted(MODEL_NAMES))
def test_pth_and_safetensors_headers_agree_with_the_engine(version, model_path, tmp_path):
    from safetensors.torch import save_file

    path = model_path(version)
    w = torch.load(path, map_location="cpu", weights_only=True)
    want = (detect_version(w), w["emb.weight"].shape[0], w["emb.weight"].shape[1],
            1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks.")), sum(t.numel() for t in w.values()))
    got = describe(path)
    assert (got.version, got.vocab_size, got.n_embd, got.n_layer, got.params) == want and got.format == "pth"
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in w.items()}, str(st))
    got = describe(st)
    assert (got.version, got.vocab_size, got.n_embd, got.n_layer, got.params) == want and got.format == "safetensors"


def test_a_pth_pickle_runs_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    bad = tmp_path / "evil.pth"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"emb.weight": Evil()}))
    with pytest.raises(HeaderError, match="unexpected object"):
        describe(bad)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(HeaderError):
        describe(tmp_path / "junk.pth")


@pytest.mark.parametrize("repo, file, name", [
    ("BlinkDL/rwkv7-g1", "rwkv7-g1-1.5b-20250429-ctx4096.pth", "rwkv7-g1-1.5b"),
    ("BlinkDL/rwkv-7-world", "RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth", "rwkv-x070-world-0.1b-v2.8"),
    ("Qwen/Qwen2.5-1.5B-Instruct", "", "qwen2.5-1.5b-instruct"),
    ("x/y", "sub/Tiny_Model.safetensors", "tiny-model"),
])
def test_local_names(repo, file, name):
    assert local_name(repo, file) == name


def test_the_registry_resolves_names_and_refuses_a_taken_one(tmp_path, model_path):
    reg = Registry(tmp_path)
    reg.add(ModelEntry(name="seven", path=str(model_path("7")), repo="a/b", file="x.pth"))
    assert resolve("seven", tmp_path) == str(model_path("7"))
    assert resolve(str(model_path("6")), tmp_path) == str(model_path("6"))     # a path is a path
    with pytest.raises(RegistryError, match="taken"):
        reg.add(ModelEntry(name="seven", path=str(model_path("6")), repo="a/b", file="y.pth"))
    with pytest.raises(FileNotFoundError, match="rwkv-chat models"):
        resolve("eight", tmp_path)
    with pytest.raises(RegistryError):
        reg.add(ModelEntry(name="Bad Name", path="/x"))
    reg.remove("seven")
    assert reg.entries() == []


def test_a_checkpoint_named_without_its_pth_suffix_resolves_as_the_reference_package_does(tmp_path, model_path):
    """``load model`` takes model.pth (the engine and the planner do); a local model of that name comes first."""
    import shutil
    from types import SimpleNamespace

    from rwkv_chat.app.models_cli import load_target

    shutil.copy(model_path("7"), tmp_path / "m.pth")
    bare = str(tmp_path / "m")
    assert resolve(bare, tmp_path) == str(tmp_path / "m.pth")
    assert load_target(bare, SimpleNamespace(data_dir=tmp_path)) == (str(tmp_path / "m.pth"), "")
    (tmp_path / "cwd").mkdir()
    shutil.copy(model_path("6"), tmp_path / "cwd" / "seven.pth")
    Registry(tmp_path).add(ModelEntry(name="seven", path=str(model_path("7")), repo="a/b", file="x.pth"))
    old = os.getcwd()
    try:
        os.chdir(tmp_path / "cwd")
        assert resolve("seven", tmp_path) == str(model_path("7"))
        assert load_target("seven", SimpleNamespace(data_dir=tmp_path))[0] == "seven"
    finally:
        os.chdir(old)
    with pytest.raises(FileNotFoundError):
        resolve(str(tmp_path / "nothing"), tmp_path)
