"""``download``: fetch a Hub repository safely, resumably, and prove it arrived intact.

Everything network-facing goes through huggingface_hub (``HfApi.model_info`` for the listing with sizes and LFS
sha256, ``get_hf_file_metadata`` for access checks, ``http_get`` for the transfer, ``snapshot_download`` to
register the result in the library's own bookkeeping), so ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME`` and
``HF_HUB_OFFLINE`` behave as everywhere else.

Why not plain ``snapshot_download`` for the transfer: in huggingface_hub 2.x each file is written to a
process-unique ``<etag>.<random>.incomplete`` file, opened ``"wb"``, that is deleted on any exception (Ctrl-C
included) and never reused after a SIGKILL; only transient network errors inside one process resume with a
``Range`` request. A killed 4 GB shard therefore starts again from byte 0. Here each file is written to the
library's canonical incomplete path (``.cache/huggingface/download/<hash>.<etag>.incomplete`` for a local folder,
``blobs/<etag>.incomplete`` in the cache), opened for append, and ``http_get(resume_size=...)`` continues it with
a ``Range`` request. Only a file whose size and hash match the Hub is moved into place and recorded in the
library's metadata (``.metadata`` file or cache blob), so the final path never holds unverified bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from .disk import check_destination, free_bytes, human_bytes
from .errors import DownloadError, OutputError
from .layout import INDEX_NAME

SPACE_MARGIN_FRACTION = 0.02  # keep 2% of the planned bytes free on top of the plan ...
SPACE_MARGIN_MIN = 1 << 30  # ... and at least 1 GiB (other writers share the disk; the OS needs room too)
HASH_CHUNK = 8 << 20


@dataclass
class FileEntry:
    """One repository file: what the Hub says it is, and what this run did with it."""

    name: str
    size: int
    sha256: str | None  # LFS files: the content sha256 (also the file's ETag)
    blob_id: str | None  # git blob id (the ETag of non-LFS files)
    state: str = "planned"  # present | fetched | resumed | planned | bad | failed
    resumed_from: int = 0  # bytes of an earlier partial transfer kept at the start of this run
    transferred: int = 0  # bytes received in this run
    seconds: float = 0.0
    problem: str | None = None

    @property
    def etag(self) -> str:
        return self.sha256 or self.blob_id or ""


@dataclass
class DownloadReport:
    """The plan and the outcome of one ``download`` call."""

    repo_id: str
    revision: str
    commit: str | None
    destination: str  # the local folder, or the snapshot folder in the cache
    mode: str  # "local_dir" | "cache"
    offline: bool = False
    dry_run: bool = False
    files: list[FileEntry] = field(default_factory=list)
    total_bytes: int = 0  # all selected files
    present_bytes: int = 0  # already complete at the destination before the transfer
    resume_bytes: int = 0  # kept from earlier partial transfers
    need_bytes: int = 0  # still to transfer
    free_bytes: int = 0
    margin_bytes: int = 0
    transferred_bytes: int = 0
    seconds: float = 0.0
    problems: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # metadata that is off but changes no file's content

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def fits(self) -> bool:
        """Whether the free space holds what is left to download, with the margin."""
        return self.need_bytes + self.margin_bytes <= self.free_bytes

    @property
    def throughput(self) -> float:
        return self.transferred_bytes / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        d["fits"] = self.fits
        d["throughput"] = self.throughput
        return d


@dataclass
class DownloadPlan:
    """What a download will do, from one listing of the repository: the report so far (files, bytes, free space)
    and how to continue. Offline, the report is already the outcome (a check of the local copy)."""

    report: DownloadReport
    layout: object = field(repr=False, default=None)  # _LocalDir | _Cache (None offline)
    repo_names: set[str] = field(default_factory=set, repr=False)
    options: dict = field(default_factory=dict, repr=False)  # endpoint, token, cache_dir, workers, verify, repair

    def check_space(self, force: bool = False) -> None:
        r = self.report
        if not r.fits and not force:
            raise OutputError(
                f"not enough space at {self.layout.space_root}: {human_bytes(r.need_bytes)} to download + "
                f"{human_bytes(r.margin_bytes)} margin, {human_bytes(r.free_bytes)} free "
                "(free some space, choose another --local-dir, or pass --force)"
            )


def plan_download(
    repo_id: str,
    *,
    local_dir: str | Path | None = None,
    revision: str | None = None,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    max_workers: int = 8,
    verify: bool = True,
    repair: bool = False,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
) -> DownloadPlan:
    """List ``repo_id`` at ``revision`` once and plan its download into ``local_dir`` (or the HF cache): which files
    are complete, which partial, what is left, and the free space (nothing is written). Offline: check the local
    copy instead (``plan.report`` is the outcome). Endpoint, token, cache and offline mode default to
    huggingface_hub's settings (``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_OFFLINE``)."""
    from huggingface_hub import constants

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    cache_dir = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve()
    local = Path(local_dir).expanduser().resolve() if local_dir is not None else None
    allow, ignore = list(include) or None, list(exclude) or None
    _check_repo_id(repo_id)
    if offline is None:
        offline = constants.is_offline_mode()
    if not offline:
        check_destination(local if local is not None else cache_dir)
    if offline:
        return DownloadPlan(_offline(repo_id, revision, local, cache_dir, allow, ignore, verify, repair))

    commit, files, repo_names = _list_files(repo_id, revision, endpoint, token, allow, ignore)
    layout = _LocalDir(local, commit) if local is not None else _Cache(cache_dir, repo_id, commit)
    r = DownloadReport(
        repo_id=repo_id,
        revision=revision or "main",
        commit=commit,
        destination=str(layout.destination),
        mode=layout.mode,
        dry_run=True,
        files=files,
    )
    if files:
        _check_access(repo_id, commit, files[0].name, endpoint, token)
    # Preflight: what is already here (complete, partial), what is left, and whether it fits.
    for f in files:
        _classify(layout, f, dry_run=True, repair=repair)
    _tally(r, layout)
    opts = dict(
        endpoint=endpoint,
        token=token,
        cache_dir=cache_dir,
        max_workers=max_workers,
        verify=verify,
        repair=repair,
        revision=revision,
    )
    return DownloadPlan(r, layout, repo_names, opts)


def _tally(r: DownloadReport, layout) -> None:
    """The plan's byte counts from the files' states, and the free space with its margin."""
    files = r.files
    r.total_bytes = sum(f.size for f in files)
    r.present_bytes = sum(f.size for f in files if f.state == "present")
    r.resume_bytes = sum(f.resumed_from for f in files if f.state == "planned")
    r.need_bytes = sum(f.size - f.resumed_from for f in files if f.state == "planned")
    r.free_bytes = free_bytes(layout.space_root)
    r.margin_bytes = max(SPACE_MARGIN_MIN, int(r.need_bytes * SPACE_MARGIN_FRACTION)) if r.need_bytes else 0


def run_download(
    plan: DownloadPlan,
    *,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    on_file: Callable[[FileEntry], None] | None = None,
) -> DownloadReport:
    """Carry out ``plan``: refuse when the disk cannot hold it with a margin (unless ``force``), keep complete
    files, continue partial ones with a Range request, and with ``verify`` check each fetched file (size, LFS sha256
    or git blob id, safetensors header) before it is moved into place, and that every file the index names is
    present. ``repair`` also re-hashes files already present and fetches again any that fail. ``progress(n)`` gets
    the bytes received; ``on_file(entry)`` each file as it is done."""
    r = plan.report
    if r.offline:
        return r
    t0 = time.monotonic()
    layout, o = plan.layout, plan.options
    r.dry_run = False
    files = r.files
    for f in files:  # now for real: adopt files proven complete, drop bad partials (the plan only looked)
        f.state, f.resumed_from = "planned", 0
        _classify(layout, f, dry_run=False, repair=o["repair"])
    _tally(r, layout)
    plan.check_space(force)
    todo = sorted((f for f in files if f.state == "planned"), key=lambda f: -f.size)
    _transfer(
        layout, todo, r.repo_id, r.commit, o["endpoint"], o["token"], o["max_workers"], o["verify"], o["repair"],
        progress, on_file,
    )  # fmt: skip
    good = [f for f in files if f.state in ("present", "fetched", "resumed")]
    for f in files:
        if f.problem:
            r.problems.append({"kind": f.state, "file": f.name, "message": f.problem})
    if o["verify"]:
        r.problems += _index_problems(layout.final, files, plan.repo_names)
        r.warnings += _index_warnings(layout.final, files)
    if good:
        try:
            _register(
                layout, r.repo_id, o["revision"], r.commit, good, o["endpoint"], o["token"], o["cache_dir"],
                o["max_workers"],
            )  # fmt: skip
        except Exception as e:  # the files are intact; the next run records them
            r.problems.append({"kind": "register", "file": None, "message": f"{type(e).__name__}: {e}".splitlines()[0]})
    r.transferred_bytes = sum(f.transferred for f in files)
    r.seconds = time.monotonic() - t0
    return r


def download(
    repo_id: str,
    *,
    dry_run: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    on_file: Callable[[FileEntry], None] | None = None,
    **kw,
) -> DownloadReport:
    """Plan and run a download (``dry_run``: the plan only); see ``plan_download`` and ``run_download``."""
    plan = plan_download(repo_id, **kw)
    if dry_run:
        return plan.report
    return run_download(plan, force=force, progress=progress, on_file=on_file)


# --- where files live ------------------------------------------------------------------------------------------


class _LocalDir:
    """``--local-dir``: files at their repo paths; partials and ``.metadata`` under ``.cache/huggingface/download``."""

    mode = "local_dir"

    def __init__(self, root: Path, commit: str) -> None:
        self.root = root
        self.commit = commit
        self.destination = root
        self.space_root = root

    def _paths(self, f: FileEntry):
        from huggingface_hub._local_folder import get_local_download_paths

        return get_local_download_paths(self.root, f.name)

    def final(self, f: FileEntry) -> Path:
        return self.root / f.name

    def partial(self, f: FileEntry) -> Path:
        return self._paths(f).incomplete_path(f.etag)

    def lock(self, f: FileEntry) -> Path:
        return self._paths(f).lock_path

    def recorded(self, f: FileEntry) -> bool:
        """Complete per the library's metadata: same etag, not modified since it was written."""
        from huggingface_hub._local_folder import read_download_metadata

        if not self.final(f).is_file():
            return False
        m = read_download_metadata(self.root, f.name)
        return m is not None and m.etag == f.etag and self.final(f).stat().st_size == f.size

    def install(self, f: FileEntry, src: Path | None) -> None:
        """Move a verified file into place (``src`` None: it is already there) and record it as the library does."""
        from huggingface_hub._local_folder import write_download_metadata

        if src is not None:
            self.final(f).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, self.final(f))
        write_download_metadata(self.root, f.name, commit_hash=self.commit, etag=f.etag)

    def forget(self, f: FileEntry) -> None:
        """Drop a complete-but-bad file and its metadata so nothing treats it as done."""
        self._paths(f).metadata_path.unlink(missing_ok=True)
        self.final(f).unlink(missing_ok=True)


class _Cache:
    """The HF cache: content-addressed ``blobs/<etag>``; pointers in ``snapshots/<commit>/`` made by the library."""

    mode = "cache"

    def __init__(self, cache_dir: Path, repo_id: str, commit: str) -> None:
        from huggingface_hub.file_download import repo_folder_name

        folder = repo_folder_name(repo_id=repo_id, repo_type="model")
        self.storage = cache_dir / folder
        self.locks = cache_dir / ".locks" / folder
        self.destination = self.storage / "snapshots" / commit
        self.commit = commit
        self.space_root = cache_dir

    def final(self, f: FileEntry) -> Path:
        return self.storage / "blobs" / f.etag

    def partial(self, f: FileEntry) -> Path:
        return self.storage / "blobs" / f"{f.etag}.incomplete"

    def lock(self, f: FileEntry) -> Path:
        return self.locks / f"{f.etag}.lock"

    def recorded(self, f: FileEntry) -> bool:
        # The cache trusts a blob by its name (the etag); the library does the same.
        p = self.final(f)
        return p.is_file() and p.stat().st_size == f.size

    def install(self, f: FileEntry, src: Path | None) -> None:
        if src is not None:
            os.replace(src, self.final(f))

    def forget(self, f: FileEntry) -> None:
        self.final(f).unlink(missing_ok=True)
        (self.destination / f.name).unlink(missing_ok=True)


# --- listing and access --------------------------------------------------------------------------------------------


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise DownloadError(
            f"{repo_id!r} is not a valid repository id (expected owner/name, e.g. deepseek-ai/DeepSeek-V3)"
        ) from None


def _hub_error(e: Exception, repo_id: str, revision: str | None, endpoint: str) -> DownloadError | None:
    """A one-line DownloadError for the errors a user can fix, or None for anything else."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        from httpx2 import TransportError
    except ImportError:  # older huggingface_hub (requests-based)
        TransportError = ConnectionError  # noqa: N806

    login = "log in with `hf auth login` or set HF_TOKEN"
    if isinstance(e, HFValidationError):
        return DownloadError(
            f"{repo_id!r} is not a valid repository id (expected owner/name, e.g. deepseek-ai/DeepSeek-V3)"
        )
    if isinstance(e, GatedRepoError):
        return DownloadError(f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then {login}")
    if isinstance(e, RepositoryNotFoundError):
        return DownloadError(f"repository {repo_id} not found at {endpoint} (if it is private, {login})")
    if isinstance(e, RevisionNotFoundError):
        return DownloadError(f"revision {revision!r} not found in {repo_id}")
    if isinstance(e, HfHubHTTPError):
        status = e.response.status_code if e.response is not None else "?"
        hint = f"; {login}" if status in (401, 403) else ""
        return DownloadError(f"{endpoint} answered HTTP {status} for {repo_id}{hint}")
    if isinstance(e, (TransportError, ConnectionError)):
        return DownloadError(
            f"cannot reach {endpoint} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            "; check the network or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache"
        )
    return None


def _list_files(repo_id, revision, endpoint, token, allow, ignore) -> tuple[str, list[FileEntry], set[str]]:
    """Resolve the revision to a commit and list the selected files with sizes, sha256 and blob ids."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:
        err = _hub_error(e, repo_id, revision, endpoint)
        if err is None:
            raise
        raise err from None
    if not info.sha:
        raise DownloadError(f"{endpoint} did not return a commit for {repo_id}@{revision or 'main'}")
    entries = {
        s.rfilename: FileEntry(
            s.rfilename, s.lfs.size if s.lfs else (s.size or 0), s.lfs.sha256 if s.lfs else None, s.blob_id
        )
        for s in info.siblings or []
    }
    for name in entries:
        parts = PurePosixPath(name).parts
        if not parts or name.startswith("/") or ".." in parts or "\\" in name:
            raise DownloadError(f"{repo_id} lists an unsafe file name {name!r}; refusing to write outside the folder")
    picked = list(filter_repo_objects(sorted(entries), allow_patterns=allow, ignore_patterns=ignore))
    if not picked:
        asked = " ".join([*(f"--include {p!r}" for p in allow or ()), *(f"--exclude {p!r}" for p in ignore or ())])
        raise DownloadError(f"no file of {repo_id} ({len(entries)} files) is selected by {asked}")
    return info.sha, [entries[n] for n in picked], set(entries)


def _check_access(repo_id: str, commit: str, name: str, endpoint: str, token) -> None:
    """One HEAD before planning: gated repos list their files to anyone but refuse the bytes."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(
            hf_hub_url(repo_id, name, revision=commit, endpoint=endpoint), token=token, endpoint=endpoint
        )
    except Exception as e:
        err = _hub_error(e, repo_id, commit, endpoint)
        if err is None:
            raise
        raise err from None


# --- preflight, transfer, checks -----------------------------------------------------------------------------------


def _classify(layout, f: FileEntry, *, dry_run: bool, repair: bool) -> None:
    """Mark ``f`` present (complete and recorded) or planned (with the bytes of a partial transfer to keep)."""
    final = layout.final(f)
    if layout.mode == "local_dir" and not layout.root.exists():
        return  # nothing here yet; do not create bookkeeping folders for a dry run
    if layout.recorded(f):
        f.state = "present"
        if repair and not dry_run:
            problem = _check_file(final, f, hash_it=True)
            if problem:
                layout.forget(f)
                f.state, f.problem = "planned", None
        return
    if final.is_file() and not dry_run:
        # A file at the right place that the library has no record of (copied in, or killed between move and
        # metadata write): adopt it only if its bytes prove it.
        if _check_file(final, f, hash_it=True) is None:
            layout.install(f, None)
            f.state = "present"
            return
        layout.forget(f)
    part = layout.partial(f)
    if part.is_file():
        have = part.stat().st_size
        if have > f.size:
            if not dry_run:
                part.unlink()
            have = 0
        f.resumed_from = have


class _Counter:
    """A tqdm stand-in handed to ``http_get``: forwards received bytes, and stops the transfer on request."""

    def __init__(self, entry: FileEntry, progress: Callable[[int], None] | None, stop: threading.Event, **_kw):
        self.entry, self.progress, self.stop = entry, progress, stop

    def __enter__(self) -> _Counter:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass

    def update(self, n: int | float | None = 1) -> None:
        if self.stop.is_set():
            # Raised inside http_get's read loop: the partial file keeps what arrived, the next run continues it.
            raise _Stopped()
        n = int(n or 0)
        self.entry.transferred += n
        if self.progress is not None and n > 0:
            self.progress(n)


class _Stopped(Exception):
    pass


class _HashingFile:
    """What ``http_get`` writes to: the partial file, plus a running hash of everything in it (the bytes already
    there are hashed once, when it is opened), so that a fetched file is verified without being read again. If
    ``http_get`` rewinds it (a server that ignored the Range header), the running hash is dropped: ``digest()``
    returns None and the caller hashes the finished file instead."""

    def __init__(self, fh, h) -> None:
        self.fh, self.h = fh, h

    def write(self, b) -> int:
        n = self.fh.write(b)
        if self.h is not None:
            self.h.update(b)
        return n

    def tell(self) -> int:
        return self.fh.tell()

    def seek(self, pos: int, whence: int = 0) -> int:
        self.h = None
        return self.fh.seek(pos, whence)

    def truncate(self, size: int | None = None) -> int:
        self.h = None
        return self.fh.truncate(size)

    def digest(self) -> str | None:
        return None if self.h is None else self.h.hexdigest()


def _new_hash(f: FileEntry):
    """The hash the Hub gives for ``f``: sha256 of the content (LFS), or git's blob id (sha1 of a header + content)."""
    if f.sha256:
        return hashlib.sha256()
    if f.blob_id:
        h = hashlib.sha1()
        h.update(b"blob %d\0" % f.size)
        return h
    return None


def _fetch(layout, f: FileEntry, repo_id, commit, endpoint, token, progress, stop, hash_it) -> tuple[Path, str | None]:
    """Bring ``f``'s partial file up to its full size with huggingface_hub's ``http_get`` (Range when resuming);
    with ``hash_it``, also its digest (None: hash the file afterwards)."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = layout.partial(f)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    h = _new_hash(f) if hash_it else None
    if h is not None and have:
        _hash_into(h, part)
    url = hf_hub_url(repo_id, f.name, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token)
    with open(part, "ab") as fh:
        out = _HashingFile(fh, h)
        http_get(
            url,
            out,
            resume_size=have,
            headers=headers,
            expected_size=f.size,
            displayed_filename=f.name,
            tqdm_class=lambda **kw: _Counter(f, progress, stop, **kw),
        )
    return part, out.digest()


def _transfer(layout, todo, repo_id, commit, endpoint, token, max_workers, verify, repair, progress, on_file) -> None:
    from huggingface_hub.utils import WeakFileLock

    stop = threading.Event()
    fatal: list[DownloadError] = []

    def one(f: FileEntry) -> None:
        if stop.is_set():  # a fatal error or Ctrl-C elsewhere: do not start new files
            return
        t0 = time.monotonic()
        attempts = 2 if repair else 1
        lock = layout.lock(f)
        lock.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):
            resumed = f.resumed_from if attempt == 0 else 0
            try:
                # The library's per-file lock keeps a concurrent hf_hub_download of the same file out. It is not
                # reentrant, and install() takes it again to write the metadata, so it is released first.
                with WeakFileLock(lock):
                    part, digest = _fetch(layout, f, repo_id, commit, endpoint, token, progress, stop, verify)
                    problem = _check_file(part, f, hash_it=verify, header=verify, digest=digest)
                    if problem is not None:
                        # Never keep bytes that disagree with the Hub: the next attempt (or run) starts from zero.
                        part.unlink(missing_ok=True)
            except _Stopped:
                return
            except Exception as e:
                if _status(e) in (401, 403, 404):
                    # Access or existence: every other file would fail the same way.
                    fatal.append(_hub_error(e, repo_id, commit, endpoint) or DownloadError(str(e)))
                    stop.set()
                    return
                f.state, f.problem = "failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                break
            if problem is None:
                layout.install(f, part)
                f.state, f.problem = ("resumed" if resumed else "fetched"), None
                break
            f.state, f.problem = "bad", problem
        f.seconds = time.monotonic() - t0
        if on_file:
            on_file(f)

    pool = ThreadPoolExecutor(max_workers=max(1, max_workers), thread_name_prefix="dsv3-download")
    futures = [pool.submit(one, f) for f in todo]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in done:
            fut.result()
    except BaseException:
        # Ctrl-C: ask every worker to stop at its next chunk, keep the partial files, and leave quickly.
        stop.set()
        for fut in futures:
            fut.cancel()
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)
    if fatal:
        raise fatal[0]


def _status(e: Exception) -> int | None:
    resp = getattr(e, "response", None)
    return getattr(resp, "status_code", None)


def _hash_into(h, path: Path) -> None:
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])


def _file_digest(path: Path, f: FileEntry) -> str:
    """The finished file's hash, of the kind the Hub gives for ``f`` (read from disk)."""
    h = _new_hash(f)
    _hash_into(h, path)
    return h.hexdigest()


def _check_file(
    path: Path, f: FileEntry, *, hash_it: bool = True, header: bool = True, digest: str | None = None
) -> str | None:
    """None when ``path`` holds exactly ``f`` (size, then LFS sha256 or git blob id, then safetensors header);
    ``digest``: the file's hash, computed while it was written (else it is read and hashed here)."""
    size = path.stat().st_size
    if size != f.size:
        return f"size {size} bytes, the Hub says {f.size}"
    if hash_it and f.sha256:
        got = digest or _file_digest(path, f)
        if got != f.sha256:
            return f"sha256 {got[:16]}... differs from the Hub's {f.sha256[:16]}..."
    elif hash_it and f.blob_id:
        got = digest or _file_digest(path, f)
        if got != f.blob_id:
            return f"git blob id {got[:12]}... differs from the Hub's {f.blob_id[:12]}..."
    if header and f.name.endswith(".safetensors"):
        from .errors import CheckpointError
        from .stfile import read_header

        try:
            read_header(path, rel=f.name)
        except CheckpointError as e:
            return f"safetensors header: {e.detail}"
    return None


def _index_problems(where: Callable[[FileEntry], Path], files: list[FileEntry], repo_names: set[str]) -> list[dict]:
    """Every file the index names must be in the repo and at the destination (when shards were selected)."""
    import json

    by_name = {f.name: f for f in files}
    idx = by_name.get(INDEX_NAME)
    if idx is None or idx.state not in ("present", "fetched", "resumed"):
        return []
    if not any(n.endswith(".safetensors") for n in by_name):
        return []  # e.g. --include "*.json": the shards were not asked for
    try:
        weight_map = json.loads(where(idx).read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [{"kind": "bad_index", "file": INDEX_NAME, "message": f"unreadable index: {e}"}]
    problems = []
    for name in sorted(set(weight_map.values())):
        if name not in repo_names:
            problems.append({"kind": "missing_file", "file": name, "message": "named in the index but not in the repo"})
        elif name not in by_name:
            problems.append(
                {
                    "kind": "missing_file",
                    "file": name,
                    "message": "named in the index but excluded by --include/--exclude",
                }
            )
        elif by_name[name].state == "planned":  # bad or failed files are named already
            problems.append({"kind": "missing_file", "file": name, "message": "named in the index but not downloaded"})
    return problems


def _index_warnings(where: Callable[[FileEntry], Path], files: list[FileEntry]) -> list[str]:
    """The index's ``metadata.total_size`` against the tensor bytes of the files it names (each file's size less its
    header, read from its first 8 bytes): a wrong value changes no tensor, so it is a warning, not a problem."""
    import json

    by_name = {f.name: f for f in files}
    idx = by_name.get(INDEX_NAME)
    if idx is None or idx.state not in ("present", "fetched", "resumed"):
        return []
    try:
        index = json.loads(where(idx).read_text())
        total, names = index["metadata"]["total_size"], set(index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a missing total_size is not checked here; an unreadable index is a problem already
    data = 0
    for name in sorted(names):
        f = by_name.get(name)
        if f is None or f.state not in ("present", "fetched", "resumed"):
            return []  # not every shard is here: nothing to compare with
        try:
            with open(where(f), "rb") as fh:
                data += f.size - 8 - int.from_bytes(fh.read(8), "little")
        except OSError:
            return []
    if total == data:
        return []
    return [
        f"{INDEX_NAME}: metadata.total_size is {total}, the shards' tensors hold {data} bytes (no tensor is affected)"
    ]


def _register(layout, repo_id, revision, commit, good, endpoint, token, cache_dir, max_workers) -> None:
    """Let huggingface_hub record what is now complete: cache pointers and refs, the tree listing for offline use.

    Files already recorded return without a request; a new cache blob gets its ``snapshots/`` pointer from one HEAD.
    """
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id,
        revision=commit,
        cache_dir=str(cache_dir),
        local_dir=str(layout.root) if layout.mode == "local_dir" else None,
        allow_patterns=[_literal(f.name) for f in good],
        max_workers=max_workers,
        endpoint=endpoint,
        token=token,
        tqdm_class=_quiet_tqdm(),
    )
    # A branch or tag name resolves offline through refs/<revision> (the cache layout huggingface_hub documents).
    rev = revision or "main"
    if rev != commit:
        from huggingface_hub.file_download import repo_folder_name

        ref = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model") / "refs" / rev
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)


def _quiet_tqdm() -> type:
    """A tqdm class that never draws (the library's ``silent_tqdm`` lacks methods snapshot_download calls)."""
    from huggingface_hub.utils.tqdm import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- offline -------------------------------------------------------------------------------------------------------


def _offline(repo_id, revision, local: Path | None, cache_dir: Path, allow, ignore, verify, repair) -> DownloadReport:
    """HF_HUB_OFFLINE: no request at all; locate the copy through huggingface_hub and check what it holds (with
    ``repair``, also each file's hash against the one recorded when it was fetched)."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, LocalEntryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    rev = revision or "main"
    try:
        path = Path(
            snapshot_download(
                repo_id,
                revision=rev,
                cache_dir=str(cache_dir),
                local_dir=str(local) if local else None,
                allow_patterns=allow,
                ignore_patterns=ignore,
                local_files_only=True,
                tqdm_class=_quiet_tqdm(),
            )
        )
    except LocalEntryNotFoundError:
        where = local or cache_dir
        raise DownloadError(
            f"offline (HF_HUB_OFFLINE=1) and no complete copy of {repo_id}@{rev} in {where}: download it once with "
            "the network on (unset HF_HUB_OFFLINE), or point --local-dir / HF_HOME at a folder that holds it"
        ) from None
    r = DownloadReport(
        repo_id=repo_id,
        revision=rev,
        commit=None,
        destination=str(path),
        mode="local_dir" if local else "cache",
        offline=True,
    )
    try:
        listing = {
            f.path: f
            for f in get_cached_repo_tree(
                repo_id, revision=rev, cache_dir=str(cache_dir), local_dir=str(local) if local else None
            )
        }
        r.commit = path.name if local is None else None
    except CachedRepoTreeNotFoundError:
        listing = {}
    if listing:
        names = list(filter_repo_objects(sorted(listing), allow_patterns=allow, ignore_patterns=ignore))
        files = [FileEntry(n, listing[n].size, None, listing[n].blob_id) for n in names]
    else:  # no listing cached: check what is on disk
        names = sorted(
            p.relative_to(path).as_posix()
            for p in path.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(path).parts
        )
        files = [FileEntry(n, (path / n).stat().st_size, None, None) for n in names]
    for f in files:
        p = path / f.name
        if not p.is_file():
            f.state, f.problem = "failed", "missing from the local copy"
        else:
            # Sizes and headers are cheap; hashes (with repair) are checked against the etag the download recorded.
            etag = _recorded_etag(p, f.name, local) if repair else None
            want = FileEntry(
                f.name, f.size, etag if etag and len(etag) == 64 else None, etag if etag and len(etag) == 40 else None
            )
            f.problem = _check_file(p, want, hash_it=bool(etag), header=verify)
            f.state = "bad" if f.problem else "present"
        if f.problem:
            r.problems.append({"kind": f.state, "file": f.name, "message": f.problem})
    r.files = files
    r.total_bytes = r.present_bytes = sum(f.size for f in files if f.state == "present")
    if verify:
        r.problems += _index_problems(lambda f: path / f.name, files, set(listing) or {f.name for f in files})
    return r


def _recorded_etag(p: Path, name: str, local: Path | None) -> str | None:
    """The Hub's hash of a file fetched earlier: LFS sha256 (64 hex) or git blob id (40), from the library's own
    records: the blob a cache snapshot points to is named by it; a local folder keeps it in its download metadata."""
    if local is None:
        etag = Path(os.path.realpath(p)).name
    else:
        from huggingface_hub._local_folder import read_download_metadata

        meta = read_download_metadata(local, name)
        etag = meta.etag if meta else ""
    return etag if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", etag) else None
