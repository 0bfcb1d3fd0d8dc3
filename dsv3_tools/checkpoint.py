"""Reading checkpoints: layout detection, safetensors headers, tensors across files, validation.

Tensors are read with positioned reads (``os.pread``) of exactly their bytes, never a whole-file load, so that
memory stays bounded by the tensors in hand. Every tensor is addressed by its HF name, also in the
model-parallel layout, whose per-rank pieces are listed under ``Checkpoint.mp_parts``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import names as N
from .config import ModelConfig
from .errors import (
    CheckpointError,
    ConfigError,
    HeaderError,
    IndexMismatchError,
    LayoutError,
    MissingFileError,
    MissingScaleError,
    MissingTensorError,
    OrphanScaleError,
    ScaleShapeError,
    TensorSpecError,
    TruncatedFileError,
    UnexpectedTensorError,
    UnknownNameError,
    UnsafePathError,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MP_RE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")
MP_HF_CONFIG = "hf_config.json"  # the original HF config kept beside MP shards (config.json holds the demo's args)
MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
DTYPE_SIZE = {k: torch.empty((), dtype=v).element_size() for k, v in DTYPES.items()}


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors ``dtype`` and ``shape``."""
    return DTYPE_SIZE[dtype] * math.prod(shape)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: file, absolute byte range, dtype, shape."""

    name: str
    file: str  # file name relative to the checkpoint folder
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class FileHeader:
    name: str
    size: int
    data_start: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]


def read_header(path: Path, rel: str | None = None) -> FileHeader:
    """Parse and validate one safetensors header; raise typed errors naming the file."""
    rel = rel or path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TruncatedFileError(f"file is {size} bytes, too short for a safetensors header", file=rel)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise HeaderError(
                    f"header length {n} is impossible for a {size}-byte file (truncated or not safetensors)", file=rel
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise MissingFileError("file does not exist", file=rel) from None
    try:
        hdr = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeaderError(f"header is not valid JSON ({e})", file=rel) from None
    if not isinstance(hdr, dict):
        raise HeaderError("header is not a JSON object", file=rel)
    meta = hdr.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, e in hdr.items():
        try:
            dtype, shape, (b, en) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise HeaderError("malformed header entry", file=rel, tensor=name) from None
        if dtype not in DTYPES:
            raise HeaderError(f"unknown dtype {dtype!r}", file=rel, tensor=name)
        if en - b != nbytes(dtype, shape) or b < 0:
            raise HeaderError(f"data size {en - b} does not match {dtype}{list(shape)}", file=rel, tensor=name)
        spans.append((b, en, name))
        tensors[name] = TensorInfo(name, rel, dtype, shape, data_start + b, data_start + en)
    spans.sort()
    pos = 0
    for b, en, name in spans:
        if b != pos:
            raise HeaderError(f"data offsets leave a gap or overlap at byte {pos}", file=rel, tensor=name)
        pos = en
    if data_start + pos > size:
        raise TruncatedFileError(
            f"file is {size} bytes but its header needs {data_start + pos} (truncated download?)", file=rel
        )
    if data_start + pos < size:
        raise HeaderError(f"{size - data_start - pos} trailing bytes after the last tensor", file=rel)
    return FileHeader(rel, size, data_start, {str(k): str(v) for k, v in meta.items()}, tensors)


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
    config: ModelConfig | None
    files: list[str]
    tensors: dict[str, TensorInfo]  # HF name -> location (hf layouts; rank 0's piece for mp)
    index: dict | None = None
    world: int = 1
    mp_parts: dict[str, list[MpPart]] = field(default_factory=dict)  # HF name -> per-rank pieces (mp only)
    problems: list[CheckpointError] = field(default_factory=list)  # found while opening (lenient mode)
    headers: dict[str, FileHeader] = field(default_factory=dict)
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
        return raw.view(DTYPES[info.dtype]).reshape(info.shape)

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
        return raw.view(DTYPES[info.dtype]).reshape((stop - start, *info.shape[1:]))

    def _read_mp(self, name: str) -> torch.Tensor:
        parts = self.mp_parts.get(name)
        if not parts:
            raise MissingTensorError("not in this checkpoint", tensor=name)
        n = N.parse_hf(name)
        if len(parts) == 1 or n.split is None or n.split == N.EXPERT:
            return self.read_info(parts[0].info)
        pieces = [self.read_info(p.info) for p in sorted(parts, key=lambda p: p.rank)]
        return torch.cat(pieces, dim=n.split)

    # --------------------------------------------------------------- summaries
    def names(self) -> list[str]:
        return list(self.tensors)

    def dtype_histogram(self) -> dict[str, int]:
        return dict(Counter(i.dtype for i in self.tensors.values()))

    def total_bytes(self) -> int:
        return sum(h.size for h in self.headers.values())


# ---------------------------------------------------------------------- opening
def detect_layout(path: Path) -> str:
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


def _safe_rel(path: Path, rel: str) -> str:
    """Reject index entries that would escape the folder."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(f"index names an invalid file {rel!r}")
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")):
        raise UnsafePathError("index entry points outside the checkpoint folder", file=rel)
    resolved = (path / p).resolve()
    if path.resolve() not in resolved.parents:
        raise UnsafePathError("index entry resolves outside the checkpoint folder", file=rel)
    return rel


def load_config(path: Path, layout: str) -> ModelConfig | None:
    cand = path / (MP_HF_CONFIG if layout == "mp" else "config.json")
    if not cand.is_file():
        return None
    return ModelConfig.from_file(cand)


def open_checkpoint(
    path: str | Path, *, strict: bool = True, config: ModelConfig | None = None, read_config: bool = True
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
        ck = _open_mp(path, problem)
    ck.config = cfg
    ck.problems = problems
    if cfg is not None:
        validate(ck, problem)
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
        wmap = index["weight_map"]
        assert isinstance(wmap, dict)
    except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError) as e:
        raise LayoutError(f"{INDEX_NAME} is not a valid index ({e.__class__.__name__})", file=INDEX_NAME) from None
    files: list[str] = []
    bad: set[str] = set()
    for name, rel in wmap.items():
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
    if total is not None and total != sum(i.nbytes for i in ck.tensors.values()) and not bad:
        problem(IndexMismatchError(f"index total_size {total} != sum of tensor bytes", file=INDEX_NAME))
    return ck


def _open_mp(path: Path, problem) -> Checkpoint:
    ranks: dict[int, str] = {}
    worlds = set()
    for p in path.iterdir():
        m = MP_RE.match(p.name)
        if m:
            ranks[int(m.group(1))] = p.name
            worlds.add(int(m.group(2)))
    if len(worlds) != 1:
        raise LayoutError(f"mixed model-parallel degrees in one folder: {sorted(worlds)}")
    world = worlds.pop()
    for r in range(world):
        if r not in ranks:
            problem(MissingFileError(f"rank {r} of {world} is missing", file=f"model{r}-mp{world}.safetensors"))
    extra = [r for r in ranks if r >= world]
    for r in extra:
        problem(LayoutError(f"rank {r} is outside world size {world}", file=ranks[r]))
    files = [ranks[r] for r in sorted(ranks) if r < world]
    headers: dict[str, FileHeader] = {}
    parts: dict[str, list[MpPart]] = {}
    for rel in files:
        rank = int(MP_RE.match(rel).group(1))
        try:
            h = read_header(path / rel, rel)
        except CheckpointError as e:
            problem(e)
            continue
        headers[rel] = h
        for mp_name, info in h.tensors.items():
            try:
                hf = N.mp_to_hf(mp_name)
            except UnknownNameError as e:
                e.file = rel
                problem(e)
                continue
            parts.setdefault(hf, []).append(MpPart(rank, info))
    tensors = {hf: min(ps, key=lambda p: p.rank).info for hf, ps in parts.items()}
    return Checkpoint(path, "mp", None, files, tensors, world=world, mp_parts=parts, headers=headers)


# ---------------------------------------------------------------------- validation
def validate_scales(ck: Checkpoint, problem) -> None:
    """Every FP8 weight has an F32 scale of the ceil-grid shape; no scale without its weight."""
    block = ck.config.block_size if ck.config else (128, 128)
    for name, info in ck.tensors.items():
        if name.endswith("_scale_inv"):
            w = name.removesuffix("_scale_inv")
            if w not in ck.tensors:
                problem(OrphanScaleError("scale without its weight", file=info.file, tensor=name))
            continue
        if info.dtype == "F8_E4M3":
            s = ck.tensors.get(N.scale_name(name))
            if s is None:
                problem(MissingScaleError("FP8 weight without its weight_scale_inv", file=info.file, tensor=name))
                continue
            shape = _full_shape(ck, name)
            grid = tuple(-(-d // b) for d, b in zip(shape, block)) if len(shape) == 2 else None
            sshape = _full_shape(ck, N.scale_name(name))  # keyed by HF name (s.name is the MP name in that layout)
            if s.dtype != "F32" or grid is None or sshape != grid:
                problem(
                    ScaleShapeError(
                        f"scale is {s.dtype}{list(sshape)}, expected F32{list(grid) if grid else '?'} for weight "
                        f"{list(shape)} with {block[0]}x{block[1]} blocks",
                        file=s.file,
                        tensor=s.name,
                    )
                )


def _full_shape(ck: Checkpoint, name: str) -> tuple[int, ...]:
    """A tensor's full (re-assembled) shape; in the MP layout, pieces are concatenated on the split dim."""
    if ck.layout != "mp":
        return ck.tensors[name].shape
    parts = ck.mp_parts[name]
    n = N.parse_hf(name)
    shape = list(parts[0].info.shape)
    if isinstance(n.split, int) and len(parts) > 1:
        shape[n.split] = sum(p.info.shape[n.split] for p in parts)
    return tuple(shape)


def validate(ck: Checkpoint, problem) -> None:
    """Scales, then the tensor set against the config: names, shapes, dtypes."""
    validate_scales(ck, problem)
    cfg = ck.config
    assert cfg is not None
    has_mtp_tensors = any(N.is_mtp_name(cfg, n) for n in ck.tensors)
    expected = N.expected_tensors(cfg, mtp=has_mtp_tensors or ck.layout != "mp")
    fp8_in_files = any(i.dtype == "F8_E4M3" for i in ck.tensors.values())
    if cfg.is_fp8 and not fp8_in_files and ck.tensors:
        problem(
            TensorSpecError("config.json declares quantization_config (FP8) but no tensor is FP8", file="config.json")
        )
        return
    if not cfg.is_fp8 and fp8_in_files:
        problem(TensorSpecError("FP8 tensors present but config.json has no quantization_config", file="config.json"))
        return
    for name, info in ck.tensors.items():
        spec = expected.get(name)
        w_spec = expected.get(name.removesuffix("_scale_inv"))
        if spec is None and name.endswith("_scale_inv") and w_spec is not None and "F8_E4M3" in w_spec.alt_dtypes:
            continue  # the scale of an accepted FP8 alternative (eh_proj): checked by validate_scales
        if spec is None:
            try:
                N.parse_hf(name)
                problem(UnexpectedTensorError("not expected for this config", file=info.file, tensor=name))
            except UnknownNameError as e:
                e.file = info.file
                problem(e)
            continue
        if name.endswith("_scale_inv"):
            continue  # checked by validate_scales
        shape = _full_shape(ck, name)
        if ck.layout == "mp":
            n = N.parse_hf(name)
            want = len(ck.mp_parts[name])
            if n.split == N.EXPERT or isinstance(n.split, int) or n.split is None:
                exp_parts = 1 if n.split == N.EXPERT else ck.world
                if want != exp_parts:
                    problem(
                        TensorSpecError(
                            f"found in {want} rank files, expected {exp_parts}", file=info.file, tensor=name
                        )
                    )
        if shape != spec.shape or (info.dtype != spec.dtype and info.dtype not in spec.alt_dtypes):
            problem(
                TensorSpecError(
                    f"is {info.dtype}{list(shape)}, expected {spec.dtype}{list(spec.shape)}",
                    file=info.file,
                    tensor=name,
                )
            )
    for name, spec in expected.items():
        if name in ck.tensors:
            continue
        if spec.name.endswith("_scale_inv"):
            w = spec.name.removesuffix("_scale_inv")
            if w in ck.tensors and ck.tensors[w].dtype != "F8_E4M3":
                continue  # an accepted non-FP8 alternative carries no scale
            if w in ck.tensors:
                continue  # reported by validate_scales
        problem(MissingTensorError("expected by the config but absent", tensor=name))


def open_config_only(path: str | Path) -> ModelConfig:
    """The config of a checkpoint folder in any layout (HF: config.json; MP: hf_config.json)."""
    path = Path(path)
    cfg = load_config(path, detect_layout(path))
    if cfg is None:
        raise ConfigError(f"{path}: no config.json")
    return cfg
