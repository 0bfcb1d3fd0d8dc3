"""Structural checks of an opened checkpoint, beyond what ``open_checkpoint`` collects (which are included): the MP
folder's ModelArgs against its HF config, replicated tensors identical across rank files, block scales positive and
finite (DeepSeek-V4: E8M0 scales not NaN, decoded weights finite, hash routing ids in range; ``v4/validate.py``), and
with ``--checksums`` every file against ``dsv3-manifest.json`` and the Hub's download metadata."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import torch

from .. import names as N
from ..checkpoint import Checkpoint
from ..errors import CheckpointError
from ..family import is_v4
from ..layout import MANIFEST_NAME, MP_MTP_RE, MP_RE, mp_config_files
from ..modelargs import demo_model_args
from ..runtime import dist_info
from ..v4.modelargs import demo_model_args as v4_model_args
from ..v4.modelargs import differences as v4_differences
from ..v4.validate import check_values as check_v4_values
from ..v4.validate import resolve_format
from ..writer import read_manifest, sha256_file

Progress = Callable[[int], None]


# Problems that leave the checkpoint loadable by the model (the numeric check still runs).
RUNNABLE_KINDS = {
    "index_mismatch",
    "unexpected_tensor",
    "orphan_scale",
    "checksum",
    "replica",
    "config_args",
    "scale_value",
}


def problem(kind: str, message: str, file: str | None = None, tensor: str | None = None) -> dict:
    """A structural problem as the report lists it."""
    return {"kind": kind, "file": file, "tensor": tensor, "message": message}


def check_structure(
    ck: Checkpoint, *, checksums: bool = False, progress: Progress | None = None
) -> tuple[list[dict], list[str]]:
    """Structural problems and warnings beyond what ``open_checkpoint`` collects (which are included)."""
    problems = [p.as_dict() for p in ck.problems]
    warnings: list[str] = list(ck.warnings)
    if ck.config is None:
        problems.append(problem("config", "no config: names, shapes and dtypes cannot be checked", "config.json"))
        return problems, warnings
    if ck.layout == "mp":
        problems += _check_model_args(ck)
        if dist_info()[0] == 0:  # reads a few small tensors of every rank file: one process does it
            problems += _check_replicas(ck, limit=None if checksums else 1 << 20)
    else:
        for rel, h in ck.headers.items():
            if h.metadata.get("format") != "pt":
                warnings.append(f"{rel}: safetensors metadata lacks format=pt (transformers refuses such files)")
                break
        if ck.layout == "hf-sharded" and not (
            isinstance(ck.index.get("metadata"), dict) and "total_size" in ck.index["metadata"]
        ):
            warnings.append("index has no metadata.total_size (some loaders need it)")
    if not (ck.path / "tokenizer.json").is_file():
        warnings.append("no tokenizer.json: text prompts cannot be tokenized (default prompts use fixed token ids)")
    problems += _check_scale_values(ck)
    return problems, warnings


def _check_model_args(ck: Checkpoint) -> list[dict]:
    """The MP folder's ModelArgs (the demo's ``--config``) must describe the same model as its HF config."""
    hf, p = mp_config_files(ck.path)
    f = p.name
    if not p.is_file():
        return [problem("config_args", f"no {f} (the inference demo's ModelArgs) beside the rank files", f)]
    try:
        args = json.loads(p.read_text())
        assert isinstance(args, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        return [problem("config_args", f"{f} is not a JSON object", f)]
    cfg = ck.config
    if is_v4(cfg):
        want = v4_model_args(cfg, resolve_format(cfg, ck.tensors), mtp=any(n.startswith("mtp.") for n in ck.tensors))
        return [problem("config_args", m, f) for m in v4_differences(args, want)]
    # The geometry keys of the demo's ModelArgs, as shard writes them (max_seq_len is the user's to choose; dtype and
    # scale_fmt are checked below).
    want = {k: v for k, v in demo_model_args(cfg).items() if k not in ("max_seq_len", "dtype", "scale_fmt")}
    out = []
    for k, v in want.items():
        if (
            k in args
            and args[k] != v
            and not (isinstance(v, float) and isinstance(args[k], (int, float)) and float(args[k]) == v)
        ):
            out.append(problem("config_args", f"ModelArgs {k}={args[k]!r} but {hf.name} implies {v!r}", f))
    dt = args.get("dtype", "bf16")
    if (dt == "fp8") != cfg.is_fp8:
        out.append(
            problem(
                "config_args",
                f"ModelArgs dtype={dt!r} but the weights are {'FP8' if cfg.is_fp8 else 'BF16'}",
                f,
            )
        )
    sf = cfg.quant.scale_fmt if cfg.quant else None
    if cfg.is_fp8 and args.get("scale_fmt") != sf:
        out.append(
            problem(
                "config_args",
                f"ModelArgs scale_fmt={args.get('scale_fmt')!r}, {hf.name} says {sf!r}",
                f,
            )
        )
    return out


def _check_replicas(ck: Checkpoint, limit: int | None) -> list[dict]:
    """Replicated tensors must hold the same bytes in every rank file (a file from another checkpoint shows here)."""
    out = []
    for name, parts in ck.mp_parts.items():
        if len(parts) < 2:
            continue
        try:
            split = ck.split_of(name)
        except CheckpointError:
            continue
        if split is not None or (limit is not None and parts[0].info.nbytes > limit):
            continue
        parts = sorted(parts, key=lambda p: p.rank)
        base = ck.read_bytes(parts[0].info)
        for p in parts[1:]:
            if p.info.shape != parts[0].info.shape or not torch.equal(ck.read_bytes(p.info), base):
                out.append(
                    problem("replica", f"replicated tensor differs between rank 0 and rank {p.rank}", p.info.file, name)
                )
    return out


def _check_scale_values(ck: Checkpoint) -> list[dict]:
    """Block scales are positive and finite (quantization never makes anything else). Under torchrun each rank
    reads only its own file."""
    rank, world = dist_info()
    if is_v4(ck.config):
        return check_v4_values(ck, None if world == 1 else {rank})
    out = []
    for name in ck.tensors:
        if not N.is_scale(name):
            continue
        pieces = ck.mp_parts.get(name, []) if ck.layout == "mp" else []
        infos = [p.info for p in pieces if world == 1 or p.rank == rank] if pieces else [ck.tensors[name]]
        for info in infos:
            if info.dtype != "F32":
                continue
            s = ck.read_info(info)
            bad = ~(torch.isfinite(s) & (s > 0))
            if bool(bad.any()):
                idx = [int(i) for i in bad.nonzero()[0]]
                out.append(problem("scale_value", f"scale block {idx} is {float(s[tuple(idx)])}", info.file, name))
    return out


def check_checksums(ck: Checkpoint, progress: Progress | None = None) -> tuple[dict, list[dict]]:
    """Re-hash files against ``dsv3-manifest.json`` and the Hub download metadata (``.cache/huggingface``)."""
    want: dict[str, tuple[str, str, int | None]] = {}  # file -> (sha256, source, size)
    problems: list[dict] = []
    man = read_manifest(ck.path)
    if man is not None:
        if not man.get("complete", False):
            problems.append(problem("checksum", "the run that wrote this folder did not finish", MANIFEST_NAME))
        for name, rec in man.get("files", {}).items():
            if isinstance(rec, dict) and "sha256" in rec:
                want[name] = (rec["sha256"], MANIFEST_NAME, rec.get("size"))
    meta_dir = ck.path / ".cache" / "huggingface" / "download"
    if meta_dir.is_dir():
        for m in meta_dir.rglob("*.metadata"):
            rel = m.relative_to(meta_dir).as_posix().removesuffix(".metadata")
            lines = m.read_text(errors="replace").splitlines()
            etag = lines[1].strip().strip('"') if len(lines) > 1 else ""
            if re.fullmatch(r"[0-9a-f]{64}", etag) and rel not in want:  # LFS files: the etag is their sha256
                want[rel] = (etag, "hub download metadata", None)
    rank, world = dist_info()
    if world > 1:  # each rank re-hashes its own rank file; rank 0 also every other file

        def rank_of(rel: str) -> int | None:
            m = MP_RE.match(rel) or MP_MTP_RE.match(rel)
            return int(m.group(1)) if m else None

        want = {k: v for k, v in want.items() if rank_of(k) == rank or (rank == 0 and rank_of(k) is None)}
    checked, bad = 0, 0
    for rel, (sha, src, size) in sorted(want.items()):
        p = ck.path / rel
        if not p.is_file():
            problems.append(problem("checksum", f"listed in {src} but missing", rel))
            bad += 1
            continue
        if size is not None and p.stat().st_size != size:
            problems.append(problem("checksum", f"size {p.stat().st_size} != {size} recorded in {src}", rel))
            bad += 1
            continue
        got = sha256_file(p)
        if progress:
            progress(p.stat().st_size)
        checked += 1
        if got != sha:
            problems.append(problem("checksum", f"sha256 {got[:12]}... != {sha[:12]}... recorded in {src}", rel))
            bad += 1
    data = [f for f in ck.files if f not in want]
    summary = {
        "files_checked": checked,
        "mismatches": bad,
        "unlisted_data_files": data,
        "sources": sorted({s for _, s, _ in want.values()}),
    }
    return summary, problems


def gather_problems(problems: list[dict]) -> list[dict]:
    """The union of every rank's problems, in rank order, without duplicates."""
    import torch.distributed as dist

    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, problems)
    out, seen = [], set()
    for ps in every:
        for p in ps:
            key = json.dumps(p, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out
