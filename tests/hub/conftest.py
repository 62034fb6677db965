"""Fixtures for the Hub tests: a Hub-layout server on 127.0.0.1 with repos of the tiny models (served from
../shared, never copied) and of models built here, and homes whose CLI runs reach it through HF_ENDPOINT
with a private HF_HOME (huggingface_hub's own configuration, set only in the subprocess environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..daemon.conftest import make_home
from .hub_server import HubServer, Repo

CLI = [sys.executable, "-m", "rwkv_chat.app.cli"]
TINY_REPO = "BlinkDL/tiny-rwkv"
BIG_REPO = "tiny/rwkv7-wide-vocab"
QWEN_REPO = "tiny/Qwen2-tiny-Instruct"


def _wide_rwkv7(src: Path, dst: Path) -> Path:
    """The tiny RWKV-7 with its embedding and head widened to 65,536 rows (random): a ~35 MB safetensors
    checkpoint, larger than huggingface_hub's 10 MiB download chunk, so an interrupted download has a
    chunk on disk to resume from."""
    import torch
    from safetensors.torch import save_file

    w = torch.load(src, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    c = w["emb.weight"].shape[1]
    w["emb.weight"] = torch.randn(65536, c, generator=g) * 0.01
    w["head.weight"] = torch.randn(65536, c, generator=g) * 0.01
    save_file({k: v.contiguous() for k, v in w.items()}, str(dst))
    return dst


def _qwen_folder(shared: Path, dst: Path) -> dict[str, Path]:
    """A tiny random Qwen2 folder in the Hugging Face layout (config.json, model.safetensors with the
    Qwen2ForCausalLM tensor names, generation_config.json); the tokenizer files are served from
    ../shared/tokenizers/qwen."""
    import torch
    from safetensors.torch import save_file

    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936, "hidden_size": 16,
           "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True,
           "torch_dtype": "float16"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 151643, "eos_token_id": 151645}))
    g = torch.Generator().manual_seed(0)
    c, f, kv = cfg["hidden_size"], cfg["intermediate_size"], 8
    shapes = {"model.embed_tokens.weight": [cfg["vocab_size"], c], "model.norm.weight": [c]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": [c], p + "post_attention_layernorm.weight": [c],
                       p + "self_attn.q_proj.weight": [c, c], p + "self_attn.q_proj.bias": [c],
                       p + "self_attn.k_proj.weight": [kv, c], p + "self_attn.k_proj.bias": [kv],
                       p + "self_attn.v_proj.weight": [kv, c], p + "self_attn.v_proj.bias": [kv],
                       p + "self_attn.o_proj.weight": [c, c], p + "mlp.gate_proj.weight": [f, c],
                       p + "mlp.up_proj.weight": [f, c], p + "mlp.down_proj.weight": [c, f]})
    save_file({k: (torch.randn(s, generator=g) * 0.02).half() for k, s in shapes.items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    files = {p.name: p for p in dst.iterdir() if p.is_file()}
    tok = shared / "tokenizers" / "qwen"
    files.update({p.name: p for p in tok.iterdir() if p.name in ("tokenizer.json", "tokenizer_config.json")})
    readme = dst / "README.md"
    readme.write_text("# tiny Qwen2\n")
    files["README.md"] = readme
    return files


@pytest.fixture(scope="session")
def hub(tmp_path_factory, models_dir, shared_dir):
    """The Hub server (session-wide): TINY_REPO (two tiny RWKV files and a README), BIG_REPO (one ~35 MB
    RWKV-7 safetensors) and QWEN_REPO (a model folder)."""
    built = tmp_path_factory.mktemp("hub-files")
    readme = built / "README.md"
    readme.write_text("# tiny RWKV models\n")
    big = _wide_rwkv7(models_dir / "tiny-rwkv-7v0-834K.pth", built / "rwkv7-wide-vocab-20250101.safetensors")
    qwen = built / "qwen"
    qwen.mkdir()
    server = HubServer([
        Repo(TINY_REPO, {"tiny-rwkv-7v0-834K.pth": models_dir / "tiny-rwkv-7v0-834K.pth",
                         "tiny-rwkv-6v0-1m.pth": models_dir / "tiny-rwkv-6v0-1m.pth", "README.md": readme}),
        Repo(BIG_REPO, {big.name: big}),
        Repo(QWEN_REPO, _qwen_folder(shared_dir, qwen)),
    ]).start()
    yield server
    server.stop()


@pytest.fixture()
def home(tmp_path, hub):
    """A fresh rwkv-chat home and HF_HOME; ``home.run(*args)`` runs the CLI there against the Hub server."""
    h = make_home(tmp_path / "home", keep_alive=0.0)
    return Home(h, tmp_path / "hf", hub.endpoint)


class Home:
    def __init__(self, path: Path, hf_home: Path, endpoint: str):
        self.path, self.hf_home, self.endpoint = path, hf_home, endpoint

    def env(self, **extra) -> dict:
        env = dict(os.environ)
        env.update(RWKV_CHAT_HOME=str(self.path), HF_HOME=str(self.hf_home), HF_ENDPOINT=self.endpoint,
                   HF_HUB_DISABLE_TELEMETRY="1")
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("HF_TOKEN", None)
        env.update(extra)
        return env

    def run(self, *args, check: bool = True, timeout: float = 120, stdin: str | None = None,
            **env) -> subprocess.CompletedProcess:
        r = subprocess.run([*CLI, *map(str, args)], env=self.env(**env), capture_output=True, text=True,
                           timeout=timeout, input=stdin)
        if check and r.returncode != 0:
            raise AssertionError(f"rwkv-chat {args} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def models(self) -> list[dict]:
        return json.loads(self.run("models", "--json").stdout)

    @property
    def cache(self) -> Path:
        return self.hf_home / "hub"
