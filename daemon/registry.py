"""The local model registry: short names for models on disk (``rwkv7-g1-1.5b``, ``qwen2.5-1.5b-instruct``).

One JSON file in the data directory (``<data dir>/models.json``), written atomically under an fcntl lock,
read by the CLI (``rwkv-chat models``, ``pull``, ``load NAME``), the TUI's model screen and the daemon
(which resolves a name given to ``Load`` or ``[model] path`` through :func:`resolve`). An entry records where
a model came from (Hub repo, revision, commit, file), what it is (family, version, size: read from its
headers by :func:`rwkv_chat.daemon.headers.describe`) and where it is (``path``: a file in the Hugging Face
cache for one RWKV checkpoint, a snapshot folder for a model with ``config.json``).

Names match :data:`NAME_RE`: lower-case letters, digits, ``.``, ``_`` and ``-``. :func:`local_name`
derives one from a Hub file or repo name.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: file suffixes of RWKV checkpoints
WEIGHT_SUFFIXES = (".pth", ".safetensors")


class RegistryError(ValueError):
    """A registry name that is invalid, unknown, or already taken by another model; or an unreadable
    registry file."""


@dataclass
class ModelEntry:
    """One local model. ``path``: the checkpoint file or the model folder; ``file``: the file in the repo
    ("" for a folder); ``commit``: the revision's commit hash; ``bytes``: size on disk; ``strategy``: this
    model's default strategy ("" = the config's ``[model] strategy``)."""

    name: str
    path: str
    family: str = ""
    version: str = ""
    size: str = ""            # parameters in words, "1.5B"
    params: int = 0
    format: str = ""          # "pth", "safetensors", "hf"
    repo: str = ""
    revision: str = ""
    commit: str = ""
    file: str = ""
    bytes: int = 0
    strategy: str = ""
    added: float = 0.0


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid registry name, else raise RegistryError."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise RegistryError(f"invalid model name {name[:80]!r}: use 1-64 of a-z 0-9 . _ - (starting with a "
                            "letter or digit)")
    return name


_DATE = re.compile(r"^(\d{6}|\d{8})$")
_CTX = re.compile(r"^ctx\d+k?$")


def local_name(repo: str, filename: str = "") -> str:
    """A short lower-case name for ``filename`` of ``repo`` (or for the repo itself, a folder model):
    the file's stem (the repo's name for a folder) up to a date or ``ctxN`` part, characters outside
    :data:`NAME_RE` replaced by ``-``. ``rwkv7-g1-1.5b-20250429-ctx4096.pth`` -> ``rwkv7-g1-1.5b``;
    ``Qwen/Qwen2.5-1.5B-Instruct`` -> ``qwen2.5-1.5b-instruct``."""
    base = Path(filename).name if filename else repo.rstrip("/").rsplit("/", 1)[-1]
    for suffix in WEIGHT_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    parts = []
    for part in re.split(r"[-_]", base.lower()):
        if parts and (_DATE.match(part) or _CTX.match(part)):
            break
        parts.append(part)
    name = re.sub(r"[^a-z0-9._-]+", "-", "-".join(p for p in parts if p)).strip("-._")[:64]
    return name or "model"


class Registry:
    """The registry file of one home (``paths.data_dir / "models.json"``). Every call reads the file
    afresh (another process may have changed it); changes hold an fcntl lock and replace the file
    atomically."""

    def __init__(self, data_dir: str | os.PathLike):
        self.file = Path(data_dir) / "models.json"

    @contextmanager
    def _locked(self):
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.file.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, ModelEntry]:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RegistryError(f"cannot read the model registry {self.file}: {e}") from e
        known = {f.name for f in fields(ModelEntry)}
        models = data.get("models") if isinstance(data, dict) else None
        out = {}
        for name, raw in models.items() if isinstance(models, dict) else ():
            if isinstance(raw, dict) and isinstance(raw.get("path"), str):
                out[name] = ModelEntry(**{k: v for k, v in raw.items() if k in known} | {"name": name})
        return out

    def _write(self, entries: dict[str, ModelEntry]) -> None:
        tmp = self.file.with_name(f"{self.file.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"models": {n: asdict(e) for n, e in sorted(entries.items())}}, indent=2),
                       encoding="utf-8")
        os.replace(tmp, self.file)

    def entries(self) -> list[ModelEntry]:
        """Every entry, by name."""
        return sorted(self._read().values(), key=lambda e: e.name)

    def get(self, name: str) -> ModelEntry | None:
        """The entry called ``name``, or None."""
        return self._read().get(name)

    def find(self, repo: str, file: str, commit: str = "") -> ModelEntry | None:
        """The entry of ``file`` of ``repo`` (at ``commit`` when given), or None."""
        for e in self._read().values():
            if e.repo == repo and e.file == file and (not commit or e.commit == commit):
                return e
        return None

    def add(self, entry: ModelEntry, replace: bool = False) -> ModelEntry:
        """Record ``entry``. The name may be reused for the same repo and file (a newer revision replaces the
        older), or with ``replace``; else RegistryError names the model that has it."""
        check_name(entry.name)
        with self._locked():
            entries = self._read()
            old = entries.get(entry.name)
            if old is not None and not replace and (old.repo, old.file) != (entry.repo, entry.file):
                raise RegistryError(f"the name {entry.name!r} is taken by {old.repo or old.path}"
                                    f"{' ' + old.file if old.file else ''}: choose another with --name")
            entry.added = entry.added or time.time()
            entries[entry.name] = entry
            self._write(entries)
        return entry

    def remove(self, name: str) -> ModelEntry:
        """Forget ``name`` and return its entry (the files are the caller's business). Raises RegistryError
        when there is no such entry."""
        with self._locked():
            entries = self._read()
            if name not in entries:
                raise RegistryError(f"no local model is called {name[:80]!r} (`rwkv-chat models` lists them)")
            entry = entries.pop(name)
            self._write(entries)
        return entry

    def using(self, path: str) -> list[ModelEntry]:
        """The entries whose path is ``path`` or lies inside it (or contains it)."""
        p = os.path.realpath(path)
        out = []
        for e in self._read().values():
            q = os.path.realpath(e.path)
            if q == p or q.startswith(p + os.sep) or p.startswith(q + os.sep):
                out.append(e)
        return out


def existing_path(ref: str) -> str | None:
    """``ref`` (``~`` expanded) where it names an existing file or folder, else ``ref + ".pth"`` where that
    exists (the reference package's rule: a checkpoint named without its suffix), else None."""
    p = Path(ref).expanduser()
    if p.exists():
        return str(p)
    if not p.suffix and p.with_name(p.name + ".pth").is_file():
        return str(p.with_name(p.name + ".pth"))
    return None


def resolve(ref: str, data_dir: str | os.PathLike) -> str:
    """The path of the model ``ref`` names: an existing file or folder as it is; else the path of the
    registry entry called ``ref``; else ``ref + ".pth"`` where that exists. Raises FileNotFoundError when it
    is none of them (a path that does not exist, or a name the registry does not know)."""
    p = Path(ref).expanduser()
    if p.exists():
        return str(p)
    entry = Registry(data_dir).get(ref) if NAME_RE.fullmatch(ref) else None
    if entry is not None:
        if not Path(entry.path).exists():
            raise FileNotFoundError(f"the files of the local model {ref!r} are gone ({entry.path}); pull it "
                                    f"again (`rwkv-chat pull {entry.repo} {entry.file}`) or remove it "
                                    f"(`rwkv-chat models rm {ref}`)")
        return entry.path
    if (found := existing_path(ref)) is not None:
        return found
    if NAME_RE.fullmatch(ref):
        raise FileNotFoundError(f"no model file or local model named {ref!r} (`rwkv-chat models` lists them)")
    raise FileNotFoundError(f"no such model file or folder: {ref}")
