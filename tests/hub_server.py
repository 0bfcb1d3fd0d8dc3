"""A loopback stand-in for the Hugging Face Hub, for the download tests (standard library only).

It implements the endpoints huggingface_hub's download path calls (FORMAT.md section 5):

- ``GET /api/models/{repo}[/revision/{rev}][?blobs=true]``: repo info with the commit ``sha`` and ``siblings``
  (size, blobId and, for LFS files, ``lfs.sha256``);
- ``GET /api/models/{repo}/tree/{rev}?recursive=true``: the file listing with LFS metadata;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob id), ``Content-Length``,
  ``X-Linked-Size`` / ``X-Linked-Etag`` (sha256) for LFS files, ``Accept-Ranges`` and ``Range`` (206) support.

It never advertises Xet storage (no ``X-Xet-Hash`` header, no ``xetHash`` in listings), so the client always takes
the plain HTTP path even when ``hf_xet`` is installed. Switches let a test throttle transfers, cut a connection after
K bytes, corrupt served bytes, and answer 401/403 (gated) or 404 (missing). Every GET body byte is counted per file
and every Range header is logged, so tests can prove what a resumed download transferred.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``blobId`` / ``oid``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Revision:
    commit: str
    files: dict[str, bytes]


@dataclass
class Repo:
    revisions: dict[str, Revision]  # branch/tag name -> revision; commits are looked up by sha too
    gated: bool = False

    def find(self, rev: str) -> Revision | None:
        if rev in self.revisions:
            return self.revisions[rev]
        for r in self.revisions.values():
            if r.commit == rev:
                return r
        return None


@dataclass
class GetRecord:
    repo: str
    path: str
    range: str | None
    status: int
    sent: int = 0


@dataclass
class HubState:
    """Everything the handler reads (repos, switches) and writes (counters), behind one lock."""

    repos: dict[str, Repo] = field(default_factory=dict)
    tokens: set[str] = field(default_factory=lambda: {"hf_test_token"})
    throttle_bps: int | None = None  # bytes per second per response body
    cut_after: dict[str, int] = field(default_factory=dict)  # path -> close the connection after K body bytes (once)
    corrupt: dict[str, int] = field(default_factory=dict)  # path -> offset of a byte served XOR 0xFF
    ignore_range: bool = False  # answer a Range request with 200 and the whole file (servers that do)
    served: dict[str, int] = field(default_factory=dict)  # path -> GET body bytes sent
    gets: list[GetRecord] = field(default_factory=list)
    heads: list[str] = field(default_factory=list)
    api_calls: list[str] = field(default_factory=list)
    sending: int = 0  # response bodies being written right now
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset_counters(self) -> None:
        # A body still being written (to a client killed a moment ago, say) would count into the new counters:
        # wait for it to end first.
        deadline = time.monotonic() + 10
        while self.sending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.sending, "a response body is still being sent"
        with self.lock:
            self.served.clear()
            self.gets.clear()
            self.heads.clear()
            self.api_calls.clear()

    def total_served(self) -> int:
        with self.lock:
            return sum(self.served.values())

    def requests(self) -> int:
        with self.lock:
            return len(self.gets) + len(self.heads) + len(self.api_calls)


def _is_lfs(path: str) -> bool:
    return path.endswith(LFS_SUFFIXES)


_ENTRIES: dict[tuple[int, str], dict] = {}  # (id of the bytes, path) -> entry: hash big files once
_ENTRIES_LOCK = threading.Lock()


def _entry(path: str, data: bytes) -> dict:
    """Size and ids of one file as the Hub lists them (sibling / tree entry share these fields)."""
    key = (id(data), path)
    with _ENTRIES_LOCK:
        hit = _ENTRIES.get(key)
        if hit is not None and hit["data"] is data:
            return hit
    d: dict = {"size": len(data), "oid": git_blob_id(data), "data": data}
    if _is_lfs(path):
        d["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
    with _ENTRIES_LOCK:
        _ENTRIES[key] = d
    return d


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (quiet: tests read counters, not logs)
        pass

    # --- plumbing ---------------------------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str, head: bool = False, commit: str | None = None):
        h = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            h["X-Error-Code"] = code
        if commit:
            h["X-Repo-Commit"] = commit
        self._reply(status, json.dumps({"error": message}).encode(), h, head=head)

    def _json(self, obj) -> None:
        self._reply(200, json.dumps(obj).encode(), {"Content-Type": "application/json"})

    def _authorized(self, repo: Repo) -> int | None:
        """None when the caller may read ``repo``; else 401 (no token) or 403 (token not granted)."""
        if not repo.gated:
            return None
        auth = self.headers.get("authorization") or ""
        if not auth.lower().startswith("bearer "):
            return 401
        return None if auth.split(" ", 1)[1].strip() in self.server.state.tokens else 403

    def _lookup(self, repo_id: str, rev: str, head: bool = False) -> tuple[Repo, Revision] | None:
        repo = self.server.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return None
        denied = self._authorized(repo)
        if denied is not None:
            self._error(denied, "GatedRepo", f"Access to model {repo_id} is restricted.", head=head)
            return None
        r = repo.find(rev)
        if r is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
            return None
        return repo, r

    # --- endpoints --------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        st = self.server.state
        if len(parts) == 4 and parts[:2] == ["api", "models"]:
            parts += ["revision", "main"]  # no revision: the default branch
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] in ("revision", "tree"):
            repo_id, kind, rev = f"{parts[2]}/{parts[3]}", parts[4], parts[5]
            with st.lock:
                st.api_calls.append(self.path)
            found = self._lookup(repo_id, rev, head=head)
            if found is None:
                return
            repo, r = found
            if kind == "revision":
                siblings = []
                for p, data in sorted(r.files.items()):
                    e = _entry(p, data)
                    sib = {"rfilename": p, "size": e["size"], "blobId": e["oid"]}
                    if "lfs" in e:
                        sib["lfs"] = e["lfs"]
                    siblings.append(sib)
                self._json(
                    {
                        "id": repo_id,
                        "sha": r.commit,
                        "private": False,
                        "gated": "manual" if repo.gated else False,
                        "siblings": siblings,
                    }
                )
            else:
                tree = []
                for p, data in sorted(r.files.items()):
                    e = _entry(p, data)
                    t = {"type": "file", "path": p, "size": e["size"], "oid": e["oid"]}
                    if "lfs" in e:
                        t["lfs"] = {"oid": e["lfs"]["sha256"], "size": e["size"], "pointerSize": 134}
                    tree.append(t)
                self._json(tree)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), head)
            return
        self._error(404, None, f"no route for {url.path}", head=head)

    def _resolve(self, repo_id: str, rev: str, path: str, head: bool) -> None:
        st = self.server.state
        found = self._lookup(repo_id, rev, head=head)
        if found is None:
            return
        _, r = found
        data = r.files.get(path)
        if data is None:
            self._error(404, "EntryNotFound", f"{path} does not exist", head=head, commit=r.commit)
            return
        e = _entry(path, data)
        h = {
            "X-Repo-Commit": r.commit,
            "ETag": f'"{e["oid"]}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if "lfs" in e:
            h["X-Linked-Size"] = str(e["size"])
            h["X-Linked-Etag"] = f'"{e["lfs"]["sha256"]}"'
        if head:
            with st.lock:
                st.heads.append(path)
            self.send_response(200)
            for k, v in h.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not st.ignore_range:
            # Only the form the client sends: "bytes=START-" (resume).
            spec = rng.strip().removeprefix("bytes=")
            start = int(spec.split("-", 1)[0])
            if start >= len(data):
                self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            h["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        rec = GetRecord(repo_id, path, rng, status)
        with st.lock:
            st.gets.append(rec)
            st.sending += 1  # until the body is sent or the connection drops (the finally below)
            cut = st.cut_after.pop(path, None)
            bad = st.corrupt.get(path)
            bps = st.throttle_bps
        body = bytearray(data[start:])
        if bad is not None and start <= bad < len(data):
            body[bad - start] ^= 0xFF
        chunk = 16384
        pos = 0
        try:
            self.send_response(status)
            for k, v in h.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            while pos < len(body):
                n = min(chunk, len(body) - pos)
                if cut is not None:
                    n = min(n, cut - pos)
                    if n <= 0:
                        # Drop the connection mid-body: the client sees a short read.
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                self.wfile.write(body[pos : pos + n])
                pos += n
                with st.lock:
                    st.served[path] = st.served.get(path, 0) + n
                    rec.sent += n
                if bps:
                    time.sleep(n / bps)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with st.lock:
                st.sending -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: HubState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


class HubServer:
    """A running loopback Hub: ``endpoint`` is its URL, ``state`` its repos, switches and counters."""

    def __init__(self) -> None:
        self.state = HubState()
        self._srv = _Server(self.state)
        self.endpoint = f"http://127.0.0.1:{self._srv.server_address[1]}"
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._srv.shutdown()
        self._srv.server_close()

    def add_repo(self, repo_id: str, revisions: dict[str, dict[str, bytes]], gated: bool = False) -> dict[str, str]:
        """Serve ``repo_id`` with ``{name: {path: bytes}}``; returns ``{name: commit}`` (deterministic shas)."""
        revs = {}
        for name, files in revisions.items():
            h = hashlib.sha1(repo_id.encode() + name.encode())
            for p in sorted(files):
                h.update(p.encode() + hashlib.sha256(files[p]).digest())
            revs[name] = Revision(h.hexdigest(), dict(files))
        self.state.repos[repo_id] = Repo(revs, gated=gated)
        return {n: r.commit for n, r in revs.items()}


def read_folder(path: Path) -> dict[str, bytes]:
    """All files of a checkpoint folder as ``{relative path: bytes}``."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
