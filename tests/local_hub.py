"""A stand-in for the Hugging Face Hub's resolve endpoint and for Google Drive, on 127.0.0.1.

A stdlib ``ThreadingHTTPServer`` answers what ``huggingface_hub.hf_hub_download`` asks
(``HEAD`` then ``GET`` of ``/{repo}/resolve/{revision}/{file}``): ``X-Repo-Commit``, an ``ETag``
(git's blob sha1 for small files; for LFS files, .safetensors and .bin, a 302 to
``/lfs/<repo>/<sha256>`` on a second server with ``X-Linked-Etag`` / ``X-Linked-Size``),
``X-Error-Code`` on 404 (RepoNotFound, RevisionNotFound, EntryNotFound) and 403 GatedRepo.
``/drive/<id>`` serves what gdown is given.
Byte ranges are honoured (resumed downloads). Every request is recorded; faults on demand: a
connection cut half-way (``cut``), content other than its ETag says (``damaged``), an HTML
page instead of a file (``drive_html``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import re
import threading
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".tar")
QUOTA_PAGE = (
    b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
    b'<p class="uc-error-subcaption">Too many users have viewed or downloaded this file '
    b"recently. Please try accessing the file again later.</p></body></html>"
)


_HASHES: dict[tuple[int, str], tuple[bytes, str]] = {}  # servers of one test session share them


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    gated: bool = False


class LocalHub:
    """The server and what it serves; ``url`` is its endpoint (HF_ENDPOINT)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.drive: dict[str, bytes] = {}
        self.drive_html: set[str] = set()
        self.cut: set[str] = set()  # paths whose next GET stops half-way (then served whole)
        self.damaged: set[tuple[str, str]] = set()  # (repo, file) served with a byte changed
        self.requests: list[tuple[str, str]] = []
        self.ranges: list[tuple[str, str]] = []  # (path, Range header) of resumed GETs
        self._lfs: dict[str, bytes] = {}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, head=True)

            def do_GET(self) -> None:
                hub._answer(self, head=False)

        # The Hub, and its "CDN" (another origin: huggingface_hub does not follow a HEAD there)
        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in "ab"]
        self.url, self.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        for server in self.servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def add_folder(self, repo: str, folder: Path, *, gated: bool = False) -> str:
        """Serve every file of ``folder`` as ``repo`` at a commit named by their content."""
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        return self.add_repo(repo, files, gated=gated)

    def add_repo(self, repo: str, files: dict[str, bytes], *, gated: bool = False) -> str:
        """Serve ``files`` (name -> content) as ``repo``; returns its commit."""
        commit = hashlib.sha1(
            repr(sorted((k, self._sha(v, "1")) for k, v in files.items())).encode()
        )
        self.repos[repo] = Repo(dict(files), commit.hexdigest(), gated)
        return self.repos[repo].commit

    def _sha(self, data: bytes, kind: str) -> str:
        """git's sha1 ("1") or the sha256 ("256") of ``data``, once per object and session."""
        key = (id(data), kind)
        if key not in _HASHES:  # the object is kept alive with its digest: ids stay unique
            _HASHES[key] = (
                data,
                git_sha1(data) if kind == "1" else hashlib.sha256(data).hexdigest(),
            )
        return _HASHES[key][1]

    def lfs_path(self, repo: str, filename: str) -> str:
        """The path an LFS file of ``repo`` is served from (by the "CDN")."""
        return f"/lfs/{repo}/" + self._sha(self.repos[repo].files[filename], "256")

    def gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET"]

    def close(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()

    # ----------------------------------------------------------------------------------------

    def _answer(self, h: http.server.BaseHTTPRequestHandler, head: bool) -> None:
        self.requests.append(("HEAD" if head else "GET", h.path))
        if h.headers.get("Range"):
            self.ranges.append((h.path, h.headers["Range"]))
        path = h.path.split("?")[0]
        if path.startswith("/lfs/"):
            return self._send(h, self._lfs.get(path[5:]), head, path)
        if path.startswith("/drive/"):
            key = path[7:]
            if key in self.drive_html:
                return self._send(h, QUOTA_PAGE, head, path, "text/html; charset=utf-8")
            return self._send(h, self.drive.get(key), head, path)
        m = re.fullmatch(r"/(?:api/models/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None:
            return self._error(h, 404, "EntryNotFound")
        repo_id, revision, filename = m.groups()
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(h, 404, "RepoNotFound")
        if repo.gated:
            return self._error(h, 403, "GatedRepo")
        if revision not in ("main", repo.commit):
            return self._error(h, 404, "RevisionNotFound")
        data = repo.files.get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", repo.commit)
        served = data
        if (repo_id, filename) in self.damaged:
            served = bytes([data[0] ^ 0xFF]) + data[1:]
        if filename.endswith(LFS_SUFFIXES):
            sha = self._sha(data, "256")
            self._lfs[f"{repo_id}/{sha}"] = served
            h.send_response(302)
            h.send_header("Location", f"{self.cdn}/lfs/{repo_id}/{sha}")
            h.send_header("X-Repo-Commit", repo.commit)
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("ETag", f'"{git_sha1(b"lfs pointer " + sha.encode())}"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return None
        extra = {"X-Repo-Commit": repo.commit, "ETag": f'"{self._sha(data, "1")}"'}
        return self._send(h, served, head, path, extra=extra)

    def _error(self, h, status: int, code: str, commit: str | None = None) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _send(self, h, data, head, path, content_type="application/octet-stream", extra=None):
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        start = 0
        if (r := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))) and not head:
            start = int(r.group(1))
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data) - start))
        h.send_header("Accept-Ranges", "bytes")
        for key, value in (extra or {}).items():
            h.send_header(key, value)
        h.end_headers()
        if head:
            return None
        body = data[start:]
        if path in self.cut:
            self.cut.discard(path)
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the peer sees the connection end mid-body
            return None
        h.wfile.write(body)
        return None
