"""Typed user-facing errors.

Every error a user can cause (bad input, a broken checkpoint, a full disk) is a ``Dsv3Error``; the CLI maps
each to a one-line message and exit code 2. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations

import errno


class Dsv3Error(Exception):
    """Base class of every error caused by input rather than by a bug."""

    exit_code = 2


class ConfigError(Dsv3Error):
    """A config.json that is unreadable, has unknown fields or contradicts itself."""


class CheckpointError(Dsv3Error):
    """A checkpoint problem; names the file and/or tensor it concerns."""

    kind = "checkpoint"

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None) -> None:
        self.file = file
        self.tensor = tensor
        self.detail = message
        where = []
        if tensor:
            where.append(f"tensor {tensor!r}")
        if file:
            where.append(f"file {file!r}")
        super().__init__(f"{', '.join(where)}: {message}" if where else message)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "file": self.file, "tensor": self.tensor, "message": self.detail}


class LayoutError(CheckpointError):
    kind = "layout"


class MissingFileError(CheckpointError):
    kind = "missing_file"


class UnsafePathError(CheckpointError):
    kind = "unsafe_path"


class HeaderError(CheckpointError):
    kind = "bad_header"


class TruncatedFileError(CheckpointError):
    kind = "truncated"


class MissingScaleError(CheckpointError):
    kind = "missing_scale"


class OrphanScaleError(CheckpointError):
    kind = "orphan_scale"


class ScaleShapeError(CheckpointError):
    kind = "scale_shape"


class MissingTensorError(CheckpointError):
    kind = "missing_tensor"


class UnexpectedTensorError(CheckpointError):
    kind = "unexpected_tensor"


class TensorSpecError(CheckpointError):
    """Shape or dtype differs from what the config implies."""

    kind = "tensor_spec"


class IndexMismatchError(CheckpointError):
    kind = "index_mismatch"


class UnknownNameError(CheckpointError):
    kind = "unknown_name"


class OutputError(Dsv3Error):
    """The destination cannot be written (not empty, not enough space, ...)."""


_DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit of this system or process)",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def disk_error(e: OSError, path: object = None) -> OutputError | None:
    """A one-line ``OutputError`` for an OS error a user can fix where the output goes (full disk, read-only file
    system, permissions), naming the path; None for anything else."""
    why = _DISK_ERRNOS.get(e.errno)
    if why is None:
        return None
    where = path if path is not None else (e.filename or "the destination")
    fix = "free some space there" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "choose another place"
    return OutputError(f"{where}: {why}; {fix}, then run the same command again (finished files are kept)")


class ShardingError(Dsv3Error):
    """A model-parallel degree that the checkpoint cannot be split into."""


class DownloadError(Dsv3Error):
    """A repository that cannot be fetched: gated, missing, unknown revision, unreachable, offline without a copy."""


class DeviceError(Dsv3Error):
    """The requested device (or its kernel) is not available."""


class UnsupportedModelError(Dsv3Error):
    """A model this tool recognizes but does not handle (DeepSeek-V4.1): refused whole, never half-read."""


class ScaleValueError(CheckpointError):
    """A scale whose value makes the weight meaningless (NaN E8M0 byte, a product beyond BF16's range)."""

    kind = "scale_value"


class InexactConversionError(CheckpointError):
    """A conversion that would change values (an FP4 block that FP8 with one 128x128 scale cannot hold)."""

    kind = "inexact"
