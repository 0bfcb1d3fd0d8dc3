"""The safetensors file format, both directions: dtypes, header parsing with validation, header planning.

A file is ``u64 little-endian header length | JSON header | tensor data``; the header maps each tensor name to its
dtype, shape and ``data_offsets`` (relative to the data start), plus an optional ``__metadata__`` string map. Data
ranges must tile the data area exactly. This module needs no torch (``download`` checks headers with it); the
torch dtypes are looked up lazily by ``torch_dtype`` / ``dtype_name``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import HeaderError, MissingFileError, TruncatedFileError

MAX_HEADER = 100 * 1024 * 1024

# Bytes per element of each safetensors dtype.
DTYPE_SIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "I16": 2,
    "I32": 4,
    "I64": 8,
    "F16": 2,
    "BF16": 2,
    "F32": 4,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
}
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
}
# Sub-byte dtypes: bits per element. safetensors (0.7, 0.8) writes a torch ``float4_e2m1fn_x2`` tensor of shape
# [..., n] as dtype ``F4`` with the logical shape [..., 2n] (two FP4 values per byte); its byte size is
# numel * bits / 8, which must be a whole number. DeepSeek-V4's official converter writes FP4 experts this way.
SUBBYTE_BITS: dict[str, int] = {"F4": 4}


def torch_dtype(name: str):
    """The torch dtype of a safetensors dtype name (``"BF16"`` -> ``torch.bfloat16``)."""
    import torch

    return getattr(torch, _TORCH_NAMES[name])


def torch_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the torch tensor holding a safetensors tensor: the logical shape, except for packed sub-byte
    dtypes (``F4`` [..., 2n] is a ``float4_e2m1fn_x2`` tensor [..., n])."""
    if dtype in SUBBYTE_BITS and shape:
        per_byte = 8 // SUBBYTE_BITS[dtype]
        return (*shape[:-1], shape[-1] // per_byte)
    return tuple(shape)


def dtype_name(dtype) -> str:
    """The safetensors dtype name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    key = str(dtype).removeprefix("torch.")
    for name, t in _TORCH_NAMES.items():
        if t == key:
            return name
    raise KeyError(f"no safetensors dtype for {dtype}")


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of safetensors ``dtype`` and ``shape`` (``ValueError`` for a sub-byte tensor that does not
    fill whole bytes)."""
    if dtype in SUBBYTE_BITS:
        bits = SUBBYTE_BITS[dtype] * math.prod(shape)
        if bits % 8 or (shape and shape[-1] % (8 // SUBBYTE_BITS[dtype])):
            raise ValueError(f"{dtype}{list(shape)} does not fill whole bytes")
        return bits // 8
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
        return math.prod(self.shape)


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
    return parse_header(raw, size, rel)


def parse_header(raw: bytes, size: int | None, rel: str) -> FileHeader:
    """Parse the JSON header ``raw`` (without its 8-byte length) of a file of ``size`` bytes (None: not checked)."""
    n = len(raw)
    try:
        hdr = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeaderError(f"header is not valid JSON ({e})", file=rel) from None
    if not isinstance(hdr, dict):
        raise HeaderError("header is not a JSON object", file=rel)
    meta = hdr.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise HeaderError("__metadata__ is not a JSON object", file=rel)
    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, e in hdr.items():
        try:
            dtype, shape, (b, en) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            b, en = int(b), int(en)
        except (KeyError, TypeError, ValueError):
            raise HeaderError("malformed header entry", file=rel, tensor=name) from None
        if dtype not in DTYPE_SIZE and dtype not in SUBBYTE_BITS:
            raise HeaderError(f"unknown dtype {dtype!r}", file=rel, tensor=name)
        try:
            size_ok = en - b == nbytes(dtype, shape)
        except ValueError:
            size_ok = False
        if any(s < 0 for s in shape) or b < 0 or not size_ok:
            raise HeaderError(f"data size {en - b} does not match {dtype}{list(shape)}", file=rel, tensor=name)
        spans.append((b, en, name))
        tensors[name] = TensorInfo(name, rel, dtype, shape, data_start + b, data_start + en)
    spans.sort()
    pos = 0
    for b, en, name in spans:
        if b != pos:
            raise HeaderError(f"data offsets leave a gap or overlap at byte {pos}", file=rel, tensor=name)
        pos = en
    if size is None:
        size = data_start + pos
    if data_start + pos > size:
        raise TruncatedFileError(
            f"file is {size} bytes but its header needs {data_start + pos} (truncated download?)", file=rel
        )
    if data_start + pos < size:
        raise HeaderError(f"{size - data_start - pos} trailing bytes after the last tensor", file=rel)
    return FileHeader(rel, size, data_start, {str(k): str(v) for k, v in meta.items()}, tensors)


def header_entries(h: FileHeader) -> list[Entry]:
    """A parsed header's tensors in data order, as planned entries."""
    return [(i.name, i.dtype, i.shape) for i in sorted(h.tensors.values(), key=lambda i: i.start)]


Entry = tuple[str, str, tuple[int, ...]]  # (name, safetensors dtype, shape): one tensor of a planned file


def plan_header(
    entries: list[Entry], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes (8-byte length prefix included) and each tensor's data range, in the given order."""
    hdr: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, dtype, shape in entries:
        if name in offsets:
            raise ValueError(f"duplicate tensor {name!r} in one file")
        n = nbytes(dtype, shape)
        offsets[name] = (pos, pos + n)
        hdr[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(hdr, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, offsets


def planned_size(entries: list[Entry], metadata: dict[str, str] | None = None) -> int:
    """The size of the file ``plan_header(entries, metadata)`` describes."""
    header, _ = plan_header(entries, metadata)
    return len(header) + sum(nbytes(d, s) for _, d, s in entries)
