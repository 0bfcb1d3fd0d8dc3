"""Checkpoint folder layouts: the file names each one uses, and which layout a folder holds.

- ``hf-sharded``: ``model-00001-of-000163.safetensors`` ... plus ``model.safetensors.index.json``;
- ``hf-single``: one ``model.safetensors``;
- ``mp``: the official model-parallel layout, ``model{r}-mp{N}.safetensors`` for r = 0..N-1 (what the upstream
  demo loads, one file per rank), the MTP module (when kept) in ``mtp{r}-mp{N}.safetensors``, the Hugging Face
  ``config.json`` (what transformers' ``AutoTokenizer`` reads there) and the demo's ``ModelArgs`` in
  ``model_args.json`` (its ``--config``). Folders written before that naming hold the ModelArgs in ``config.json``
  and the HF config in ``hf_config.json``; they are still read.

No torch here: ``download`` uses these names too.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import LayoutError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MANIFEST_NAME = "dsv3-manifest.json"
# What ``cast fp8-bf16`` keeps of the FP8 original beside its BF16 output (every block scale, every file's header),
# so that ``cast bf16-fp8`` gives back the original bytes. Safetensors inside, but not named ``*.safetensors``:
# loaders that glob for weights must not take it for one.
ORIGIN_NAME = "dsv3-fp8-origin.st"
MP_RE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
MP_MTP_RE = re.compile(r"^mtp(\d+)-mp(\d+)\.safetensors$")
MODEL_ARGS_NAME = "model_args.json"  # the upstream demo's ModelArgs beside MP shards (its --config)
OLD_MP_HF_CONFIG = "hf_config.json"  # the HF config in MP folders written before config.json became the HF config


def rank_file(rank: int, world: int) -> str:
    """The rank file the upstream demo loads: ``model{rank}-mp{world}.safetensors``."""
    return f"model{rank}-mp{world}.safetensors"


def mtp_rank_file(rank: int, world: int) -> str:
    """Where ``shard`` keeps rank ``rank``'s piece of the MTP module: beside its rank file, not in it, because the
    upstream demo loads rank files strictly and has no MTP layer."""
    return f"mtp{rank}-mp{world}.safetensors"


def mp_config_files(path: Path) -> tuple[Path, Path]:
    """(the HF config, the demo's ModelArgs) of an MP folder: ``config.json`` and ``model_args.json``, or in a folder
    written before that naming, ``hf_config.json`` and ``config.json``."""
    if (path / OLD_MP_HF_CONFIG).is_file() and not (path / MODEL_ARGS_NAME).is_file():
        return path / OLD_MP_HF_CONFIG, path / "config.json"
    return path / "config.json", path / MODEL_ARGS_NAME


def upstream_command(folder: str | Path, world: int) -> str:
    """The upstream demo's command line for an MP-``world`` folder written by ``shard`` (run from its inference/)."""
    return (
        f"torchrun --nproc-per-node {world} generate.py --ckpt-path {folder} "
        f"--config {Path(folder) / MODEL_ARGS_NAME} --input-file prompts.txt"
    )


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
