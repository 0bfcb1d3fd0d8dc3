"""The verify reference file: what a checkpoint computed on a set of prompts, kept to compare later runs with.

One safetensors file (written atomically) holding, per prompt ``i``:

- ``prompt.{i}.ids``             I64 [T]        input token ids
- ``prompt.{i}.logits``          F32 [T, V]     every position's logits (full mode), or in top-k mode
  ``prompt.{i}.topk.values``     F32 [T, k]     the k largest logits per position, descending,
  ``prompt.{i}.topk.indices``    I32 [T, k]     their token ids,
  ``prompt.{i}.lse``             F64 [T]        logsumexp of the full logits row (so top-k log-probs are exact)
- ``prompt.{i}.mtp.*``           the same for the MTP logits (T - 1 rows), when recorded
- ``prompt.{i}.hidden.norm``     F32 [R, T]     L2 norm of the residual stream per position, R = 1 + layers
  ``prompt.{i}.hidden.proj``     F32 [R, T, P]  the residual stream projected on ``projection``; row 0 is the
                                                embedding output, row 1 + L the output of decoder layer L
  ``prompt.{i}.hidden.full``     F32 [R, T, H]  the residual stream itself, the same rows (BF16 when the run
                                                computed in bfloat16: stored as computed, so lossless): row L is
                                                layer L's input, row L + 1 its output; a later run feeds row L to
                                                its own layer L (teacher forcing). Format 2; NaN rows were not
                                                recorded (the embedding row under torchrun)
and, once:

- ``projection``                 F32 [H, P]     fixed random Gaussian matrix / sqrt(P) (seed in the metadata)
- ``probe.{L}``                  BF16 [n, H]    effective (dequantized) weights of rows 0, 128, 256 ... of layer L's
                                                ``kv_a_proj_with_mqa``: one row of every block row, which tells
                                                "same effective weights" from "re-quantized" without reading more
- metadata ``dsv3_verify``: one JSON string (tool version, checkpoint fingerprint, precision path, device ...).

Format 1 (before the layer inputs) is still read: its comparisons have no per-layer teacher forcing.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import Dsv3Error
from ..writer import SafetensorsWriter

FORMAT = "dsv3-verify-reference"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: no ``hidden.full`` (no teacher forcing)
META_KEY = "dsv3_verify"
PROJ_DIM = 32
PROJ_SEED = 20261129


class ReferenceError(Dsv3Error):
    """A reference file that is missing, unreadable, or made for another model."""


@dataclass
class Logits:
    """Logits of every position: the full rows, or the top-k per row with each row's logsumexp."""

    full: torch.Tensor | None = None  # [T, V] f32
    values: torch.Tensor | None = None  # [T, k] f32, descending
    indices: torch.Tensor | None = None  # [T, k] int64
    lse: torch.Tensor | None = None  # [T] f64

    @classmethod
    def from_full(cls, logits: torch.Tensor, topk: int | None = None) -> Logits:
        logits = logits.detach().to("cpu", torch.float32).contiguous()
        if topk is None or topk >= logits.shape[-1]:
            return cls(full=logits)
        v, i = torch.topk(logits, topk, dim=-1, sorted=True)
        return cls(values=v.contiguous(), indices=i.to(torch.int64), lse=torch.logsumexp(logits.double(), dim=-1))

    @property
    def is_topk(self) -> bool:
        return self.full is None

    @property
    def rows(self) -> int:
        return int((self.full if self.full is not None else self.values).shape[0])


@dataclass
class PromptRecord:
    ids: torch.Tensor  # [T] int64
    logits: Logits
    hidden_norm: torch.Tensor  # [R, T] f32 (NaN where not recorded)
    hidden_proj: torch.Tensor  # [R, T, P] f32
    mtp: Logits | None = None
    hidden: torch.Tensor | None = None  # [R, T, H] f32 or bf16: every layer's input and the last one's output


@dataclass
class Reference:
    """An in-memory reference: per-prompt records, the projection, the weight probe and the metadata."""

    prompts: list[PromptRecord]
    projection: torch.Tensor  # [H, P]
    probe: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [n, H] bf16
    meta: dict = field(default_factory=dict)

    @property
    def ids(self) -> list[list[int]]:
        return [p.ids.tolist() for p in self.prompts]

    @property
    def has_mtp(self) -> bool:
        return bool(self.prompts) and all(p.mtp is not None for p in self.prompts)

    @property
    def has_inputs(self) -> bool:
        """Whether every layer's input hidden states are held (what teacher forcing needs)."""
        return bool(self.prompts) and all(p.hidden is not None for p in self.prompts)


def make_projection(hidden: int, dim: int = PROJ_DIM, seed: int = PROJ_SEED) -> torch.Tensor:
    """The fixed random projection [hidden, dim] used for hidden-state summaries (CPU generator: reproducible)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((hidden, dim), generator=g, dtype=torch.float32) / math.sqrt(dim)


def _logits_entries(prefix: str, lg: Logits) -> list[tuple[str, torch.Tensor]]:
    if lg.full is not None:
        return [(f"{prefix}logits", lg.full)]
    return [
        (f"{prefix}topk.values", lg.values),
        (f"{prefix}topk.indices", lg.indices.to(torch.int32)),
        (f"{prefix}lse", lg.lse.double()),
    ]


def save_reference(path: str | Path, ref: Reference) -> int:
    """Write ``ref`` to ``path`` atomically (temporary name, fsync, rename); return the file size."""
    path = Path(path)
    if path.is_dir():
        raise ReferenceError(f"{path} is a folder; --save-reference takes a file name")
    if not path.parent.is_dir():
        raise ReferenceError(f"{path.parent}: no such folder")
    tensors: list[tuple[str, torch.Tensor]] = [("projection", ref.projection)]
    for i, p in enumerate(ref.prompts):
        pre = f"prompt.{i}."
        tensors.append((pre + "ids", p.ids.to(torch.int64)))
        tensors += _logits_entries(pre, p.logits)
        if p.mtp is not None:
            tensors += _logits_entries(pre + "mtp.", p.mtp)
        tensors.append((pre + "hidden.norm", p.hidden_norm.float()))
        tensors.append((pre + "hidden.proj", p.hidden_proj.float()))
        if p.hidden is not None:
            tensors.append((pre + "hidden.full", p.hidden if p.hidden.dtype == torch.bfloat16 else p.hidden.float()))
    for layer, rows in sorted(ref.probe.items()):
        tensors.append((f"probe.{layer}", rows.to(torch.bfloat16)))
    from ..stfile import dtype_name

    tensors = [(n, t.detach().to("cpu").contiguous()) for n, t in tensors]
    meta = dict(ref.meta) | {"format": FORMAT, "format_version": FORMAT_VERSION, "prompts": len(ref.prompts)}
    entries = [(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors]
    w = SafetensorsWriter(path, entries, {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)})
    try:
        for n, t in tensors:
            w.write(n, t)
        return w.finish().size
    except BaseException:
        w.abort()
        raise


def is_reference_file(path: str | Path) -> bool:
    """True when ``path`` is a file whose safetensors metadata marks it as a verify reference."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        from ..stfile import read_header

        return META_KEY in read_header(p).metadata
    except Dsv3Error:
        return False


def load_reference(path: str | Path) -> Reference:
    """Read a reference file written by ``save_reference``; raise ``ReferenceError`` naming what is wrong."""
    from ..stfile import read_header, torch_dtype

    p = Path(path)
    if not p.is_file():
        raise ReferenceError(f"{p}: no such reference file")
    try:
        hdr = read_header(p)
    except Dsv3Error as e:
        raise ReferenceError(f"{p}: not a readable safetensors file ({e})") from None
    raw_meta = hdr.metadata.get(META_KEY)
    if raw_meta is None:
        raise ReferenceError(f"{p}: not a dsv3-tools verify reference (no {META_KEY!r} metadata)")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError:
        raise ReferenceError(f"{p}: corrupt reference metadata") from None
    if meta.get("format") != FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise ReferenceError(
            f"{p}: reference format {meta.get('format_version')!r} is not one this version reads "
            f"({', '.join(map(str, READABLE_VERSIONS))}): save the reference again with this version"
        )
    tensors: dict[str, torch.Tensor] = {}
    with open(p, "rb") as f:
        for name, info in hdr.tensors.items():
            f.seek(info.start)
            buf = bytearray(info.nbytes)
            if f.readinto(buf) != info.nbytes:
                raise ReferenceError(f"{p}: truncated at tensor {name!r}")
            t = torch.frombuffer(buf, dtype=torch.uint8) if info.nbytes else torch.empty(0, dtype=torch.uint8)
            tensors[name] = t.view(torch_dtype(info.dtype)).reshape(info.shape)

    def need(name: str) -> torch.Tensor:
        if name not in tensors:
            raise ReferenceError(f"{p}: tensor {name!r} missing from the reference")
        return tensors[name]

    def logits(prefix: str) -> Logits | None:
        if prefix + "logits" in tensors:
            return Logits(full=tensors[prefix + "logits"].float())
        if prefix + "topk.values" in tensors:
            return Logits(
                values=need(prefix + "topk.values").float(),
                indices=need(prefix + "topk.indices").to(torch.int64),
                lse=need(prefix + "lse").double(),
            )
        return None

    prompts = []
    for i in range(int(meta.get("prompts", 0))):
        pre = f"prompt.{i}."
        lg = logits(pre)
        if lg is None:
            raise ReferenceError(f"{p}: prompt {i} has no logits")
        ids = need(pre + "ids").to(torch.int64)
        if lg.rows != ids.numel():
            raise ReferenceError(f"{p}: prompt {i} has {ids.numel()} ids but {lg.rows} logits rows")
        norm = need(pre + "hidden.norm")
        full = tensors.get(pre + "hidden.full")
        if full is not None and (full.dim() != 3 or tuple(full.shape[:2]) != (norm.shape[0], ids.numel())):
            raise ReferenceError(f"{p}: prompt {i}: hidden.full {list(full.shape)} does not match its hidden.norm")
        prompts.append(PromptRecord(ids, lg, norm, need(pre + "hidden.proj"), logits(pre + "mtp."), full))
    if not prompts:
        raise ReferenceError(f"{p}: the reference holds no prompts")
    probe = {int(n.split(".")[1]): t for n, t in tensors.items() if n.startswith("probe.")}
    return Reference(prompts, need("projection").float(), probe, meta)
