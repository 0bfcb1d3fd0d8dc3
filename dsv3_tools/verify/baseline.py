"""The baseline a checkpoint is compared with, from ``--reference``: a reference file (loaded) or a reference
checkpoint folder (run on the same prompts). Either way the comparison gets one type, a ``Reference``; a folder's
also carries its ``Checkpoint``, so that differing tensors can be named."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..config import ModelConfig
from ..errors import ConfigError, Dsv3Error
from .reference import Reference, ReferenceError, load_reference
from .run import RunOptions, geometry_digest, has_mtp_tensors, run_checkpoint
from .structure import RUNNABLE_KINDS, problem

Progress = Callable[[int], None]


@dataclass
class Source:
    """What ``--reference`` names, opened and checked before any model runs."""

    path: Path
    kind: str  # "file" | "checkpoint"
    loaded: Reference | None = None  # the file's contents
    ck: Checkpoint | None = field(default=None, repr=False)  # the folder, opened

    @property
    def ids(self) -> list[list[int]] | None:
        """The prompts a reference file was made on (a folder runs on the candidate's prompts)."""
        return self.loaded.ids if self.loaded is not None else None

    @property
    def has_mtp(self) -> bool:
        return self.loaded.has_mtp if self.loaded is not None else has_mtp_tensors(self.ck)

    def check_geometry(self, cfg: ModelConfig, ckpt: str | Path) -> None:
        """The reference must come from a model of the same geometry as the candidate's."""
        if self.loaded is not None:
            if self.loaded.meta.get("checkpoint", {}).get("geometry_digest") != geometry_digest(cfg):
                raise ReferenceError(f"{self.path} was made from a model of another geometry than {ckpt}")
            if self.loaded.projection.shape[0] != cfg.hidden_size:
                raise ReferenceError(f"{self.path}: projection is for hidden size {self.loaded.projection.shape[0]}")
        elif geometry_digest(self.ck.config) != geometry_digest(cfg):
            raise ReferenceError(f"{self.path} is a model of another geometry than {ckpt}")


def open_lenient(path: str | Path) -> tuple[Checkpoint, list[dict]]:
    """Open leniently; a broken config is a structural problem (the tensors are still read without it)."""
    try:
        return open_checkpoint(path, strict=False), []
    except ConfigError as e:
        ck = open_checkpoint(path, strict=False, read_config=False)
        return ck, [problem("config", str(e), "config.json")]


def open_source(reference: str | Path, world: int) -> Source:
    """Open ``--reference``: load a reference file, or open and check a reference checkpoint folder."""
    path = Path(reference)
    if not path.is_dir():
        return Source(path, "file", loaded=load_reference(path))
    if world > 1:
        raise Dsv3Error("under torchrun the reference must be a file (--save-reference it in one process first)")
    ck, cfg_problems = open_lenient(path)
    if ck.config is None or cfg_problems:
        raise ReferenceError(f"{reference}: the reference checkpoint has no usable config")
    bad = [p for p in ck.problems if p.kind not in RUNNABLE_KINDS]
    if bad:
        raise ReferenceError(f"{reference}: the reference checkpoint is broken: {bad[0]}")
    return Source(path, "checkpoint", ck=ck)


@dataclass
class Baseline:
    """The reference side of a comparison: what it computed, and the checkpoint it came from (folders only)."""

    ref: Reference
    ck: Checkpoint | None = None


def baseline(
    src: Source,
    ids: list[list[int]],
    opts: RunOptions,
    *,
    mtp: bool,
    projection: torch.Tensor,
    progress: Progress | None = None,
) -> Baseline:
    """The reference's records for ``ids``: a file's as loaded, a folder's by running it like the candidate (every
    layer's input kept: the candidate's layers are then run on them)."""
    if src.loaded is not None:
        return Baseline(src.loaded)
    mtp = mtp and has_mtp_tensors(src.ck)
    run = run_checkpoint(src.ck, ids, opts, mtp=mtp, projection=projection, progress=progress, keep_hidden=True)
    return Baseline(run, src.ck)
