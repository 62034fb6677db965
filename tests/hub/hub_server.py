"""A Hub-layout HTTP server on 127.0.0.1 for tests: the endpoints huggingface_hub calls to list and download.

- ``GET /api/models/{repo}[/revision/{rev}]``: model info (``id``, ``sha``, ``siblings``);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the file listing (``type``, ``path``, ``size``, ``oid``: the
  git blob SHA-1, ``lfs``: ``oid`` = SHA-256, ``size``, ``pointerSize`` for weight files);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: the file, with ``X-Repo-Commit``, ``ETag`` (the git SHA-1;
  for LFS files ``X-Linked-Etag`` = SHA-256 and ``X-Linked-Size``), ``Content-Length``, ``Accept-Ranges`` and
  ``Range`` requests (206, ``Content-Range``).

Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the Hub does.
Faults for tests: ``drop_once[path] = n`` closes the connection after ``n`` bytes of the next GET of ``path``
(its Content-Length promised the whole file); ``corrupt.add(path)`` serves ``path`` with one byte flipped while
its headers keep the true checksum. Every request is recorded in ``log`` as (method, url path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".pth", ".safetensors", ".bin")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Repo:
    """A repo: ``files`` maps the path in the repo to a file on disk (served as it is, never copied)."""

    def __init__(self, repo_id: str, files: dict[str, Path]):
        self.id = repo_id
        self.files = {k: Path(v) for k, v in files.items()}
        self.sha = hashlib.sha1(repo_id.encode()).hexdigest()
        self._meta: dict[str, dict] = {}

    def meta(self, path: str) -> dict:
        if path not in self._meta:
            data = self.files[path].read_bytes()
            m = {"size": len(data), "oid": git_sha1(data)}
            if path.endswith(LFS_SUFFIXES):
                m["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            self._meta[path] = m
        return self._meta[path]


class HubServer:
    """``HubServer(repos).start()``; ``endpoint`` is the URL for ``HF_ENDPOINT``."""

    def __init__(self, repos: list[Repo]):
        self.repos = {r.id: r for r in repos}
        self.log: list[tuple[str, str, str]] = []
        self.drop_once: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def gets(self, path: str) -> list[str]:
        """The Range headers ("" for none) of the GETs of file ``path``."""
        return [rng for method, url, rng in self.log if method == "GET" and url.endswith("/" + path)]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _json(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, code: int, error_code: str, repo: Repo | None = None):
                body = json.dumps({"error": error_code}).encode()
                self.send_response(code)
                self.send_header("X-Error-Code", error_code)
                if repo is not None:
                    self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, parts: list[str]) -> tuple[Repo | None, list[str]]:
                rid = "/".join(parts[:2])
                return hub.repos.get(rid), parts[2:]

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                url = urlparse(self.path)
                with hub._lock:
                    hub.log.append((self.command, unquote(url.path), self.headers.get("Range", "")))
                parts = [unquote(p) for p in url.path.strip("/").split("/")]
                if parts[:2] == ["api", "models"]:
                    return self._api(parts[2:])
                repo, rest = self._repo(parts)
                if repo is None:
                    return self._error(401, "RepoNotFound")
                if len(rest) < 3 or rest[0] != "resolve":
                    return self._error(404, "EntryNotFound", repo)
                if rest[1] not in ("main", repo.sha):
                    return self._error(404, "RevisionNotFound")
                self._file(repo, "/".join(rest[2:]))

            def _api(self, parts: list[str]):
                repo, rest = self._repo(parts)
                if repo is None:
                    return self._error(401, "RepoNotFound")
                if rest[:1] == ["revision"] or not rest:
                    if rest and rest[1] not in ("main", repo.sha):
                        return self._error(404, "RevisionNotFound")
                    return self._json({"id": repo.id, "sha": repo.sha, "private": False,
                                       "siblings": [{"rfilename": f} for f in sorted(repo.files)]})
                if rest[:1] == ["tree"] and len(rest) >= 2:
                    if rest[1] not in ("main", repo.sha):
                        return self._error(404, "RevisionNotFound")
                    prefix = "/".join(rest[2:])
                    items = [{"type": "file", "path": f, **repo.meta(f)} for f in sorted(repo.files)
                             if not prefix or f.startswith(prefix + "/")]
                    return self._json(items)
                return self._error(404, "EntryNotFound", repo)

            def _file(self, repo: Repo, path: str):
                if path not in repo.files:
                    return self._error(404, "EntryNotFound", repo)
                meta = repo.meta(path)
                data = repo.files[path].read_bytes()
                if path in hub.corrupt:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                start = 0
                rng = self.headers.get("Range", "")
                if rng.startswith("bytes=") and self.command == "GET":
                    start = int(rng[len("bytes="):].split("-")[0] or 0)
                body = data[start:]
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", repo.sha)
                self.send_header("ETag", f'"{meta["oid"]}"')
                if "lfs" in meta:
                    self.send_header("X-Linked-Etag", f'"{meta["lfs"]["oid"]}"')
                    self.send_header("X-Linked-Size", str(meta["size"]))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(body)))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return
                with hub._lock:
                    cut = hub.drop_once.pop(path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        return Handler
