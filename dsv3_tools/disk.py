"""Disk space and byte counts for messages, without torch or rich (``download`` stays light)."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def free_bytes(folder: str | Path) -> int:
    """Free space where ``folder`` is (or would be created)."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def human_bytes(n: float | None) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as disks are sold); ``None`` -> ``"unknown"``."""
    if n is None:
        return "unknown"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def nearest_existing(path: str | Path) -> Path:
    """``path`` itself, or its nearest ancestor that exists (where it would be created)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_destination(path: str | Path, *, folder: bool = True) -> None:
    """Raise a one-line ``OutputError`` unless ``path`` (a folder, or with ``folder=False`` a file) exists as such or
    can be made, on a writable file system: checked before any weight is read."""
    from .errors import OutputError

    p = Path(path)
    if p.exists():
        if folder and not p.is_dir():
            raise OutputError(f"{p} exists and is not a folder")
        if not folder and p.is_dir():
            raise OutputError(f"{p} is a folder; give a file name")
    base = nearest_existing(p)
    if not base.is_dir():
        raise OutputError(f"{p}: {base} is a file, so nothing can be created under it")
    if not folder and base != p.parent.absolute() and not p.exists():
        raise OutputError(f"{p.parent}: no such folder (create it first)")
    try:
        readonly = bool(os.statvfs(base).f_flag & os.ST_RDONLY)
    except OSError:
        readonly = False
    if readonly:
        raise OutputError(f"{p}: {base} is on a read-only file system")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputError(f"{p}: no permission to write in {base}")


LOCK_NAME = ".dsv3-lock"  # in a destination folder while a run writes it: "pid start-time host"


def _process_start(pid: int) -> str:
    """A process's start time (clock ticks since boot), which tells a live pid from a reused one; "" if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not start or _process_start(pid) == start


class DestinationLock:
    """One writer per destination folder: ``.dsv3-lock`` holds the writing process's pid. A second run refuses
    with a one-line error naming it; a lock left by a killed run (its process gone) is taken over."""

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.mine = f"{os.getpid()} {_process_start(os.getpid())} {socket.gethostname()}\n"
        self.held = False

    def acquire(self) -> DestinationLock:
        from .errors import OutputError

        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    pid_s, start, host = (self.path.read_text().split() + ["", "", ""])[:3]
                    pid = int(pid_s)
                except (OSError, ValueError):
                    pid, start, host = -1, "", ""
                if pid > 0 and host == socket.gethostname() and pid != os.getpid() and _alive(pid, start):
                    raise OutputError(
                        f"{self.path.parent} is being written by another dsv3-tools run (pid {pid}); "
                        "wait for it to finish or stop it, then run again"
                    ) from None
                self.path.unlink(missing_ok=True)  # a lock left by a run that is gone: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.mine)
            self.held = True
            return self
        raise OutputError(f"{self.path}: could not take the destination's lock")

    def release(self) -> None:
        if self.held:
            try:
                if self.path.read_text() == self.mine:
                    self.path.unlink()
            except OSError:
                pass
            self.held = False

    def __enter__(self) -> DestinationLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
