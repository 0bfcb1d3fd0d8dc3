"""Checkpoint folder layouts: the file names each one uses, and which layout a folder holds.

- ``hf-sharded``: ``model-00001-of-000163.safetensors`` ... plus ``model.safetensors.index.json``;
- ``hf-single``: one ``model.safetensors``;
- ``mp``: the official model-parallel layout, ``model{r}-mp{N}.safetensors`` for r = 0..N-1 (what the upstream
  demo loads, one file per rank), the MTP module (when kept) in ``mtp{r}-mp{N}.safetensors``, with ``config.json``
  holding the demo's ``ModelArgs`` and ``hf_config.json`` the original HF config.

No torch here: ``download`` uses these names too.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import LayoutError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "dsv3-manifest.json"
MP_RE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
MP_MTP_RE = re.compile(r"^mtp(\d+)-mp(\d+)\.safetensors$")
MP_HF_CONFIG = "hf_config.json"  # the original HF config kept beside MP shards (config.json holds the demo's args)


def rank_file(rank: int, world: int) -> str:
    """The rank file the upstream demo loads: ``model{rank}-mp{world}.safetensors``."""
    return f"model{rank}-mp{world}.safetensors"


def mtp_rank_file(rank: int, world: int) -> str:
    """Where ``shard`` keeps rank ``rank``'s piece of the MTP module: beside its rank file, not in it, because the
    upstream demo loads rank files strictly and has no MTP layer."""
    return f"mtp{rank}-mp{world}.safetensors"


def detect_layout(path: Path) -> str:
    """``hf-sharded``, ``hf-single`` or ``mp``; a one-line ``LayoutError`` for anything else."""
    if not path.exists():
        raise LayoutError(f"{path}: no such folder")
    if path.is_file():
        raise LayoutError(f"{path}: expected a checkpoint folder, got a file")
    if (path / INDEX_NAME).is_file():
        return "hf-sharded"
    if (path / SINGLE_NAME).is_file():
        return "hf-single"
    if any(MP_RE.match(p.name) for p in path.iterdir()):
        return "mp"
    if any(p.suffix == ".safetensors" for p in path.iterdir()):
        raise LayoutError(f"{path}: safetensors files but no {INDEX_NAME}")
    raise LayoutError(f"{path}: no safetensors checkpoint here")
