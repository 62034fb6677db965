"""The TOML configuration (``<config dir>/config.toml``).

Sections and keys (all optional; defaults below)::

    [model]
    path = "/path/to/model.pth"    # the daemon's default model ("" = none; load one with `rwkv-chat load`)
    strategy = "cpu fp32"          # reference strategy grammar, e.g. "cuda fp16i8 *10 -> cpu fp32"
    tokenizer = ""                 # "world", "neox", "bytes" or a tokenizer file; "" = by vocabulary size
    context_limit = 0              # tokens a conversation's state may hold; 0 = the model's own (a transformer's
                                   # KV cache length; none for RWKV); else this, at most the model's own
    context_policy = "error"       # past the limit: "error" (the turn fails, saying so) or "truncate" (the
                                   # oldest turns are left out and the rest re-read; see rwkv_chat.daemon.context)

    [sampling]                     # defaults of every generation (requests and conversations override);
    temperature = 1.0              # the engine's one sampling settings type, SamplerArgs, with its defaults
    top_p = 0.85                   # (rwkv_chat.models.text.sampling; values out of range are a ConfigError);
                                   # a key not written here takes the model's own default where it has one
                                   # (a Hugging Face folder's generation_config.json: temperature, top_p, top_k,
                                   # repetition_penalty)
    top_k = 0
    alpha_frequency = 0.2
    alpha_presence = 0.2
    alpha_decay = 0.996
    repetition_penalty = 1.0       # > 0; 1 = off: Hugging Face's penalty on the context's tokens
    max_tokens = 256
    # seed = 1                     # unset: a random seed per generation

    [daemon]
    queue_limit = 16               # queued generations (all clients) before requests get `Busy`
    max_tokens_limit = 100000      # the most tokens one generation may ask for (max_tokens); more is a LimitError
    max_active = 16                # generations admitted at once (prefilling or decoding)
    time_slice = 10.0              # seconds a generation keeps its place while others wait for one: then it
                                   # yields (keeping its state and stream) to the back of the queue and
                                   # resumes when its turn comes again; 0 = never yield
    queue_timeout = 120.0          # seconds a queued request (a load waiting for running generations, or any
                                   # request with time_slice = 0) may wait before it fails with kind
                                   # "QueueTimeout"; 0 = wait forever. Queued requests get `Queued` events
                                   # (their position) meanwhile
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
    client_timeout = 2.5           # seconds without a heartbeat (a Ping with the job's client id) or any request
                                   # from the job's connection before its generations are cancelled; a closed
                                   # connection's generations are cancelled at once
    daemon_timeout = 2.5           # seconds without a word from the daemon (heartbeats included) before a
                                   # client reports it lost (a stream: DaemonLost) or not responding
    heartbeat = 0.5                # seconds between heartbeats (both directions)
    prefix_cache_bytes = 1073741824  # model states after token prefixes kept for stateless chat requests (the
                                   # HTTP API's), on the model's devices, least recently used out; 0 = off
    resident_states = 8            # conversation states kept on the model's devices
    cpu_states = 64                # more idle states kept in CPU memory; the rest live on disk only
    keep_alive = "30m"             # unload an idle model (no generation running or waiting) after this long:
                                   # seconds, or "90s", "30m", "2h"; 0 = never. The next request that needs
                                   # the model loads it again (load progress events, as at start); the
                                   # conversations' states are on disk and resume as before
    prompt_cache_device_bytes = 1073741824  # states after a shared prefix (a system prompt, a preset) kept
                                   # on the model's devices (GPU memory) for every conversation that starts
                                   # with it, least recently used out first (into RAM); 0 = off. A CPU-only
                                   # model's states skip this tier (they are in CPU memory: the RAM tier)
    prompt_cache_ram_bytes = 268435456    # the same in CPU memory (out first into the disk tier); 0 = off
    prompt_cache_disk_bytes = 1073741824  # the same on disk (<data dir>/prompt_states), least recently used
                                   # out first; 0 = off
    draft_prefill = true           # read a message while it is typed (the TUI sends its draft), at low priority
    bind = ""                      # "" = ipc:// in the runtime dir; "tcp://HOST:PORT" (beyond loopback needs CURVE)
    curve_secret_key = ""          # Z85 server secret key, required for a tcp bind beyond loopback
    curve_public_key = ""

    [http]                         # the OpenAI-compatible HTTP gateway (`rwkv-chat serve --http`)
    listen = "127.0.0.1:11435"     # HOST:PORT; an address beyond loopback needs api_key
    api_key = ""                   # "" = no key; else requests need the header `Authorization: Bearer KEY`
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rwkv_chat.models.text.sampling import SETTINGS as SAMPLING_KEYS  # noqa: F401 (re-exported)
from rwkv_chat.models.text.sampling import SamplerArgs, SamplingError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """The configuration file is malformed or has a key of the wrong type."""


def check_max_tokens(value, limit: int) -> None:
    """Raise ``LimitError`` (:mod:`rwkv_chat.daemon.protocol.messages`) if ``value``, a ``max_tokens`` setting
    (None = not given), exceeds ``limit`` (``[daemon] max_tokens_limit``)."""
    from rwkv_chat.daemon.protocol.messages import LimitError

    if isinstance(value, int) and not isinstance(value, bool) and value > limit:
        raise LimitError(f"max_tokens {value:,} exceeds the daemon's limit of {limit:,} "
                         "([daemon] max_tokens_limit in the config)")


@dataclass
class ModelConfig:
    path: str = ""
    strategy: str = "cpu fp32"
    tokenizer: str = ""
    context_limit: int = 0
    context_policy: str = "error"        # "error" | "truncate"


@dataclass
class DaemonConfig:
    queue_limit: int = 16
    max_tokens_limit: int = 100_000
    max_active: int = 16
    time_slice: float = 10.0
    queue_timeout: float = 120.0
    max_batch: int = 16
    batch_invariant: bool | str = "auto"    # true | false | "auto"
    chunk_len: int = 256
    threads: int = 0
    client_timeout: float = 2.5
    daemon_timeout: float = 2.5
    heartbeat: float = 0.5
    prefix_cache_bytes: int = 1 << 30
    resident_states: int = 8
    cpu_states: int = 64
    keep_alive: float = 1800.0
    prompt_cache_device_bytes: int = 1 << 30
    prompt_cache_ram_bytes: int = 256 << 20
    prompt_cache_disk_bytes: int = 1 << 30
    draft_prefill: bool = True
    bind: str = ""
    curve_secret_key: str = ""
    curve_public_key: str = ""


@dataclass
class HttpConfig:
    listen: str = "127.0.0.1:11435"
    api_key: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplerArgs = field(default_factory=SamplerArgs)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    #: the [sampling] keys the file sets (the others take the model's defaults first: sampling_base)
    sampling_set: frozenset = field(default_factory=frozenset, compare=False)

    def sampling_base(self, model_defaults=None) -> SamplerArgs:
        """The sampling settings a generation starts from: the model's defaults (``model_defaults``, setting
        name -> value, e.g. ``{"temperature": 0.7}``) under the keys the config sets; ``sampling`` as it is
        when the model has none. Raises SamplingError for a model default out of range."""
        if not model_defaults:
            return self.sampling
        fixed = {k: getattr(self.sampling, k) for k in self.sampling_set | _changed(self.sampling)}
        return SamplerArgs().updated(model_defaults).updated(fixed)


_SECTIONS = ("model", "sampling", "daemon", "http")


#: keys that take a bool or one of these strings
_BOOL_OR = {("daemon", "batch_invariant"): ("auto",)}
#: keys that take one of these strings
_CHOICES = {("model", "context_policy"): ("error", "truncate")}

#: seconds that must be > 0 (heartbeats, timeouts of silence) or >= 0 (0 = off)
_POSITIVE = {("daemon", k) for k in ("heartbeat", "client_timeout", "daemon_timeout")}
_NON_NEGATIVE = {("daemon", k) for k in ("time_slice", "queue_timeout")}


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value) -> float:
    """Seconds of a duration: a number of seconds (int or float) or a string ``"90"``, ``"90s"``, ``"30m"``,
    ``"2h"``, ``"1d"``; >= 0. Raises ConfigError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip().lower()
        unit = _DURATION_UNITS.get(text[-1])
        try:
            seconds = float(text[:-1] if unit else text) * (unit or 1.0)
        except ValueError:
            raise ConfigError(f"{value!r} is not a duration: use seconds or a number with s, m, h or d "
                              "(\"30m\")") from None
    else:
        raise ConfigError(f"{value!r} is not a duration: use seconds or a number with s, m, h or d (\"30m\")")
    if not seconds >= 0 or seconds == float("inf"):
        raise ConfigError(f"a duration must be >= 0 seconds, got {value!r}")
    return seconds


#: [daemon] keys that are byte budgets: >= 0 (0 = off)
_BYTE_BUDGETS = ("prefix_cache_bytes", "prompt_cache_device_bytes", "prompt_cache_ram_bytes",
                 "prompt_cache_disk_bytes")

#: keys that take a duration (seconds or "30m"), see parse_duration
_DURATIONS = {("daemon", "keep_alive")}


def _coerce(section: str, key: str, value, default):
    if (section, key) in _DURATIONS:
        try:
            return parse_duration(value)
        except ConfigError as e:
            raise ConfigError(f"[{section}] {key}: {e}") from None
    words = _BOOL_OR.get((section, key))
    if words is not None:
        if isinstance(value, bool) or value in words:
            return value
        choices = ", ".join(f'"{w}"' for w in words)
        raise ConfigError(f"[{section}] {key} must be true, false or {choices}, got {value!r}")
    if (section, key) in _CHOICES and value not in _CHOICES[section, key]:
        choices = ", ".join(f'"{w}"' for w in _CHOICES[section, key])
        raise ConfigError(f"[{section}] {key} must be one of {choices}, got {value!r}")
    want = int if default is None else type(default)       # None: [sampling] seed
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise ConfigError(f"[{section}] {key} must be {want.__name__}, got {value!r}")
    if (section, key) in _POSITIVE and not value > 0:
        raise ConfigError(f"[{section}] {key} must be > 0 seconds, got {value!r}")
    if (section, key) in _NON_NEGATIVE and not value >= 0:
        raise ConfigError(f"[{section}] {key} must be >= 0 seconds (0 = off), got {value!r}")
    if (section, key) == ("model", "context_limit") and value < 0:
        raise ConfigError(f"[model] context_limit must be >= 0 tokens (0 = the model's own), got {value!r}")
    return value


def load_config(path: Path) -> Config:
    """Read ``path`` (missing file = defaults). Raises :class:`ConfigError` on bad TOML or types, or a
    ``[sampling] max_tokens`` over ``[daemon] max_tokens_limit``."""
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
        known = _keys(name, obj)
        for key in table:
            if key not in known:
                raise ConfigError(f"{path}: unknown key [{name}] {key}")
        try:
            values = {key: _coerce(name, key, value, getattr(obj, key)) for key, value in table.items()}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        if name == "sampling":
            cfg.sampling_set = frozenset(values)
            try:
                cfg.sampling = cfg.sampling.updated(values)
            except SamplingError as e:
                raise ConfigError(f"{path}: [sampling] {e}") from e
        else:
            for key, value in values.items():
                setattr(obj, key, value)
    for key in _BYTE_BUDGETS:
        if getattr(cfg.daemon, key) < 0:
            raise ConfigError(f"{path}: [daemon] {key} must be >= 0 bytes (0 = off), got {getattr(cfg.daemon, key)}")
    if cfg.daemon.max_tokens_limit < 1:
        raise ConfigError(f"{path}: [daemon] max_tokens_limit must be >= 1, got {cfg.daemon.max_tokens_limit}")
    if cfg.sampling.max_tokens > cfg.daemon.max_tokens_limit:
        raise ConfigError(f"{path}: [sampling] max_tokens {cfg.sampling.max_tokens} exceeds [daemon] "
                          f"max_tokens_limit {cfg.daemon.max_tokens_limit}")
    return cfg


def _changed(sampling: SamplerArgs) -> set[str]:
    """The sampling keys whose value differs from SamplerArgs' default."""
    default = SamplerArgs()
    return {k for k in SAMPLING_KEYS if getattr(sampling, k) != getattr(default, k)}


def _keys(section: str, obj) -> tuple[str, ...]:
    """The keys of a section, in the order they are written."""
    if section == "sampling":
        return SAMPLING_KEYS
    return tuple(f.name for f in dataclasses.fields(obj))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def dump_config(cfg: Config) -> str:
    """The TOML text of ``cfg`` (every key that has a value written; of ``[sampling]``, the keys the file set
    and those changed from the defaults, so the others keep taking the model's defaults)."""
    lines = []
    for name in _SECTIONS:
        lines.append(f"[{name}]")
        obj = getattr(cfg, name)
        keep = cfg.sampling_set | _changed(cfg.sampling) if name == "sampling" else None
        for key in _keys(name, obj):
            if getattr(obj, key) is not None and (keep is None or key in keep):
                lines.append(f"{key} = {_toml_value(getattr(obj, key))}")
        lines.append("")
    return "\n".join(lines)


def save_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` to ``path`` atomically (temp file, fsync, replace), mode 0600 (it may hold the CURVE
    secret key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(dump_config(cfg))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
