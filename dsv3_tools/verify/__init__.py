"""``verify``: prove that a checkpoint computes what a reference did, and say where it does not.

One path, in this order (each step in its own module):

1. ``structure``: the tensor set against the config in any layout, scales where the config puts them, the config
   against the content, replicated tensors identical across rank files, with ``checksums`` every file against
   ``dsv3-manifest.json`` and the Hub download metadata;
2. ``baseline.open_source``: the reference (a file written by ``--save-reference``, or a checkpoint folder) opened
   and checked, and ``prompts``: the token ids (the reference file's, or built-in, text or id prompts);
3. ``memory``: the plan (resident or streamed), before any weight is read;
4. ``run``: the candidate run on the prompts (``model.run_model``), kept as a ``Reference``; ``--save-reference``
   writes it; ``baseline.baseline`` gives the reference's side as the same type;
   When the reference holds every layer's input (a reference folder, run first; a file of format 2), the
   candidate's layers are also run on those inputs as they are loaded (``forcing``: teacher forcing);
5. ``tiers`` chooses the limits from what differs between the two runs, ``metrics`` judges every position's logits
   and every teacher-forced layer, and on a failure ``localize`` names the failing layers (or, without teacher
   forcing, the first diverging one) and (against a folder) the differing tensors and their files.

The report (``result.VerifyReport``) is data; ``report.render_verify`` shows it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from ..checkpoint import Checkpoint, open_checkpoint
from ..disk import check_destination
from ..errors import CheckpointError, Dsv3Error, ShardingError
from ..family import is_v4
from ..layout import MANIFEST_NAME
from ..runtime import check_device, dist_info
from ..writer import read_manifest
from .baseline import Baseline, Source, baseline, open_lenient, open_source
from .forcing import Forcing
from .localize import compare_tensors, files_of, localize, localize_layers, localize_nonfinite
from .memory import memory_plan
from .metrics import TIERS, Thresholds, compare_logits, limit_problem, summarize
from .prompts import DEFAULT_PROMPTS, check_ids, default_ids, read_prompts_file, read_tokens_file, tokenize
from .reference import Logits, PromptRecord, Reference, make_projection
from .reference import save_reference as write_reference
from .result import LayerResult, MemoryPlan, PromptResult, VerifyReport
from .run import RunOptions, has_mtp_tensors, run_checkpoint
from .structure import RUNNABLE_KINDS, check_checksums, check_structure, gather_problems
from .tiers import choose_tier, probe_difference

Progress = Callable[[int], None]
Notify = Callable[[str, object], None]  # (event, data): "structure", "memory", "model", "reference"

__all__ = [
    "DEFAULT_PROMPTS",
    "MemoryPlan",
    "VerifyReport",
    "check_limits",
    "dist_info",
    "planned_bytes",
    "read_prompts_file",
    "read_tokens_file",
    "verify_checkpoint",
]


def planned_bytes(ckpt: str | Path, reference: str | Path | None = None, checksums: bool = False) -> int:
    """Bytes ``verify_checkpoint`` reports through ``progress`` (for a progress bar's total)."""
    total = 0
    for p in [ckpt] + ([reference] if reference is not None and Path(reference).is_dir() else []):
        try:
            ck = open_checkpoint(p, strict=False, read_config=False)
        except Dsv3Error:
            continue
        total += sum(pt.info.nbytes for ps in ck.mp_parts.values() for pt in ps) if ck.layout == "mp" else 0
        total += sum(i.nbytes for i in ck.tensors.values()) if ck.layout != "mp" else 0
        if checksums and p == ckpt:
            man = read_manifest(p) or {}
            total += sum(r.get("size", 0) for r in man.get("files", {}).values() if isinstance(r, dict))
    return total


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    d = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}.get(str(dtype))
    if d is None:
        raise Dsv3Error(f"--dtype must be float32, float64 or bfloat16, got {dtype!r}")
    return d


def check_limits(thresholds: Thresholds | dict | None) -> None:
    """Refuse unknown limits and limits outside their range (one line naming the option), before anything runs."""
    if isinstance(thresholds, Thresholds):
        values = {k: v for k, v in thresholds.as_dict().items() if k != "tier"}
    else:
        values = dict(thresholds or {})
        unknown = set(values) - {f.name for f in fields(Thresholds)} | ({"tier"} & set(values))
        if unknown:
            raise Dsv3Error(f"unknown threshold(s): {', '.join(sorted(unknown))}")
    for k, v in values.items():
        why = limit_problem(k, v)
        if why:
            raise Dsv3Error(why)


def _thresholds(thresholds: Thresholds | dict | None, tier: str) -> Thresholds:
    if isinstance(thresholds, Thresholds):
        return thresholds
    return TIERS[tier].override(**(thresholds or {}))


def verify_checkpoint(
    ckpt: str | Path,
    *,
    reference: str | Path | None = None,
    save_reference: str | Path | None = None,
    prompts: list[str] | None = None,
    tokens: list[list[int]] | None = None,
    device: str = "cpu",
    engine: str = "torch",
    gemm: str = "bf16",
    stream: bool | None = None,
    mtp: bool = False,
    checksums: bool = False,
    thresholds: Thresholds | dict | None = None,
    tier: str | None = None,
    topk: int | None = None,
    dtype: torch.dtype | str = torch.float32,
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> VerifyReport:
    """Check ``ckpt`` structurally, run it on prompts and compare with ``reference`` (a reference file or a
    checkpoint folder), and/or write a reference file to ``save_reference``.

    ``thresholds``: a full ``Thresholds`` or a dict of limits overriding the automatically chosen tier's
    (``tier`` forces the tier). ``notify(event, data)`` hears of each step as it ends. Raises ``Dsv3Error`` for
    bad input; a failing checkpoint is a report with ``verdict == "fail"``.
    """
    check_device(device)
    t_start = time.perf_counter()
    tell = notify or (lambda event, data: None)
    dtype = _as_dtype(dtype)
    if reference is not None and save_reference is not None:
        raise Dsv3Error("--reference and --save-reference are exclusive: save a reference once, then compare with it")
    if prompts is not None and tokens is not None:
        raise Dsv3Error("--prompts and --tokens are exclusive")
    if tier is not None and tier not in TIERS:
        raise Dsv3Error(f"--tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if gemm not in ("bf16", "fp8") or engine not in ("torch", "triton"):
        raise Dsv3Error(f"--gemm must be bf16 or fp8 and --engine torch or triton (got {gemm!r}, {engine!r})")
    if topk is not None and topk < 1:
        raise Dsv3Error("--topk must be >= 1")
    check_limits(thresholds)
    if save_reference is not None:  # before any weight is read
        check_destination(save_reference, folder=False)
    rank, world = dist_info()
    ck, cfg_problems = open_lenient(ckpt)
    rep = VerifyReport(str(ckpt), ck.layout, ck.world)

    def done() -> VerifyReport:
        rep.seconds["total"] = round(time.perf_counter() - t_start, 3)
        return rep

    if world > 1 and (ck.layout != "mp" or ck.world != world):
        what = f"an MP-{ck.world} checkpoint" if ck.layout == "mp" else f"a {ck.layout} checkpoint"
        fix = f"run one process per rank file (--nproc-per-node {ck.world})" if ck.layout == "mp" else "shard it first"
        raise ShardingError(f"torchrun started {world} processes but {ckpt} is {what}: {fix}")

    # The reference first: a missing or unreadable one is bad input, found before any other work.
    src: Source | None = open_source(reference, world) if reference is not None else None

    # 1. structure
    t0 = time.perf_counter()
    problems, warnings = check_structure(ck, checksums=checksums, progress=progress)
    problems = cfg_problems + problems
    if checksums:
        rep.checksums, cp = check_checksums(ck, progress)
        problems += cp
        if not rep.checksums["sources"]:
            warnings.append(f"--checksums: no {MANIFEST_NAME} and no Hub download metadata to check against")
    if world > 1:  # every rank checked its own file: all of them report everything found
        problems = gather_problems(problems)
    rep.problems, rep.warnings = problems, warnings
    rep.seconds["structure"] = round(time.perf_counter() - t0, 3)
    tell("structure", rep)
    cfg = ck.config

    if is_v4(cfg):  # the numeric check does not know V4's model yet (hyper-connections, compressor, hash routing)
        if reference is not None or save_reference is not None or prompts is not None or tokens is not None:
            raise Dsv3Error(
                "DeepSeek-V4: verify checks the structure only (its numeric check is not implemented yet); "
                "drop --reference / --save-reference / --prompts / --tokens"
            )
        rep.warnings.append("DeepSeek-V4: structural checks only; the model is not run (not implemented for V4 yet)")
        if problems:
            rep.failures.append(f"{len(problems)} structural problem(s)")
        rep.verdict = "fail" if rep.failures else "pass"
        return done()

    # 2. the reference and the prompts (bad input raises before any model runs)
    if src is not None:
        rep.reference, rep.reference_kind = str(reference), src.kind
    if cfg is None:
        rep.verdict = "fail"
        rep.failures.append("no usable config: the numeric check cannot run")
        return done()
    if src is not None:
        src.check_geometry(cfg, ckpt)
    if src is not None and src.ids is not None:
        if prompts is not None or tokens is not None:
            raise Dsv3Error("the prompts come from the reference file; drop --prompts/--tokens")
        ids, projection = src.ids, src.loaded.projection
    else:
        if tokens is not None:
            ids = [list(r) for r in tokens]
        elif prompts is not None:
            ids = tokenize(ck.path, list(prompts))
        else:
            ids = default_ids(ck.path, cfg.vocab_size)
        projection = make_projection(cfg.hidden_size)
    check_ids(ids, cfg.vocab_size)
    do_mtp = mtp and has_mtp_tensors(ck)
    if mtp and not do_mtp and (cfg.num_nextn_predict_layers > 0 or (src is not None and src.has_mtp)):
        warnings.append("--mtp keep: this checkpoint has no MTP module; MTP logits not checked")
    if do_mtp and src is not None and not src.has_mtp:
        what = "reference file has no MTP logits" if src.kind == "file" else "reference checkpoint has no MTP module"
        warnings.append(f"--mtp keep: the {what}; MTP not compared")

    blocking = [p for p in problems if p["kind"] not in RUNNABLE_KINDS]
    if blocking:
        rep.verdict = "fail"
        rep.failures.append(f"{len(blocking)} structural problem(s) keep the model from loading; numeric check skipped")
        return done()

    # 3. the memory plan, 4. the runs: a reference folder's first (its layer inputs teach the candidate's layers)
    plan = memory_plan(ck, ids, device=device, stream=stream, dtype=dtype, gemm=gemm)
    rep.memory = plan
    tell("memory", plan)
    opts = RunOptions(device, engine, gemm, dtype, plan.mode == "stream")
    base: Baseline | None = None
    if src is not None:
        base = baseline(src, ids, opts, mtp=do_mtp, projection=projection, progress=progress)
    forcing = None
    if base is not None and base.ref.has_inputs:
        forcing = Forcing(base.ref, cfg.num_hidden_layers, do_mtp)
    elif base is not None:
        fmt = base.ref.meta.get("format_version")
        warnings.append(
            f"the reference file (format {fmt}) holds no layer inputs: layers are not judged alone (teacher "
            "forcing), only the logits; save the reference again with this version for per-layer checks"
        )
    try:
        cand = run_checkpoint(
            ck, ids, opts, mtp=do_mtp, projection=projection, progress=progress,
            keep_hidden=save_reference is not None, teacher=forcing,
        )  # fmt: skip
    except CheckpointError as e:  # a tensor the structural pass could not see (e.g. truncated data)
        rep.problems.append(e.as_dict())
        rep.verdict = "fail"
        rep.failures.append(f"the model could not load this checkpoint: {e}")
        return done()
    rep.run = cand.meta["run"]
    rep.seconds["model"] = cand.meta["seconds"]
    tell("model", rep)

    nonfinite = [i for i, r in enumerate(cand.prompts) if not bool(torch.isfinite(r.logits.full).all())]
    if nonfinite:
        rep.failures.append(f"non-finite logits in prompt(s) {nonfinite}")
        rep.divergence = localize_nonfinite(cand.prompts)
    if save_reference is not None:
        _save(rep, cand, save_reference, topk, fails=bool(problems or nonfinite), lead=rank == 0, tell=tell)
    if base is None:
        if problems:
            rep.failures.append(f"{len(problems)} structural problem(s)")
        rep.verdict = "fail" if rep.failures else "pass"
        return done()

    # 5. compare
    if forcing is not None and forcing.skipped:
        warnings.append(f"the reference did not record the input of layer(s) {forcing.skipped}: not judged alone")
    _compare(rep, ck, base.ref, cand, base.ck, tier, thresholds, do_mtp, forcing)
    if problems:
        rep.failures.append(f"{len(problems)} structural problem(s)")
        rep.verdict = "fail"
    return done()


def _save(
    rep: VerifyReport, cand: Reference, path: str | Path, topk: int | None, *, fails: bool, lead: bool, tell: Notify
) -> None:
    """Write the candidate's run as a reference file (top-k logits with ``topk``); only from a sound checkpoint."""
    if fails:  # a reference must come from a checkpoint that passes its own checks
        rep.failures.append(f"reference not written to {path}: this checkpoint fails its own checks")
        return
    recs = [
        PromptRecord(
            r.ids,
            Logits.from_full(r.logits.full, topk),
            r.hidden_norm,
            r.hidden_proj,
            Logits.from_full(r.mtp.full, topk) if r.mtp is not None else None,
            r.hidden,
        )
        for r in cand.prompts
    ]
    meta = cand.meta | {"logits": {"mode": "topk" if topk else "full", "k": topk}}
    if lead:
        size = write_reference(path, Reference(recs, cand.projection, cand.probe, meta))
        tell("reference", (str(path), size))
    rep.saved_reference = str(path)


def _compare(
    rep: VerifyReport,
    ck: Checkpoint,
    ref: Reference,
    cand: Reference,
    ref_ck: Checkpoint | None,
    tier: str | None,
    thresholds: Thresholds | dict | None,
    do_mtp: bool,
    forcing: Forcing | None = None,
) -> None:
    """Judge ``cand`` against ``ref``: the tier and its limits, per-prompt metrics, every teacher-forced layer, and
    where a failure starts."""
    cfg = ck.config
    probe = probe_difference(ref.probe, cand.probe) if ref.probe and cand.probe else None
    auto, reasons = choose_tier(ref.meta, cand.meta, probe)
    rep.tier = tier or auto
    rep.tier_reasons = reasons + ([f"tier forced to {tier} (automatic: {auto})"] if tier and tier != auto else [])
    th = _thresholds(thresholds, rep.tier)
    rep.thresholds = th.as_dict()

    per, per_mtp = [], []
    for i, (r, c) in enumerate(zip(ref.prompts, cand.prompts)):
        m = compare_logits(r.logits, c.logits.full)
        per.append(m)
        st = summarize([m])
        mst = None
        if do_mtp and r.mtp is not None and c.mtp is not None:
            mm = compare_logits(r.mtp, c.mtp.full)
            per_mtp.append(mm)
            mst = summarize([mm])
        fails = st.failures(th) + ([f"MTP: {f}" for f in mst.failures(th.for_mtp())] if mst else [])
        rep.prompts.append(PromptResult(i, len(r.ids), st, mst, fails))
    rep.overall = summarize(per)
    main = rep.overall.failures(th)
    rep.failures += main
    rep.logits_ok = not main
    if per_mtp:
        rep.mtp_overall = summarize(per_mtp)
        mtp_fails = rep.mtp_overall.failures(th.for_mtp())
        rep.failures += [f"MTP: {f}" for f in mtp_fails]
        rep.mtp_logits_ok = not mtp_fails
    if forcing is not None:
        for L, ls in sorted(forcing.layers.items()):
            rep.layers.append(LayerResult(L, f"layer {L} (model.layers.{L})", stats=ls, failures=ls.failures(th)))
        if forcing.mtp_stats is not None:  # judged alone: no relaxation for an already perturbed input
            L = cfg.num_hidden_layers
            fails = forcing.mtp_stats.failures(th)
            rep.layers.append(
                LayerResult(L, f"the MTP module (model.layers.{L})", logits=forcing.mtp_stats, failures=fails)
            )
        bad = [r for r in rep.layers if r.failures]
        if bad:
            rep.failures.append(
                f"{len(bad)} layer(s) fail on the reference's inputs (teacher-forced): "
                + ", ".join(r.where.split(" (")[0] for r in bad)
            )
    rep.verdict = "fail" if rep.failures else "pass"
    if rep.verdict == "fail":
        if rep.layers:
            rep.divergence = localize_layers(rep.layers, not rep.logits_ok)
        else:
            distributed = max(ref.meta["run"].get("world", 1), cand.meta["run"]["world"]) > 1
            skip = frozenset({0}) if distributed else frozenset()
            rep.divergence = localize(ref.prompts, cand.prompts, th.hidden_tol, cfg, skip)
        d = rep.divergence
        mtp_only = rep.logits_ok and rep.mtp_overall is not None
        if mtp_only and (d.layer is None or not rep.layers):  # the main model agrees: the MTP module does not
            d.where = f"the MTP module (model.layers.{cfg.num_hidden_layers})"
        if ref_ck is not None:
            d = rep.divergence
            focus = [r.layer for r in rep.layers if r.failures] or [
                d.layer if d.layer is not None and d.layer >= 0 else None
            ]
            if d.where.startswith("the MTP"):
                focus = [cfg.num_hidden_layers]
            rep.tensor_diffs = compare_tensors(ck, ref_ck, focus, th)
            rep.suspect_files = files_of(ck, rep.tensor_diffs)
