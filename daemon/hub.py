"""Models from the Hugging Face Hub: list a repo's weight files, pull one (or a whole model folder) into
huggingface_hub's cache, record it in the local registry, and remove it again.

Downloads go through ``huggingface_hub`` (``hf_hub_download`` / ``snapshot_download``): its cache
(``HF_HOME`` / ``HF_HUB_CACHE``), resuming of interrupted downloads, progress bars, ``HF_ENDPOINT``, tokens
(``HF_TOKEN`` or ``hf auth login``) and offline mode (``HF_HUB_OFFLINE=1``) are its own. Every file pulled
is checked against the checksum the Hub gave for it: the cache names a blob by its ETag, which for an LFS
file is the SHA-256 of the content and for a small git file its git SHA-1 (``huggingface_hub.utils.sha``);
a file that does not match is deleted from the cache and :class:`ChecksumError` is raised.

A repo with ``config.json`` is a model folder (the Qwen2 family): :data:`FOLDER_PATTERNS` of it are pulled
as one snapshot. Otherwise a single RWKV checkpoint (``.pth`` / ``.safetensors``) is pulled.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .headers import HeaderError, describe
from .registry import WEIGHT_SUFFIXES, ModelEntry, Registry, local_name

#: files of a model folder that are pulled (config, tokenizer, weights and their index, generation config)
FOLDER_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model", "*.safetensors",
                   "*.safetensors.index.json"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


class HubError(RuntimeError):
    """A pull or listing failed (repo, revision or file not found, no access, offline without the file in
    the cache, network); the message is one line for the user."""


class NotOnHub(HubError):
    """The repo, revision or file does not exist on the Hub (or the repo is private and no token allows it)."""


class ChecksumError(HubError):
    """A downloaded file does not match the checksum the Hub gave for it (it was removed from the cache)."""


class ChooseFile(HubError):
    """A repo holds several weight files and none was named: ``files`` lists them (path, size in bytes)."""

    def __init__(self, repo: str, files: list[tuple[str, int]]):
        self.repo, self.files = repo, files
        super().__init__(f"{repo} holds {len(files)} weight files: name one (rwkv-chat pull {repo} FILE)")


@dataclass(frozen=True)
class RepoFiles:
    """A repo's listing at a revision: ``weights`` (path, size in bytes) of its RWKV checkpoint files and
    whether it is a model folder (``config.json`` at its top)."""

    weights: list[tuple[str, int]]
    folder: bool


def _hub_error(e: BaseException, repo: str, what: str = "") -> HubError:
    """One line for a huggingface_hub exception."""
    from huggingface_hub import errors

    where = f"{repo}{' ' + what if what else ''}"
    if isinstance(e, errors.GatedRepoError):
        return HubError(f"{repo} is gated: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return NotOnHub(f"no repo {repo} on the Hub (or it is private: log in with `hf auth login` or HF_TOKEN)")
    if isinstance(e, errors.RevisionNotFoundError):
        return NotOnHub(f"{repo} has no such revision")
    if isinstance(e, errors.EntryNotFoundError) and not isinstance(e, errors.LocalEntryNotFoundError):
        return NotOnHub(f"{where}: no such file in the repo")
    if isinstance(e, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        return HubError(f"{where} is not in the local cache and the Hub cannot be reached (offline mode or no "
                        "network)")
    import httpx2

    if isinstance(e, httpx2.TransportError):
        return HubError(f"{where}: the Hub cannot be reached: {type(e).__name__}: {str(e)[:200]}")
    text = str(e).strip().splitlines()
    return HubError(f"{where}: {type(e).__name__}: {text[0] if text else ''}")


def _errors():
    import httpx2
    from huggingface_hub import errors

    return (httpx2.HTTPError, errors.HfHubHTTPError, errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError,
            errors.EntryNotFoundError, errors.FileMetadataError, OSError, ValueError)


def repo_files(repo: str, revision: str | None = None) -> RepoFiles:
    """The weight files (and whether it is a model folder) of ``repo`` at ``revision`` (default: main).
    Raises HubError."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = [f for f in HfApi().list_repo_tree(repo, recursive=True, revision=revision)
                   if isinstance(f, RepoFile)]
    except _errors() as e:
        raise _hub_error(e, repo) from e
    weights = sorted((f.path, int(f.size)) for f in entries if f.path.endswith(WEIGHT_SUFFIXES))
    return RepoFiles(weights=weights, folder=any(f.path == "config.json" for f in entries))


def verify(path: str | os.PathLike) -> None:
    """Check a file of huggingface_hub's cache against the checksum its blob is named by (SHA-256 for LFS
    files, git SHA-1 for the rest); a blob named otherwise is not checked. On a mismatch the blob and the
    link to it are deleted and ChecksumError is raised (``pull`` it again)."""
    from huggingface_hub.utils.sha import git_hash, sha_fileobj

    link = Path(path)
    blob = Path(os.path.realpath(link))
    name = blob.name
    if _SHA256.fullmatch(name):
        with open(blob, "rb") as f:
            actual = sha_fileobj(f).hex()
    elif _SHA1.fullmatch(name):
        actual = git_hash(blob.read_bytes()) if blob.stat().st_size < (64 << 20) else name
    else:
        return
    if actual != name:
        blob.unlink(missing_ok=True)
        if link != blob:
            link.unlink(missing_ok=True)
        raise ChecksumError(f"{link.name} is corrupt: its checksum is {actual[:12]}…, the Hub gave {name[:12]}…; "
                            "it was removed from the cache, pull it again")


def _commit_of(path: Path) -> str:
    """The commit hash of a path inside a cache snapshot (``…/snapshots/<commit>/…``), or ""."""
    parts = path.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else ""


def pull(repo: str, file: str | None = None, *, revision: str | None = None, name: str | None = None,
         data_dir: str | os.PathLike, tqdm_class=None) -> ModelEntry:
    """Pull ``file`` of ``repo`` (a single RWKV checkpoint), or the whole model folder when the repo has a
    ``config.json`` and no ``file`` is given, into huggingface_hub's cache; check it (:func:`verify`), read
    what it is from its headers and record it in the registry of ``data_dir`` under ``name`` (default:
    :func:`~rwkv_chat.daemon.registry.local_name`). ``tqdm_class``: huggingface_hub's progress bar class
    (None: its default bar on stderr). Raises ChooseFile when the repo has several weight files and none
    was named, HubError / ChecksumError for a failed download, RegistryError for a name already taken."""
    from huggingface_hub import hf_hub_download, snapshot_download

    from .registry import check_name

    registry = Registry(data_dir)
    if name is not None:
        check_name(name)
    folder = False
    if file is None:
        listing = repo_files(repo, revision)
        if listing.folder:
            folder = True
        elif len(listing.weights) == 1:
            file = listing.weights[0][0]
        elif not listing.weights:
            raise HubError(f"{repo} holds no .pth or .safetensors file and no config.json")
        else:
            raise ChooseFile(repo, listing.weights)
    try:
        if folder:
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=FOLDER_PATTERNS,
                                          tqdm_class=tqdm_class))
            files = [p for p in sorted(path.rglob("*")) if p.is_file()]
        else:
            path = Path(hf_hub_download(repo, file, revision=revision, tqdm_class=tqdm_class))
            files = [path]
    except _errors() as e:
        raise _hub_error(e, repo, file or "") from e
    for f in files:
        verify(f)
    try:
        facts = describe(path)
    except HeaderError as e:
        raise HubError(f"{repo} {file or ''}: pulled, but it is not a model rwkv-chat reads: {e}") from e
    entry = ModelEntry(name=name or local_name(repo, file or ""), path=str(path), family=facts.family,
                       version=facts.version, size=facts.size, params=facts.params, format=facts.format,
                       repo=repo, revision=revision or "main", commit=_commit_of(path), file=file or "",
                       bytes=sum(os.path.getsize(os.path.realpath(f)) for f in files))
    return registry.add(entry)


def _blobs(path: str) -> set[str]:
    """The real files (cache blobs) behind a registry entry's path (a file or a folder)."""
    p = Path(path)
    if p.is_dir():
        return {os.path.realpath(f) for f in p.rglob("*") if f.is_file()}
    return {os.path.realpath(p)} if p.exists() else set()


def _repo_dir(path: Path) -> Path | None:
    """The cache folder of a repo (``models--owner--name``) that holds ``path``, or None."""
    for parent in path.parents:
        if parent.name.startswith("models--") and (parent / "snapshots").is_dir():
            return parent
    return None


def remove(name: str, data_dir: str | os.PathLike) -> tuple[ModelEntry, int]:
    """Forget the local model ``name`` and delete its files from huggingface_hub's cache where no other
    registry entry uses them (a repo folder left with no snapshot file is deleted whole). Returns the
    entry and the bytes freed. Raises RegistryError for an unknown name."""
    registry = Registry(data_dir)
    entry = registry.remove(name)
    keep = set().union(*(_blobs(e.path) for e in registry.entries()))
    path = Path(entry.path)
    repo_dir = _repo_dir(path)
    if repo_dir is None:                           # not from the cache: the files are the user's
        return entry, 0
    freed = 0
    links = [f for f in path.rglob("*") if f.is_symlink() or f.is_file()] if path.is_dir() else [path]
    for link in links:
        blob = os.path.realpath(link)
        if blob in keep:
            continue
        if os.path.exists(blob) and blob != str(link):
            freed += os.path.getsize(blob)
            os.unlink(blob)
        elif link.is_file() and not link.is_symlink():
            freed += link.stat().st_size
        link.unlink(missing_ok=True)
    snapshots = repo_dir / "snapshots"
    if not any(f.is_file() for f in snapshots.rglob("*")):
        shutil.rmtree(repo_dir, ignore_errors=True)
    return entry, freed
