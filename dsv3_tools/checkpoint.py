"""Reading checkpoints: a folder in any layout opened as one set of tensors addressed by HF name.

Tensors are read with positioned reads (``os.preadv``) of exactly their bytes, never a whole-file load, so that
memory stays bounded by the tensors in hand. In the model-parallel layout each tensor's per-rank pieces are listed
under ``Checkpoint.mp_parts``. The file format is ``stfile``, the layouts ``layout``, the checks against the config
``validate``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import names as N
from .errors import (
    CheckpointError,
    IndexMismatchError,
    LayoutError,
    MissingFileError,
    MissingTensorError,
    TruncatedFileError,
    UnknownNameError,
    UnsafePathError,
)
from .family import AnyConfig, config_from_file, is_v4
from .layout import (
    INDEX_NAME,
    MP_MTP_RE,
    MP_RE,
    SINGLE_NAME,
    detect_layout,
    mp_config_files,
    mtp_rank_file,
    rank_file,
)
from .stfile import FileHeader, TensorInfo, read_header, torch_dtype, torch_shape
from .v4 import names as V4
from .v4.validate import looks_v4
from .v4.validate import validate as validate_v4
from .v4.validate import validate_scales as validate_v4_scales
from .validate import validate, validate_scales

if TYPE_CHECKING:  # torch is imported where tensors are read: opening a folder needs none of it
    import torch


@dataclass
class MpPart:
    """One rank's piece of a tensor in the model-parallel layout."""

    rank: int
    info: TensorInfo


@dataclass
class Checkpoint:
    """A checkpoint folder, opened lazily. Tensors are keyed by HF name in every layout."""

    path: Path
    layout: str  # "hf-single" | "hf-sharded" | "mp"
    config: AnyConfig | None  # ModelConfig (V3 family) or V4Config
    files: list[str]
    tensors: dict[str, TensorInfo]  # HF name -> location (hf layouts; rank 0's piece for mp)
    index: dict | None = None
    world: int = 1
    mp_parts: dict[str, list[MpPart]] = field(default_factory=dict)  # HF name -> per-rank pieces (mp only)
    problems: list[CheckpointError] = field(default_factory=list)  # found while opening (lenient mode)
    warnings: list[str] = field(default_factory=list)  # metadata that is off but changes no tensor
    headers: dict[str, FileHeader] = field(default_factory=dict)
    family: str = "v3"  # whose name table the names follow: "v3" (the V3 family) or "v4" (DeepSeek-V4)
    _fds: dict[str, int] = field(default_factory=dict, repr=False)

    # --------------------------------------------------------------- reading
    def _fd(self, rel: str) -> int:
        fd = self._fds.get(rel)
        if fd is None:
            fd = os.open(self.path / rel, os.O_RDONLY)
            self._fds[rel] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:
            pass

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError("not in this checkpoint", tensor=name) from None

    def read_bytes(
        self, info: TensorInfo, start: int = 0, stop: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Bytes [start, stop) of a tensor's data as a uint8 tensor (into ``out`` when given)."""
        stop = info.nbytes if stop is None else stop
        n = stop - start
        import torch

        buf = out if out is not None else torch.empty(n, dtype=torch.uint8)
        assert buf.numel() >= n and buf.dtype == torch.uint8
        mv = memoryview(buf.numpy())[:n]
        fd = self._fd(info.file)
        got = 0
        while got < n:
            k = os.preadv(fd, [mv[got:]], info.start + start + got)
            if k <= 0:
                raise TruncatedFileError(f"unexpected end of file reading {n} bytes", file=info.file, tensor=info.name)
            got += k
        return buf[:n]

    def read_info(self, info: TensorInfo) -> torch.Tensor:
        raw = self.read_bytes(info)
        return raw.view(torch_dtype(info.dtype)).reshape(torch_shape(info.dtype, info.shape))

    def read(self, name: str) -> torch.Tensor:
        """A whole tensor by HF name (re-assembled from the rank files in the MP layout)."""
        if self.layout == "mp":
            return self._read_mp(name)
        return self.read_info(self.info(name))

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 without reading the rest (HF layouts)."""
        info = self.info(name)
        row = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        raw = self.read_bytes(info, start * row, stop * row)
        return raw.view(torch_dtype(info.dtype)).reshape(torch_shape(info.dtype, (stop - start, *info.shape[1:])))

    def _read_mp(self, name: str) -> torch.Tensor:
        parts = self.mp_parts.get(name)
        if not parts:
            raise MissingTensorError("not in this checkpoint", tensor=name)
        split = self.split_of(name)
        if len(parts) == 1 or not isinstance(split, int):
            return self.read_info(parts[0].info)
        import torch

        pieces = [self.read_info(p.info) for p in sorted(parts, key=lambda p: p.rank)]
        return torch.cat(pieces, dim=split)

    def full_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's full (re-assembled) shape; in the MP layout, pieces are concatenated on the split dim."""
        if self.layout != "mp":
            return self.tensors[name].shape
        parts = self.mp_parts[name]
        split = self.split_of(name)
        shape = list(parts[0].info.shape)
        if isinstance(split, int) and len(parts) > 1:
            shape[split] = sum(p.info.shape[split] for p in parts)
        return tuple(shape)

    def split_of(self, name: str) -> int | str | None:
        """The model-parallel split of a tensor (its family's name table): a dim, ``EXPERT``, or None (replicated)."""
        if self.family == "v4":
            return V4.parse(name).split
        return N.parse_hf(name).split

    # --------------------------------------------------------------- summaries
    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype_histogram(self) -> dict[str, int]:
        return dict(Counter(i.dtype for i in self.tensors.values()))

    def total_bytes(self) -> int:
        return sum(h.size for h in self.headers.values())


# ---------------------------------------------------------------------- opening
def _safe_rel(path: Path, rel: str) -> str:
    """Reject index entries that would escape the folder."""
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise UnsafePathError(f"index names an invalid file {rel!r}")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")):
        raise UnsafePathError("index entry points outside the checkpoint folder", file=rel)
    resolved = (path / p).resolve()
    if path.resolve() not in resolved.parents:
        raise UnsafePathError("index entry resolves outside the checkpoint folder", file=rel)
    return rel


def load_config(path: Path, layout: str) -> AnyConfig | None:
    cand = mp_config_files(path)[0] if layout == "mp" else path / "config.json"
    if not cand.is_file():
        return None
    return config_from_file(cand)


def open_checkpoint(
    path: str | Path, *, strict: bool = True, config: AnyConfig | None = None, read_config: bool = True
) -> Checkpoint:
    """Open a checkpoint folder. ``strict`` raises the first problem; otherwise problems are collected.

    The config comes from ``config``, else from the folder (unless ``read_config`` is false); without one,
    only the format-level checks run (headers, index, scales).
    """
    path = Path(path)
    layout = detect_layout(path)
    problems: list[CheckpointError] = []

    def problem(e: CheckpointError) -> None:
        if strict:
            raise e
        problems.append(e)

    cfg = config or (load_config(path, layout) if read_config else None)
    if layout == "hf-sharded":
        ck = _open_hf_sharded(path, problem)
    elif layout == "hf-single":
        ck = _open_files(path, "hf-single", [SINGLE_NAME], problem)
    else:
        ck = _open_mp(path, problem, "v4" if is_v4(cfg) else "v3" if cfg is not None else None)
    ck.config = cfg
    ck.problems = problems
    ck.family = "v4" if is_v4(cfg) or (cfg is None and looks_v4(ck.tensors)) else "v3"
    if is_v4(cfg):
        validate_v4(ck, problem)
    elif cfg is not None:
        validate(ck, problem)
    elif ck.family == "v4":
        validate_v4_scales(ck, problem)
    else:
        validate_scales(ck, problem)
    return ck


def _open_files(path: Path, layout: str, files: list[str], problem) -> Checkpoint:
    headers: dict[str, FileHeader] = {}
    tensors: dict[str, TensorInfo] = {}
    for rel in files:
        try:
            h = read_header(path / rel, rel)
        except CheckpointError as e:
            problem(e)
            continue
        headers[rel] = h
        for name, info in h.tensors.items():
            if name in tensors:
                problem(IndexMismatchError(f"tensor also stored in {tensors[name].file}", file=rel, tensor=name))
            tensors[name] = info
    return Checkpoint(path, layout, None, files, tensors, headers=headers)


def _open_hf_sharded(path: Path, problem) -> Checkpoint:
    try:
        index = json.loads((path / INDEX_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LayoutError(f"{INDEX_NAME} is not valid JSON ({e.__class__.__name__})", file=INDEX_NAME) from None
    wmap = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wmap, dict):
        raise LayoutError("not a valid index: no weight_map object", file=INDEX_NAME)
    files: list[str] = []
    bad: set[str] = set()
    for name, rel in list(wmap.items()):
        if not isinstance(rel, str):
            problem(UnsafePathError(f"index names the file {rel!r}, not a file name", tensor=name))
            del wmap[name]
            continue
        if rel in files or rel in bad:
            continue
        try:
            _safe_rel(path, rel)
        except UnsafePathError as e:
            e.tensor = name
            problem(e)
            bad.add(rel)
            continue
        if not (path / rel).is_file():
            problem(MissingFileError("indexed file does not exist", file=rel, tensor=name))
            bad.add(rel)
            continue
        files.append(rel)
    ck = _open_files(path, "hf-sharded", files, problem)
    ck.index = index
    for name, rel in wmap.items():
        if rel in bad:
            continue
        info = ck.tensors.get(name)
        if info is None:
            if rel in ck.headers:
                problem(IndexMismatchError("indexed but not in the file", file=rel, tensor=name))
        elif info.file != rel:
            problem(IndexMismatchError(f"indexed in {rel} but stored in {info.file}", file=rel, tensor=name))
    for name, info in ck.tensors.items():
        if name not in wmap:
            problem(IndexMismatchError("stored but missing from the index", file=info.file, tensor=name))
    total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
    tensor_bytes = sum(i.nbytes for i in ck.tensors.values())
    if total is not None and total != tensor_bytes and not bad and wmap:
        # Some tools write file sizes there, hand-edited repos forget it: no tensor changes, so not a reason to refuse.
        ck.warnings.append(
            f"{INDEX_NAME}: metadata.total_size is {total}, the tensors hold {tensor_bytes} bytes "
            "(outputs of cast get the right value)"
        )
    return ck


def _open_mp(path: Path, problem, family: str | None) -> Checkpoint:
    """The rank files ``model{r}-mp{N}`` and, when the MTP module was kept, its files ``mtp{r}-mp{N}``; each tensor
    keyed by its HF name (V3 family: renamed back by the name table; "v4": the same names; None: V4 when its marker
    tensor is there)."""
    ranks: dict[int, str] = {}
    mtp_ranks: dict[int, str] = {}
    worlds = set()
    mtp_worlds = set()
    for p in path.iterdir():
        m, mm = MP_RE.match(p.name), MP_MTP_RE.match(p.name)
        if m:
            ranks[int(m.group(1))] = p.name
            worlds.add(int(m.group(2)))
        elif mm:
            mtp_ranks[int(mm.group(1))] = p.name
            mtp_worlds.add(int(mm.group(2)))
    if len(worlds) != 1:
        raise LayoutError(f"mixed model-parallel degrees in one folder: {sorted(worlds)}")
    world = worlds.pop()
    for r in range(world):
        if r not in ranks:
            problem(MissingFileError(f"rank {r} of {world} is missing", file=rank_file(r, world)))
        if mtp_ranks and r not in mtp_ranks:
            problem(MissingFileError(f"rank {r}'s MTP file is missing", file=mtp_rank_file(r, world)))
    if mtp_worlds - {world}:
        problem(LayoutError(f"MTP files for world size {sorted(mtp_worlds - {world})} beside MP-{world} rank files"))
    extra = [(r, f) for r, f in [*ranks.items(), *mtp_ranks.items()] if r >= world]
    for r, f in extra:
        problem(LayoutError(f"rank {r} is outside world size {world}", file=f))
    files = [ranks[r] for r in sorted(ranks) if r < world]
    files += [f for r, f in sorted(mtp_ranks.items()) if r < world and MP_MTP_RE.match(f).group(2) == str(world)]
    headers: dict[str, FileHeader] = {}
    for rel in files:
        try:
            headers[rel] = read_header(path / rel, rel)
        except CheckpointError as e:
            problem(e)
    if family is None:
        family = "v4" if any(looks_v4(h.tensors) for h in headers.values()) else "v3"
    to_hf: Callable[[str], str] = (lambda n: V4.parse(n).name) if family == "v4" else N.mp_to_hf
    parts: dict[str, list[MpPart]] = {}
    for rel, h in headers.items():
        rank = int((MP_RE.match(rel) or MP_MTP_RE.match(rel)).group(1))
        for mp_name, info in h.tensors.items():
            try:
                hf = to_hf(mp_name)
            except UnknownNameError as e:
                e.file = rel
                problem(e)
                continue
            parts.setdefault(hf, []).append(MpPart(rank, info))
    tensors = {hf: min(ps, key=lambda p: p.rank).info for hf, ps in parts.items()}
    return Checkpoint(path, "mp", None, files, tensors, world=world, mp_parts=parts, headers=headers)
