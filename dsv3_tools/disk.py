"""Free disk space, without importing torch (``download`` stays light)."""

from __future__ import annotations

import shutil
from pathlib import Path


def free_bytes(folder: str | Path) -> int:
    """Free space where ``folder`` is (or would be created)."""
    p = Path(folder).resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
