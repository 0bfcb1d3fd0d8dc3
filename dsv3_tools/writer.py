"""Streaming safetensors writing, atomic finish, and the output manifest that makes runs resumable.

A file is planned from its tensor list (names, dtypes, shapes) so its header is known before any data;
data is then written in that order, hashed on the way, and the file appears under its final name only
once complete (temporary name, fsync, rename). ``Manifest`` records each finished output with its size and
sha256; a re-run keeps files that match it and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import DTYPE_NAMES, DTYPE_SIZE
from .errors import OutputError

MANIFEST_NAME = "dsv3-manifest.json"
PARTIAL_SUFFIX = ".partial"
TOOL_VERSION = "0.1.0"


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str


def _hash_chunks(h: hashlib._Hash, data: memoryview, chunk: int = 1 << 24) -> None:
    for i in range(0, len(data), chunk):
        h.update(data[i : i + chunk])


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    t = t.contiguous()
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()) if t.numel() else memoryview(b"")


def plan_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (8-byte length prefix included) and each tensor's data range, in the given order."""
    hdr: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        if name in offsets:
            raise ValueError(f"duplicate tensor {name!r} in one file")
        n = DTYPE_SIZE[dtype]
        for s in shape:
            n *= s
        offsets[name] = (pos, pos + n)
        hdr[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in planned order, atomically."""

    def __init__(
        self,
        path: str | Path,
        entries: list[tuple[str, str, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.entries = list(entries)
        header, self.offsets = plan_header(self.entries, metadata)
        self.data_start = len(header)
        self.size = self.data_start + (max((e for _, e in self.offsets.values()), default=0))
        self.tmp = self.path.with_name("." + self.path.name + PARTIAL_SUFFIX)
        self._f = open(self.tmp, "wb")
        self._h = hashlib.sha256()
        self._next = 0
        self._write(memoryview(header))

    def _write(self, mv: memoryview) -> None:
        self._f.write(mv)
        _hash_chunks(self._h, mv)

    @property
    def next_name(self) -> str | None:
        return self.entries[self._next][0] if self._next < len(self.entries) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor's data; it must be the next one planned, with the planned dtype and shape."""
        if self._next >= len(self.entries) or self.entries[self._next][0] != name:
            raise AssertionError(f"write order: expected {self.next_name!r}, got {name!r}")
        _, dtype, shape = self.entries[self._next]
        if DTYPE_NAMES[tensor.dtype] != dtype or tuple(tensor.shape) != tuple(shape):
            raise AssertionError(f"{name}: planned {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}")
        self.write_raw(name, tensor_bytes(tensor))

    def write_raw(self, name: str, data: memoryview) -> None:
        """Append raw bytes for the next planned tensor (already in its dtype's byte layout)."""
        b, e = self.offsets[name]
        if self.entries[self._next][0] != name or len(data) != e - b:
            raise AssertionError(f"{name}: expected {e - b} bytes as tensor #{self._next}, got {len(data)}")
        self._write(data)
        self._next += 1

    def finish(self) -> FileRecord:
        """Check completeness, flush to disk, rename to the final name."""
        if self._next != len(self.entries):
            raise AssertionError(f"{self.path.name}: {len(self.entries) - self._next} tensors not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        actual = self.tmp.stat().st_size
        assert actual == self.size, (actual, self.size)
        os.replace(self.tmp, self.path)
        return FileRecord(self.path.name, self.size, self._h.hexdigest())

    def abort(self) -> None:
        if not self._f.closed:
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


def copy_file_atomic(src: Path, dst: Path) -> FileRecord:
    """Copy a sidecar file (tokenizer, config, README ...) atomically, hashing it."""
    tmp = dst.with_name("." + dst.name + PARTIAL_SUFFIX)
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    return FileRecord(dst.name, dst.stat().st_size, sha256_file(dst))


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
            others = [p.name for p in dst.iterdir()]
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


def free_bytes(folder: str | Path) -> int:
    """Free space where ``folder`` is (or would be created)."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
