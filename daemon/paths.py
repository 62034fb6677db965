"""Where rwkv-chat keeps its files.

Default directories come from :mod:`platformdirs` (``user_config_dir``, ``user_data_dir``,
``user_cache_dir``, ``user_runtime_dir``). ``RWKV_CHAT_HOME=DIR`` puts all four under ``DIR``
(``DIR/config``, ``DIR/data``, ``DIR/cache``, ``DIR/run``), for tests and side-by-side installs.

The runtime directory holds the daemon's connection file, lock file and ipc sockets; the data directory
holds the conversations (SQLite database, state files). Both are private: :func:`ensure_dirs` creates them
with mode 0700, enforces that mode on every call whatever the umask, and refuses (:class:`UnsafeDirectory`)
one that belongs to another user.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "rwkv-chat"
HOME_ENV = "RWKV_CHAT_HOME"


class UnsafeDirectory(PermissionError):
    """A private directory of the home (runtime or data) belongs to another user or is not a directory."""


class UnusableDirectory(OSError):
    """A directory of the home cannot be made (a file in its place, no permission, a read-only or missing
    mount); the message names the directory and, where it comes from ``RWKV_CHAT_HOME``, that variable."""


@dataclass(frozen=True)
class Paths:
    """The four directories of one rwkv-chat home."""

    config_dir: Path
    data_dir: Path
    cache_dir: Path
    runtime_dir: Path
    home: Path | None = None      # set when the paths come from RWKV_CHAT_HOME (or home_paths)

    @property
    def config_file(self) -> Path:
        """The TOML configuration file (``config.toml``)."""
        return self.config_dir / "config.toml"

    @property
    def database(self) -> Path:
        """The SQLite database of conversations and turns."""
        return self.data_dir / "conversations.sqlite3"

    @property
    def states_dir(self) -> Path:
        """Per-conversation state files (safetensors)."""
        return self.data_dir / "states"

    @property
    def connection_file(self) -> Path:
        """The daemon's connection file (endpoints and signing key), mode 0600."""
        return self.runtime_dir / "daemon.json"

    @property
    def lock_file(self) -> Path:
        """The lock file held (fcntl) by the one running daemon of this home."""
        return self.runtime_dir / "daemon.lock"

    @property
    def log_file(self) -> Path:
        """The daemon's log (stdout and stderr of a daemon started in the background)."""
        return self.cache_dir / "daemon.log"


def _runtime_default() -> Path:
    try:
        with warnings.catch_warnings():     # platformdirs warns when XDG_RUNTIME_DIR is unset (ssh, containers)
            warnings.simplefilter("ignore")  # and falls back to a private /tmp folder: fine for us, say nothing
            runtime = platformdirs.user_runtime_dir(APP_NAME)
    except Exception:  # platforms without a runtime dir notion
        runtime = None
    if not runtime:
        runtime = os.path.join(tempfile.gettempdir(), f"{APP_NAME}-{os.getuid()}")
    return Path(runtime)


def get_paths() -> Paths:
    """The directories of the current home (``RWKV_CHAT_HOME`` or platformdirs); nothing is created."""
    home = os.environ.get(HOME_ENV)
    if home:
        return home_paths(home)
    return Paths(
        Path(platformdirs.user_config_dir(APP_NAME)),
        Path(platformdirs.user_data_dir(APP_NAME)),
        Path(platformdirs.user_cache_dir(APP_NAME)),
        _runtime_default(),
    )


def home_paths(home: str | os.PathLike) -> Paths:
    """The directories of the home ``home`` (as ``RWKV_CHAT_HOME=home`` would give)."""
    base = Path(home).expanduser().resolve()
    return Paths(base / "config", base / "data", base / "cache", base / "run", base)


def child_env(paths: Paths, env: dict | None = None) -> dict:
    """An environment for a child process (the daemon) that uses the same home as ``paths``."""
    env = dict(os.environ if env is None else env)
    if paths.home is not None:
        env[HOME_ENV] = str(paths.home)
    else:
        env.pop(HOME_ENV, None)
    return env


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) if needed and make it a private directory: owned by this user
    (else :class:`UnsafeDirectory`, nothing changed) and mode 0700 (enforced whatever the umask). Returns
    ``path``."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()}); "
                              "refusing to keep private files there")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def ensure_dirs(paths: Paths | None = None) -> Paths:
    """Create the directories and return the paths. The runtime, data and states directories are private
    (:func:`private_dir`: mode 0700 enforced, owner checked). Raises :class:`UnsafeDirectory` for one of
    them that belongs to another user, :class:`UnusableDirectory` where a directory cannot be made."""
    paths = paths or get_paths()
    try:
        for d in (paths.config_dir, paths.cache_dir):
            d.mkdir(parents=True, exist_ok=True)
        for d in (paths.runtime_dir, paths.data_dir, paths.states_dir):
            private_dir(d)
    except UnsafeDirectory:
        raise
    except OSError as e:
        where = f" ({HOME_ENV}={paths.home})" if paths.home is not None else ""
        raise UnusableDirectory(f"cannot make {e.filename or 'a directory'}{where}: "
                                f"{e.strerror or type(e).__name__}") from e
    return paths
