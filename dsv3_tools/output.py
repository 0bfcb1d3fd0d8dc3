"""The output side of every stage that writes a checkpoint folder (``cast``, ``shard``), in one place.

A stage plans its data files (name, size, in writing order) and hands them here with the job that identifies the
run (stage, parameters, source fingerprint). ``plan_output`` then checks the destination before anything is read:
it is separate from the source, which files an earlier run of the same job finished, and whether the rest fits on
the disk. ``Output`` runs the writing side: the manifest opened (a new folder, or the same job resumed, or a refusal),
partial files of an interrupted run removed, each finished file recorded as soon as it is complete, and at the end
the sidecar files copied, the small JSON files written last (index, config: a folder that looks loadable is a
finished one) and the manifest marked complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .disk import DestinationLock, check_destination, free_bytes, human_bytes
from .errors import OutputError
from .layout import INDEX_NAME, MANIFEST_NAME, ORIGIN_NAME
from .writer import PARTIAL_SUFFIX, FileRecord, Manifest, copy_file_atomic, read_manifest, write_json_atomic

# Which of the input's other files travel with the weights. An HF-folder output (cast) keeps every one of them,
# remote code included, so that it loads the way the input did. The model-parallel layout (shard) is not a folder
# transformers can load: it keeps what the official demo reads beside the shards (tokenizer, generation config)
# and the license and README.
MP_SIDECAR_PATTERNS = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "LICENSE*", "README*")
NOT_SIDECARS = ("config.json", INDEX_NAME, MANIFEST_NAME, ORIGIN_NAME)
JSON_ALLOWANCE = 1 << 20  # room for the small JSON files written last (index, configs)


def check_separate(src: Path, dst: Path) -> None:
    """Refuse an output folder that is the input, lies inside it, or contains it: inputs are never modified."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s or s in d.parents or d in s.parents:
        raise OutputError(f"{dst}: the output folder must be outside the input folder {src}, and not contain it")


def sidecar_files(src: Path, patterns: tuple[str, ...] | None = None) -> list[str]:
    """Relative paths (sorted) of the files of ``src`` to copy beside new weights: with ``patterns``, the top-level
    files matching one; without, every file in any sub-folder. Never the weights, their index, ``config.json``
    (each stage writes its own), the manifest, or hidden files (download caches, partial files)."""
    out = []
    found = (p for pat in patterns for p in src.glob(pat)) if patterns is not None else src.rglob("*")
    for p in found:
        rel = p.relative_to(src).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        if rel in NOT_SIDECARS or rel.endswith(".safetensors"):
            continue
        out.append(rel)
    return sorted(set(out))


@dataclass
class OutputPlan:
    """What a stage will write into ``dst``, and whether it can, decided before any weight is read."""

    src: Path
    dst: Path
    job: dict  # identifies the run: a re-run with the same job resumes
    files: dict[str, int]  # data file -> planned size, in writing order
    sidecars: list[str]  # files of ``src`` copied as they are (relative paths)
    copies: dict[str, str] = field(default_factory=dict)  # output name -> file of ``src`` copied under that name
    done: set[str] = field(default_factory=set)  # data files an earlier run of this job finished (size matches)
    needed: int = 0  # bytes this run still writes
    free: int = 0  # free bytes at ``dst`` (plus the partial files a resumed run deletes first)

    @property
    def fits(self) -> bool:
        return self.needed <= self.free

    def check_space(self) -> None:
        if not self.fits:
            raise OutputError(
                f"{self.dst}: needs {human_bytes(self.needed)} of free space, only {human_bytes(self.free)} there; "
                "free some space or choose another destination"
            )


def plan_output(
    src: Path,
    dst: Path,
    job: dict,
    files: dict[str, int],
    sidecars: list[str],
    copies: dict[str, str] | None = None,
) -> OutputPlan:
    """Check ``dst`` for a job writing ``files`` (name -> size) plus sidecars and copies; nothing is written."""
    src, dst = Path(src), Path(dst)
    check_separate(src, dst)
    check_destination(dst)
    plan = OutputPlan(src, dst, job, dict(files), list(sidecars), dict(copies or {}))
    old = read_manifest(dst) if dst.is_dir() else None
    if old and old.get("job") == job:
        recs = old.get("files", {})
        plan.done = {
            n for n in files if n in recs and (dst / n).is_file() and (dst / n).stat().st_size == recs[n].get("size")
        }
    side = sum((src / s).stat().st_size for s in plan.sidecars) + sum(
        (src / s).stat().st_size for s in plan.copies.values()
    )
    plan.needed = sum(size for n, size in files.items() if n not in plan.done) + side + JSON_ALLOWANCE
    plan.free = free_bytes(dst)
    if dst.is_dir():  # partial files of an interrupted run are deleted before writing: their space counts as free
        plan.free += sum(p.stat().st_size for p in dst.rglob(".*" + PARTIAL_SUFFIX) if p.is_file())
    return plan


class Output:
    """The writing side of a run: ``with Output(plan) as out:``, ``record`` each data file, then ``finish``. While
    open it holds the destination's lock: a second run into the same folder refuses instead of mixing files."""

    def __init__(self, plan: OutputPlan) -> None:
        plan.check_space()
        self.plan = plan
        plan.dst.mkdir(parents=True, exist_ok=True)
        self.lock = DestinationLock(plan.dst).acquire()
        try:
            self.man = Manifest.open(plan.dst, plan.job)
            for p in plan.dst.rglob("." + "*" + PARTIAL_SUFFIX):  # leftovers of an interrupted run, sub-folders too
                p.unlink()
        except BaseException:
            self.lock.release()
            raise

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def is_done(self, name: str) -> bool:
        """Finished by an earlier run of this job and still intact (size and sha256 match the manifest)."""
        return self.man.is_done(name)

    def record(self, rec: FileRecord, **info: object) -> None:
        """A data file is complete: record it now, so that a kill from here on keeps it."""
        self.man.record(rec, **info)

    def finish(self, json_files: dict[str, object], extra: dict) -> None:
        """Copy the sidecars and copies, write ``json_files`` (in order), store ``extra``, mark the run complete."""
        src, dst = self.plan.src, self.plan.dst
        for rel in self.plan.sidecars:
            if not self.man.is_done(rel):
                self.man.record(copy_file_atomic(src / rel, dst / rel, rel), kind="sidecar")
        for name, rel in self.plan.copies.items():
            if not self.man.is_done(name):
                self.man.record(copy_file_atomic(src / rel, dst / name), kind="copy")
        for name, obj in json_files.items():
            self.man.record(write_json_atomic(dst / name, obj), kind="json")
        self.man.extra = extra
        self.man.finish()
