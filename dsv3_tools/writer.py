"""Streaming safetensors writing, atomic finish, and the output manifest that makes runs resumable.

A file is planned from its tensor list (names, dtypes, shapes) so its header is known before any data;
data is then written in that order, hashed on the way, and the file appears under its final name only
once complete (temporary name, fsync, rename). ``Manifest`` records each finished output with its size and
sha256; a re-run keeps files that match it and redoes the rest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from . import __version__
from .disk import LOCK_NAME
from .errors import OutputError, disk_error
from .layout import MANIFEST_NAME
from .pipeline import Stopped, WriteBehind, first_error, get_until
from .stfile import Entry, dtype_name, header_entries, parse_header, plan_header, torch_shape

PARTIAL_SUFFIX = ".partial"
TOOL_VERSION = __version__  # recorded in every manifest


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str


def _hash_chunks(h: hashlib._Hash, data: memoryview, chunk: int = 1 << 24) -> None:
    for i in range(0, len(data), chunk):
        h.update(data[i : i + chunk])


_ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to the logical block size
_STAGE = 16 << 20  # bytes per direct write; a multiple of _ALIGN


class _BackgroundSink:
    """Hashes and writes appended chunks on helper threads (hash -> stage -> write, ``pipeline.WriteBehind``
    stages sharing one stop event), so that the caller's compute, sha256, the staging copy and the disk all overlap.
    The caller hands each buffer over: it must not change it after ``put``.

    With ``direct``, data goes through page-aligned staging buffers to an ``O_DIRECT`` descriptor: on the VMs this
    was measured on, that writes faster than the page cache and leaves no dirty pages behind (see
    docs/benchmarks.md). The unaligned tail is written through an ordinary descriptor at the end. Where the file
    system refuses ``O_DIRECT`` (tmpfs), plain buffered writes are used.
    """

    def __init__(self, tmp: Path, direct: bool, depth: int = 8) -> None:
        self.tmp = tmp
        self.h = hashlib.sha256()
        self.fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.dfd = os.open(tmp, os.O_WRONLY | os.O_DIRECT)
            except OSError:
                self.dfd = -1
        self.pos = 0  # file offset of the next byte handed to the io thread
        self._stop = threading.Event()
        self._free: queue.Queue = queue.Queue()
        if self.dfd >= 0:
            for _ in range(3):
                self._free.put(mmap.mmap(-1, _STAGE))
        self._stage: mmap.mmap | None = None
        self._fill = 0
        self._io = WriteBehind(self._write_item, depth=2, name="dsv3-w-io", stop=self._stop)
        self._staging = (
            WriteBehind(self._stage_chunk, depth=depth, name="dsv3-w-stage", on_end=self._flush_stage, stop=self._stop)
            if self.dfd >= 0
            else None
        )
        self._hash = WriteBehind(self._hash_chunk, depth=depth, name="dsv3-w-hash", stop=self._stop)
        self._stages = [s for s in (self._hash, self._staging, self._io) if s is not None]

    def check(self) -> None:
        err = first_error(self._stages)
        if err is not None:
            raise err

    # -- caller side
    def put(self, mv: memoryview) -> None:
        if len(mv):
            try:
                self._hash.put(mv)
            except Stopped:
                self.check()
                raise

    def close(self) -> None:
        """Drain, write the tail, fsync; raise what a helper thread hit."""
        try:
            for s in self._stages:  # upstream first: each drains into the next
                s.close()
            self.check()
        except BaseException:
            self.abort()
            raise
        os.fsync(self.fd)
        self._close_fds()

    def abort(self) -> None:
        for s in self._stages:
            s.abort()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1

    # -- helper threads
    def _hash_chunk(self, mv: memoryview) -> None:
        _hash_chunks(self.h, mv)
        (self._staging or self._io).put(mv)

    def _stage_chunk(self, mv: memoryview) -> None:
        import numpy as np  # numpy's copy releases the GIL (memoryview slice assignment would hold it)

        src = np.frombuffer(mv, dtype=np.uint8)
        i = 0
        while i < len(src):
            if self._stage is None:
                self._stage = get_until(self._free, self._stop)
                self._fill = 0
            k = min(len(src) - i, _STAGE - self._fill)
            np.copyto(np.frombuffer(self._stage, dtype=np.uint8)[self._fill : self._fill + k], src[i : i + k])
            self._fill += k
            i += k
            if self._fill == _STAGE:
                self._io.put((self._stage, _STAGE))
                self._stage = None

    def _flush_stage(self) -> None:
        if self._stage is not None and self._fill:
            self._io.put((self._stage, self._fill))
            self._stage = None

    def _write_item(self, item: memoryview | tuple) -> None:
        if not isinstance(item, tuple):
            self._pwrite(self.fd, item)
            return
        buf, n = item
        aligned = n - n % _ALIGN
        if aligned:
            try:
                self._pwrite(self.dfd if self.dfd >= 0 else self.fd, memoryview(buf)[:aligned])
            except OSError as e:
                if e.errno != errno.EINVAL or self.dfd < 0:
                    raise
                # Some file systems accept O_DIRECT at open and refuse the writes: go buffered.
                os.close(self.dfd)
                self.dfd = -1
                self._pwrite(self.fd, memoryview(buf)[:aligned])
        if aligned < n:  # only the very last block can be short
            self._pwrite(self.fd, memoryview(buf)[aligned:n])
        self._free.put(buf)

    def _pwrite(self, fd: int, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            done += os.pwrite(fd, mv[done:], self.pos + done)
        self.pos += len(mv)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    import torch

    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in planned order, atomically."""

    def __init__(
        self,
        path: str | Path,
        entries: list[Entry],
        metadata: dict[str, str] | None = None,
        *,
        background: bool = False,
        direct: bool = False,
        header: bytes | None = None,
    ) -> None:
        """``background``: hash and write on helper threads; the caller then hands over every buffer it passes
        (it must not reuse or modify it). ``direct`` (with ``background``): write through ``O_DIRECT``. ``header``:
        these header bytes (length prefix included) instead of planned ones, e.g. to reproduce an original file;
        they must describe exactly ``entries``, in that data order."""
        self.path = Path(path)
        self.entries = list(entries)
        planned, self.offsets = plan_header(self.entries, metadata)
        if header is not None:
            h = parse_header(header[8:], None, self.path.name)
            got = {i.name: (i.start - h.data_start, i.end - h.data_start) for i in h.tensors.values()}
            if got != self.offsets or header_entries(h) != [(n, d, tuple(s)) for n, d, s in self.entries]:
                raise AssertionError(f"{self.path.name}: the given header does not describe the planned tensors")
        header = planned if header is None else header
        self.data_start = len(header)
        self.size = self.data_start + (max((e for _, e in self.offsets.values()), default=0))
        self.tmp = self.path.with_name("." + self.path.name + PARTIAL_SUFFIX)
        self._sink = _BackgroundSink(self.tmp, direct) if background else None
        self._f = open(self.tmp, "wb") if self._sink is None else None
        self._h = hashlib.sha256() if self._sink is None else self._sink.h
        self._next = 0
        self._part = 0  # bytes of the next tensor already written by write_part
        self._write(memoryview(header))

    def _write(self, mv: memoryview) -> None:
        try:
            if self._sink is not None:
                self._sink.put(mv)
                return
            self._f.write(mv)
        except OSError as e:
            raise disk_error(e, self.path) or e from None
        _hash_chunks(self._h, mv)

    @property
    def next_name(self) -> str | None:
        return self.entries[self._next][0] if self._next < len(self.entries) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor's data; it must be the next one planned, with the planned dtype and shape."""
        if self._next >= len(self.entries) or self.entries[self._next][0] != name:
            raise AssertionError(f"write order: expected {self.next_name!r}, got {name!r}")
        _, dtype, shape = self.entries[self._next]
        if dtype_name(tensor.dtype) != dtype or tuple(tensor.shape) != torch_shape(dtype, tuple(shape)):
            raise AssertionError(f"{name}: planned {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}")
        self.write_raw(name, tensor_bytes(tensor))

    def write_raw(self, name: str, data: memoryview) -> None:
        """Append raw bytes for the next planned tensor (already in its dtype's byte layout)."""
        b, e = self.offsets[name]
        if self.entries[self._next][0] != name or len(data) != e - b or self._part:
            raise AssertionError(f"{name}: expected {e - b} bytes as tensor #{self._next}, got {len(data)}")
        self._write(data)
        self._next += 1

    def write_part(self, name: str, data: memoryview) -> None:
        """Append the next bytes of the next planned tensor; it is complete once all its bytes are in.

        Lets callers stream a tensor larger than the memory they want to hold, in as many pieces as they like.
        """
        b, e = self.offsets[name]
        if self._next >= len(self.entries) or self.entries[self._next][0] != name or self._part + len(data) > e - b:
            raise AssertionError(f"{name}: {len(data)} more bytes do not fit tensor #{self._next} ({self.next_name!r})")
        self._write(data)
        self._part += len(data)
        if self._part == e - b:
            self._next += 1
            self._part = 0

    def finish(self) -> FileRecord:
        """Check completeness, flush to disk, rename to the final name."""
        if self._next != len(self.entries):
            raise AssertionError(f"{self.path.name}: {len(self.entries) - self._next} tensors not written")
        try:
            if self._sink is not None:
                self._sink.close()
            else:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
        except OSError as e:
            raise disk_error(e, self.path) or e from None
        actual = self.tmp.stat().st_size
        assert actual == self.size, (actual, self.size)
        os.replace(self.tmp, self.path)
        return FileRecord(self.path.name, self.size, self._h.hexdigest())

    def abort(self) -> None:
        if self._sink is not None:
            self._sink.abort()
        elif not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def copy_file_atomic(src: Path, dst: Path, name: str | None = None) -> FileRecord:
    """Copy a sidecar file (tokenizer, config, README ...) atomically, hashing it; the record is called ``name``
    (default: the file name; a sidecar in a sub-folder is recorded by its relative path)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name("." + dst.name + PARTIAL_SUFFIX)
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return FileRecord(name or dst.name, dst.stat().st_size, sha256_file(dst))


def write_bytes_atomic(dst: Path, data: bytes) -> FileRecord:
    tmp = dst.with_name("." + dst.name + PARTIAL_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return FileRecord(dst.name, len(data), hashlib.sha256(data).hexdigest())


def write_json_atomic(dst: Path, obj: object) -> FileRecord:
    return write_bytes_atomic(dst, (json.dumps(obj, indent=2) + "\n").encode())


class Manifest:
    """``dsv3-manifest.json`` in an output folder: what was made, from what, with which checksums.

    ``job`` identifies the run (stage, parameters, source fingerprint): a re-run with the same job resumes;
    a folder holding another job's outputs, or unknown files, is refused rather than mixed.
    """

    def __init__(self, dst: Path, job: dict) -> None:
        self.dst = Path(dst)
        self.path = self.dst / MANIFEST_NAME
        self.job = job
        self.files: dict[str, dict] = {}
        self.extra: dict = {}
        self.complete = False

    @classmethod
    def open(cls, dst: str | Path, job: dict, *, resume: bool = True) -> Manifest:
        """Prepare ``dst`` for the job: create it, or resume the same job, or refuse."""
        dst = Path(dst)
        m = cls(dst, job)
        if dst.exists() and not dst.is_dir():
            raise OutputError(f"{dst} exists and is not a folder")
        dst.mkdir(parents=True, exist_ok=True)
        for p in dst.glob("." + "*" + PARTIAL_SUFFIX):  # leftovers of an interrupted run
            p.unlink()
        if m.path.exists():
            try:
                old = json.loads(m.path.read_text())
            except json.JSONDecodeError:
                raise OutputError(f"{m.path} is corrupt; remove {dst} and run again") from None
            if old.get("job") != job:
                raise OutputError(
                    f"{dst} holds the output of a different run ({old.get('job', {}).get('stage')}); "
                    "choose an empty destination"
                )
            if resume:
                m.files = old.get("files", {})
                m.extra = old.get("extra", {})
        else:
            others = [p.name for p in dst.iterdir() if p.name != LOCK_NAME]
            if others:
                raise OutputError(f"{dst} is not empty and has no dsv3-tools manifest; choose an empty destination")
        m.complete = False
        m.save()
        return m

    def is_done(self, name: str, *, verify_hash: bool = True) -> bool:
        """A finished output that is still intact (size and, by default, sha256 match the record)."""
        rec = self.files.get(name)
        p = self.dst / name
        if rec is None or not p.is_file() or p.stat().st_size != rec["size"]:
            return False
        if verify_hash and sha256_file(p) != rec["sha256"]:
            return False
        return True

    def record(self, rec: FileRecord, **info: object) -> None:
        self.files[rec.name] = {"size": rec.size, "sha256": rec.sha256, **info}
        self.save()

    def save(self) -> None:
        write_json_atomic(
            self.path,
            {
                "tool": "dsv3-tools",
                "version": TOOL_VERSION,
                "job": self.job,
                "complete": self.complete,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": dict(sorted(self.files.items())),
                "extra": self.extra,
            },
        )

    def finish(self) -> None:
        self.complete = True
        self.save()


def read_manifest(folder: str | Path) -> dict | None:
    p = Path(folder) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def source_fingerprint(folder: str | Path, files: list[str]) -> list[list]:
    """Identifies an input folder's data files cheaply: name, size, mtime."""
    out = []
    for rel in sorted(files):
        st = (Path(folder) / rel).stat()
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out
