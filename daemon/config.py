"""The TOML configuration (``<config dir>/config.toml``).

Sections and keys (all optional; defaults below)::

    [model]
    path = "/path/to/model.pth"    # the daemon's default model ("" = none; load one with `rwkv-chat load`)
    strategy = "cpu fp32"          # reference strategy grammar, e.g. "cuda fp16i8 *10 -> cpu fp32"
    tokenizer = ""                 # "world", "neox", "bytes" or a tokenizer file; "" = by vocabulary size

    [sampling]                     # defaults of every generation (requests and conversations override)
    temperature = 1.0
    top_p = 0.85
    top_k = 0
    alpha_frequency = 0.2
    alpha_presence = 0.2
    alpha_decay = 0.996
    max_tokens = 256

    [daemon]
    queue_limit = 16               # queued generations (all clients) before requests get `Busy`
    max_active = 16                # generations admitted at once (prefilling or decoding)
    max_batch = 16                 # decode slots: generations decoded together in one batched step
    batch_invariant = "auto"       # whether a conversation's numbers may depend on how many others share
                                   # its decode step. true: no; only batch sizes measured at load to compute
                                   # a row bit-identically to max_batch rows are used (CPU: the tiny models
                                   # keep every size, larger ones a floor of a few rows, e.g. 4 for a 0.1B
                                   # model, which then decodes a lone conversation ~3x slower on 2 cores;
                                   # CUDA and other accelerators: slower, often every step at max_batch rows,
                                   # and the load captures a CUDA graph per batch size). false: the engine's
                                   # default batch sizes, fastest (a lone conversation decodes 1 row; its
                                   # logits can differ in the last bits from a batched step's). "auto"
                                   # (default): true on CPU where the measured sizes start at 1 row (no cost),
                                   # else false; false on CUDA/other accelerators (where fp16 results of the
                                   # graph, batched and plain paths agree only within a tolerance anyway)
    chunk_len = 256                # prefill chunk, tokens (one chunk between two decode steps)
    threads = 0                    # torch intra-op threads of the daemon; 0 = auto: 1 for models with
                                   # n_embd < 512 (per-op overhead dominates: 1 thread decodes the tiny
                                   # models 5x faster than 2 on a 2-core machine), else min(4, cores)
    client_timeout = 10.0          # seconds without a client heartbeat before its generation is cancelled
    heartbeat = 1.0                # seconds between heartbeats (both directions)
    resident_states = 8            # conversation states kept on the model's devices
    cpu_states = 64                # more idle states kept in CPU memory; the rest live on disk only
    bind = ""                      # "" = ipc:// in the runtime dir; "tcp://HOST:PORT" (beyond loopback needs CURVE)
    curve_secret_key = ""          # Z85 server secret key, required for a tcp bind beyond loopback
    curve_public_key = ""
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """The configuration file is malformed or has a key of the wrong type."""


@dataclass
class ModelConfig:
    path: str = ""
    strategy: str = "cpu fp32"
    tokenizer: str = ""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    alpha_frequency: float = 0.2
    alpha_presence: float = 0.2
    alpha_decay: float = 0.996
    max_tokens: int = 256


@dataclass
class DaemonConfig:
    queue_limit: int = 16
    max_active: int = 16
    max_batch: int = 16
    batch_invariant: bool | str = "auto"    # true | false | "auto"
    chunk_len: int = 256
    threads: int = 0
    client_timeout: float = 10.0
    heartbeat: float = 1.0
    resident_states: int = 8
    cpu_states: int = 64
    bind: str = ""
    curve_secret_key: str = ""
    curve_public_key: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)


_SECTIONS = {"model": ModelConfig, "sampling": SamplingConfig, "daemon": DaemonConfig}


#: keys that take a bool or one of these strings
_BOOL_OR = {("daemon", "batch_invariant"): ("auto",)}


def _coerce(section: str, key: str, value, default):
    words = _BOOL_OR.get((section, key))
    if words is not None:
        if isinstance(value, bool) or value in words:
            return value
        choices = ", ".join(f'"{w}"' for w in words)
        raise ConfigError(f"[{section}] {key} must be true, false or {choices}, got {value!r}")
    want = type(default)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"[{section}] {key} must be {want.__name__}, got {value!r}")
    return value


def load_config(path: Path) -> Config:
    """Read ``path`` (missing file = defaults). Raises :class:`ConfigError` on bad TOML or types."""
    cfg = Config()
    if not path.exists():
        return cfg
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    for name, table in data.items():
        if name not in _SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{name}]")
        obj = getattr(cfg, name)
        known = {f.name: f for f in dataclasses.fields(obj)}
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"{path}: unknown key [{name}] {key}")
            setattr(obj, key, _coerce(name, key, value, getattr(obj, key)))
    return cfg


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dump_config(cfg: Config) -> str:
    """The TOML text of ``cfg`` (every key written)."""
    lines = []
    for name in _SECTIONS:
        lines.append(f"[{name}]")
        for f in dataclasses.fields(getattr(cfg, name)):
            lines.append(f"{f.name} = {_toml_value(getattr(getattr(cfg, name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` to ``path`` atomically (temp file, fsync, replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dump_config(cfg))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
