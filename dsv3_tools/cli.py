"""The ``dsv3-tools`` command line: one thin command per stage. Library functions do the work and return
report dataclasses; this file parses options and renders, and maps typed errors to one-line messages."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import Dsv3Error, check_device

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Move DeepSeek-V3-family checkpoints between formats, streaming, and prove nothing broke.",
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"dsv3-tools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass  # the app's help text is set on typer.Typer above


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON report on stdout instead of tables.")]
ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Built-in config name or a config.json path.")]


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="New folder to write.")],
    config: ConfigOpt = "tiny",
    dtype: Annotated[str, typer.Option(help="fp8 (block-quantized, with scales) or bf16.")] = "fp8",
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    shards: Annotated[int, typer.Option(help="Number of safetensors files.")] = 4,
    layers: Annotated[int | None, typer.Option(help="Reduce depth to this many main layers.")] = None,
    experts: Annotated[int | None, typer.Option(help="Reduce the routed experts to this many.")] = None,
    mtp: Annotated[int | None, typer.Option(help="Number of MTP layers (default: the config's).")] = None,
    scale_fmt: Annotated[str | None, typer.Option(help="ue8m0 for power-of-two scales (V3.1 style).")] = None,
    json_: JsonOpt = False,
) -> None:
    """Write a synthetic checkpoint in the exact Hugging Face format (random weights)."""
    from . import report
    from .checkpoint import nbytes
    from .config import ModelConfig
    from .names import expected_tensors
    from .synth import derive_config
    from .synth import synth as run

    cfg = derive_config(
        ModelConfig.load(config), dtype=dtype, scale_fmt=scale_fmt, layers=layers, experts=experts, mtp=mtp
    )
    total = sum(nbytes(s.dtype, s.shape) for s in expected_tensors(cfg).values())
    with report.byte_progress(total, "synth", enabled=not json_) as advance:
        r = run(
            out,
            config,
            dtype=dtype,
            seed=seed,
            shards=shards,
            layers=layers,
            experts=experts,
            mtp=mtp,
            scale_fmt=scale_fmt,
            progress=advance,
        )
    if json_:
        report.print_json(r)
    else:
        report.info(f"wrote {r.tensors} tensors, {report.human_bytes(r.bytes)} in {r.files} file(s) to {r.path}")


@app.command()
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder (HF or model-parallel).")],
    json_: JsonOpt = False,
) -> None:
    """Describe a checkpoint and list every problem found. Exit 0 clean, 1 problems, 2 bad input."""
    from . import report
    from .inspect import inspect_checkpoint

    r = inspect_checkpoint(ckpt)
    if json_:
        report.print_json(r)
    else:
        report.render_inspect(r)
    raise typer.Exit(0 if r.ok else 1)


@app.command()
def download(
    repo_id: Annotated[str, typer.Argument(help="Hub repository, e.g. deepseek-ai/DeepSeek-V3.")],
    local_dir: Annotated[
        Path | None, typer.Option("--local-dir", help="Folder to download into (default: the HF cache).")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit (default: main).")] = None,
    include: Annotated[list[str] | None, typer.Option(help="Only files matching this pattern (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="Skip files matching this pattern (repeatable).")] = None,
    max_workers: Annotated[int, typer.Option(help="Files transferred at once.")] = 8,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan (files, bytes, free disk) only.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip hashing and header checks.")] = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="Re-hash files already present; fetch bad ones again.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Download even if the disk looks too small.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Fetch a Hub repository resumably and check every file against the Hub. Exit 0 intact, 1 problems, 2 error."""
    from . import report
    from .download import download as run

    kw = dict(
        local_dir=local_dir,
        revision=revision,
        include=include or (),
        exclude=exclude or (),
        max_workers=max_workers,
        verify=not no_verify,
        repair=repair,
        force=force,
    )
    plan = run(repo_id, dry_run=True, **kw)
    if not json_:
        _download_plan(plan)
    if dry_run or plan.offline:
        if json_:
            report.print_json(plan)
        elif plan.offline:
            _download_summary(plan)
        raise typer.Exit(0 if plan.ok else 1)

    def done(f) -> None:
        if not json_ and f.state != "present":
            rate = f"{report.human_bytes(f.transferred / f.seconds)}/s" if f.seconds > 0 else ""
            line = f"{f.state:>8}  {f.name}  {report.human_bytes(f.transferred)} in {f.seconds:.1f} s {rate}"
            (report.error if f.problem else report.info)(line + (f": {f.problem}" if f.problem else ""))

    with report.byte_progress(plan.need_bytes, "download", enabled=not json_ and plan.need_bytes > 0) as advance:
        r = run(repo_id, progress=advance, on_file=done, **kw)
    if json_:
        report.print_json(r)
    else:
        _download_summary(r)
    raise typer.Exit(0 if r.ok else 1)


def _download_plan(p) -> None:
    from . import report

    states = {s: sum(f.state == s for f in p.files) for s in ("present", "planned")}
    rows = [
        ("repository", f"{p.repo_id} @ {p.revision}" + (f" ({p.commit[:12]})" if p.commit else "")),
        ("destination", p.destination),
        ("files", f"{len(p.files)} selected, {states['present']} present, {states['planned']} to fetch"),
        (
            "bytes",
            f"{report.human_bytes(p.total_bytes)} in all, {report.human_bytes(p.present_bytes)} present, "
            f"{report.human_bytes(p.resume_bytes)} resumable",
        ),
        ("to download", report.human_bytes(p.need_bytes)),
        (
            "free space",
            f"{report.human_bytes(p.free_bytes)} (margin {report.human_bytes(p.margin_bytes)})"
            + ("" if p.fits else ": NOT ENOUGH (--force to try anyway)"),
        ),
    ]
    if p.offline:
        rows = [rows[0], rows[1], ("mode", "offline (HF_HUB_OFFLINE=1): checking the local copy only")]
    report.kv_table("download plan", rows)


def _download_summary(r) -> None:
    from . import report

    counts = {}
    for f in r.files:
        counts[f.state] = counts.get(f.state, 0) + 1
    report.info(
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"; received {report.human_bytes(r.transferred_bytes)} in {r.seconds:.1f} s"
        + (f" ({report.human_bytes(r.throughput)}/s)" if r.throughput else "")
        + f" -> {r.destination}"
    )
    for p in r.problems:
        report.error(f"{p['kind']}: {p['file'] or ''}: {p['message']}")
    if r.problems:
        report.error("run the same command again (add --repair to re-check files already present) to fix these")


@app.command()
def shard(
    src: Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder (FP8 with scales, or BF16).")],
    dst: Annotated[Path, typer.Argument(help="New folder for model{r}-mp{N}.safetensors (or the same, to resume).")],
    mp: Annotated[int, typer.Option("--mp", help="Model-parallel degree N (ranks).")],
    mtp: Annotated[str, typer.Option(help="drop (as the demo expects) or keep the MTP layer.")] = "drop",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check N and free space, print the plan only.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Stream a checkpoint into the official model-parallel layout (one file per rank), in bounded memory."""
    from . import report
    from .shard import shard_checkpoint

    plan = shard_checkpoint(src, dst, mp=mp, mtp=mtp, dry_run=True)
    if dry_run:
        if json_:
            report.print_json(plan)
        else:
            rows = [(f.name, f"{f.tensors} tensors, {report.human_bytes(f.bytes)} ({f.status})") for f in plan.files]
            rows += [
                ("input", f"{plan.dtype}, {plan.tensors_in} tensors ({plan.tensors_mtp_dropped} MTP dropped)"),
                ("to read", report.human_bytes(plan.bytes_read)),
                ("to write", report.human_bytes(plan.bytes_written)),
                ("disk", f"needs {report.human_bytes(plan.bytes_needed)}, {report.human_bytes(plan.free_bytes)} free"),
                ("valid --mp", ", ".join(map(str, plan.valid_mp))),
                ("sidecars", ", ".join(plan.sidecars)),
            ]
            report.kv_table(f"shard plan: --mp {mp} --mtp {mtp}", rows)
        if not plan.fits:
            report.error(f"{dst}: not enough free space ({plan.bytes_needed} bytes needed, {plan.free_bytes} free)")
            raise typer.Exit(2)
        return
    with report.byte_progress(plan.bytes_written, f"shard mp{mp}", enabled=not json_) as advance:
        r = shard_checkpoint(src, dst, mp=mp, mtp=mtp, progress=advance)
    if json_:
        report.print_json(r)
    else:
        kept = sum(f.status == "kept" for f in r.files)
        report.info(
            f"wrote {mp - kept} rank file(s) ({report.human_bytes(r.bytes_written)}), kept {kept}, "
            f"read {report.human_bytes(r.bytes_read)} in {r.seconds:.1f} s to {r.dst}"
        )


@app.command()
def verify(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder to verify (HF FP8, HF BF16 or model-parallel).")],
    reference: Annotated[
        Path | None, typer.Option("--reference", "-r", help="Reference file, or a checkpoint folder to compare.")
    ] = None,
    save_reference: Annotated[
        Path | None, typer.Option("--save-reference", help="Write this checkpoint's reference file here.")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="Text prompts, one per line (uses tokenizer.json).")] = None,
    tokens: Annotated[Path | None, typer.Option(help="Token ids: a JSON list of lists.")] = None,
    topk: Annotated[int | None, typer.Option(help="Keep only the top-k logits per position in the reference.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when available).")] = "auto",
    engine: Annotated[str, typer.Option(help="triton, torch, or auto (triton on cuda, torch on cpu).")] = "auto",
    gemm: Annotated[str, typer.Option(help="bf16 (exact dequantization, default) or fp8 (FP8 GEMM path).")] = "bf16",
    dtype: Annotated[str, typer.Option(help="Compute dtype: float32, float64 or bfloat16.")] = "float32",
    stream: Annotated[
        bool | None, typer.Option("--stream/--resident", help="Load one layer at a time (default: when it must).")
    ] = None,
    mtp: Annotated[bool, typer.Option("--mtp", help="Also verify the MTP module's logits.")] = False,
    checksums: Annotated[bool, typer.Option("--checksums", help="Re-hash files against the manifest / Hub.")] = False,
    tier: Annotated[str | None, typer.Option(help="Force the thresholds: exact, float or quantized.")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Override: minimum top-1 agreement.")] = None,
    max_kl_mean: Annotated[float | None, typer.Option(help="Override: maximum mean KL (nats).")] = None,
    max_kl: Annotated[float | None, typer.Option(help="Override: maximum KL of any position.")] = None,
    min_cos: Annotated[float | None, typer.Option(help="Override: minimum cosine similarity of any position.")] = None,
    max_rel_diff: Annotated[float | None, typer.Option(help="Override: max |diff| / logit scale.")] = None,
    hidden_tol: Annotated[float | None, typer.Option(help="Override: hidden-state error naming a layer.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Check a checkpoint's structure and compare its logits with a reference. Exit 0 pass, 1 fail, 2 bad input."""
    import torch

    from . import report
    from .verify import init_distributed, planned_bytes, read_prompts_file, read_tokens_file, verify_checkpoint

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if engine == "auto":
        engine = "triton" if device.startswith("cuda") else "torch"
    rank, _ = init_distributed(device)
    lead = rank == 0
    texts = read_prompts_file(prompts) if prompts is not None else None
    ids = read_tokens_file(tokens) if tokens is not None else None
    overrides = {"min_top1": min_top1, "max_kl_mean": max_kl_mean, "max_kl": max_kl, "min_cos": min_cos}
    overrides |= {"max_rel_diff": max_rel_diff, "hidden_tol": hidden_tol}
    total = planned_bytes(ckpt, reference, checksums)
    with report.byte_progress(total, "verify", enabled=lead and not json_) as advance:
        r = verify_checkpoint(
            ckpt,
            reference=reference,
            save_reference=save_reference,
            prompts=texts,
            tokens=ids,
            device=device,
            engine=engine,
            gemm=gemm,
            stream=stream,
            mtp=mtp,
            checksums=checksums,
            thresholds=overrides,
            tier=tier,
            topk=topk,
            dtype=dtype,
            progress=advance,
            log=report.info if lead and not json_ else None,
        )
    if lead:
        if json_:
            report.print_json(r)
        else:
            report.render_verify(r)
    raise typer.Exit(r.exit_code)


cast_app = typer.Typer(no_args_is_help=True, help="Convert between block-FP8 and BF16 (streaming, resumable).")
app.add_typer(cast_app, name="cast")
MtpOpt = Annotated[str, typer.Option(help="keep (default) or drop the MTP layer (sets num_nextn_predict_layers 0).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan (files, bytes, free disk) only.")]


def _cast_cli(run, src: Path, dst: Path, dry_run: bool, json_: bool, label: str) -> None:
    """Shared by both casts: plan (refusing early when the disk is too small), then run with a progress bar."""
    from . import report

    plan = run(dry_run=True)
    if dry_run:
        if json_:
            report.print_json(plan)
            return
        rows = [(f.name, f"{f.tensors} tensors, {report.human_bytes(f.bytes_out)} ({f.status})") for f in plan.files]
        rows += [
            ("tensors", f"{plan.tensors_cast} cast, {plan.tensors_copied} copied, {plan.tensors_dropped} dropped"),
            ("to read", report.human_bytes(plan.bytes_in)),
            ("to write", report.human_bytes(plan.bytes_out)),
            ("disk", f"needs {report.human_bytes(plan.bytes_needed)}, {report.human_bytes(plan.free_bytes)} free"),
            ("device", plan.device),
            ("sidecars", ", ".join(plan.sidecars)),
        ]
        report.kv_table(f"cast {label}: {src} -> {dst}", rows)
        return
    with report.byte_progress(plan.bytes_in, f"cast {label}", enabled=not json_) as advance:
        r = run(dry_run=False, progress=advance)
    if json_:
        report.print_json(r)
    else:
        written = sum(f.status == "written" for f in r.files)
        report.info(
            f"cast {r.tensors_cast} tensors, wrote {written} file(s) ({report.human_bytes(r.bytes_out)}), "
            f"kept {len(r.kept)}, on {r.device} in {r.seconds:.1f} s to {r.dst}"
        )


@cast_app.command("fp8-bf16")
def cast_fp8_bf16(
    src: Annotated[Path, typer.Argument(help="FP8 Hugging Face checkpoint folder (weights + weight_scale_inv).")],
    dst: Annotated[Path, typer.Argument(help="New folder for the BF16 checkpoint (or the same, to resume).")],
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="CPU threads for dequantization (default: all cores).")] = None,
    mtp: MtpOpt = "keep",
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Dequantize every FP8 weight to BF16 (bf16(w * s), exact); a complete, loadable HF folder."""
    from .cast import cast_fp8_to_bf16

    def run(**kw):
        return cast_fp8_to_bf16(src, dst, device=device, workers=workers, mtp=mtp, **kw)

    _cast_cli(run, src, dst, dry_run, json_, "fp8-bf16")


@cast_app.command("bf16-fp8")
def cast_bf16_fp8(
    src: Annotated[Path, typer.Argument(help="BF16 Hugging Face checkpoint folder.")],
    dst: Annotated[Path, typer.Argument(help="New folder for the block-FP8 checkpoint (or the same, to resume).")],
    scale_fmt: Annotated[
        str | None,
        typer.Option(
            help="f32 (amax / 448) or ue8m0 (power of two, rounded up); default: the original checkpoint's "
            "(from the fp8-bf16 manifest), else f32."
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option(help="Keep weights matching this fnmatch pattern in BF16 (repeatable).")
    ] = None,
    mtp: MtpOpt = "keep",
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Re-quantize to DeepSeek block-FP8: exactly the weights that were FP8 (from the fp8-bf16 manifest)."""
    from .cast import cast_bf16_to_fp8

    def run(**kw):
        return cast_bf16_to_fp8(src, dst, scale_fmt=scale_fmt, ignore=tuple(ignore or ()), mtp=mtp, **kw)

    _cast_cli(run, src, dst, dry_run, json_, "bf16-fp8")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where to write the demo checkpoints.")] = Path("demo-out"),
) -> None:
    """Run every stage on the built-in tiny model: synth, inspect, and each later stage."""
    from .demo import run_demo

    raise typer.Exit(run_demo(workdir))


@app.command()
def generate(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder (HF FP8, HF BF16 or model-parallel shards).")],
    prompt: Annotated[list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable: a batch).")] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input-file", "-i", help="Prompts: one per line, or JSONL (see README).")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (through the chat template).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Send the text as it is, without the chat template.")] = False,
    temperature: Annotated[float | None, typer.Option(help="0 = greedy (default: generation_config.json).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling, in (0, 1].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Keep the k most probable tokens (0 = off).")] = None,
    min_p: Annotated[float | None, typer.Option(help="Drop tokens below min-p x the top probability.")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="> 1 discourages repeats (1 = off).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed (prompt i uses seed + i); same seed, same text.")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Tokens to generate at most (default 256).")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop at this text, not printed (repeatable).")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="KV cache length: prompt + answer (default 4096).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Sequences run together (the cache holds this many).")] = 8,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N, or auto (cuda when available).")] = "auto",
    engine: Annotated[str, typer.Option(help="triton, torch, or auto (triton on cuda, torch on cpu).")] = "auto",
    gemm: Annotated[str, typer.Option(help="bf16 (FP8 dequantized once at load) or fp8 (FP8 GEMM).")] = "bf16",
    dtype: Annotated[str, typer.Option(help="Compute dtype: auto (bfloat16 on cuda), float32, bfloat16.")] = "auto",
    cuda_graph: Annotated[
        bool | None, typer.Option("--cuda-graph/--no-cuda-graph", help="Replay the decode step (default: on cuda).")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Do not stop at EOS (benchmarks).")] = False,
    json_: Annotated[bool, typer.Option("--json", help="One JSON object per request on stdout.")] = False,
) -> None:
    """Run the model: chat (no --prompt / --input-file), or a batch of prompts. Exit 0, or 2 on bad input."""
    from . import report
    from .generate import Options, run_generate

    opts = Options(
        ckpt, prompts=list(prompt or []), input_file=input_file, system=system, raw=raw, temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
        max_new_tokens=max_new_tokens, stop=tuple(stop or ()), max_seq_len=max_seq_len, max_batch_size=max_batch_size,
        json=json_, device=device, engine=engine, gemm=gemm, dtype=dtype, cuda_graph=cuda_graph, ignore_eos=ignore_eos,
    )  # fmt: skip
    raise typer.Exit(run_generate(opts, report.generate_ui(json_)))


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    from . import report

    try:
        rc = app(standalone_mode=False, prog_name="dsv3-tools")  # click returns typer.Exit's code in this mode
        if rc == 130:  # typer turns KeyboardInterrupt into a silent Exit(130): the except below never sees it
            report.error("interrupted; finished outputs are kept: run the same command again to resume")
        sys.exit(rc if isinstance(rc, int) else 0)
    except Dsv3Error as e:
        report.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        report.error("interrupted; finished outputs are kept: run the same command again to resume")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except typer.Abort:
        report.error("aborted")
        sys.exit(130)
    except Exception as e:
        # Usage errors (unknown option, missing argument) arrive as click's ClickException in non-standalone mode;
        # typer >= 0.2x vendors its own click, so the class is recognized by what it has, not by its module.
        if callable(getattr(e, "format_message", None)) and isinstance(getattr(e, "exit_code", None), int):
            ctx, message = getattr(e, "ctx", None), e.format_message()
            if message:  # (empty when no arguments were given: the help was printed instead)
                hint = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
                report.error(f"{message}{hint}")
            sys.exit(e.exit_code)
        raise
