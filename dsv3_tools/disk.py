"""Disk space and byte counts for messages, without torch or rich (``download`` stays light)."""

from __future__ import annotations

import shutil
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
