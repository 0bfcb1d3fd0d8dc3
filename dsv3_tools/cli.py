"""The ``dsv3-tools`` command line: one thin command per stage. Library functions do the work and return
report dataclasses; this file parses options and renders, and maps typed errors to one-line messages."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .errors import Dsv3Error

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


class Mtp(str, Enum):
    keep = "keep"
    drop = "drop"


# One meaning everywhere: whether the MTP (multi-token prediction) module goes along. Kept by default, so that
# nothing is lost without asking: it is what speculative decoding uses.
MtpOpt = Annotated[
    Mtp,
    typer.Option(
        help="keep (default) or drop the MTP module. Kept: synth writes the config's MTP layers, cast converts it "
        "like any layer, shard writes it to mtp{r}-mp{N}.safetensors beside the rank files (the upstream demo "
        "loads rank files strictly and has no MTP), verify compares its logits too. Dropped: left out, and the "
        "output config says num_nextn_predict_layers 0.",
    ),
]
ConfigOpt = Annotated[str, typer.Option("--config", "-c", help="Built-in config name or a config.json path.")]


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="New folder to write.")],
    config: ConfigOpt = "tiny",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="V3 family: fp8 (block-quantized, with scales; default) or bf16. DeepSeek-V4: fp4 (FP4 experts, "
            "the release), fp8 (FP8 experts, F32 scales: -Base) or bf16; default: the config's own."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 0,
    shards: Annotated[
        int, typer.Option(help="Number of safetensors files (DeepSeek-V4: the released layout, one per layer).")
    ] = 4,
    layers: Annotated[int | None, typer.Option(help="Reduce depth to this many main layers.")] = None,
    experts: Annotated[int | None, typer.Option(help="Reduce the routed experts to this many.")] = None,
    dense_layers: Annotated[
        int | None, typer.Option(help="Make the first N layers dense, the rest MoE (default: the config's).")
    ] = None,
    mtp: MtpOpt = Mtp.keep,
    scale_fmt: Annotated[
        str | None,
        typer.Option(
            help="ue8m0: power-of-two scales; v3.1: as the released V3.1 (ue8m0 except self_attn.o_proj, whose "
            "scales carry the mantissa 1.3228756)."
        ),
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            help="random (chaotic: the harsh case for verify) or trained (small residual branches, norms near 1, "
            "router margins, moderate attention: as stable as a trained network)."
        ),
    ] = "random",
    json_: JsonOpt = False,
) -> None:
    """Write a synthetic checkpoint in the exact Hugging Face format (random weights)."""
    from . import report
    from .synth import plan_synth, run_synth

    plan = plan_synth(
        out,
        config,
        dtype=dtype,
        seed=seed,
        shards=shards,
        layers=layers,
        experts=experts,
        mtp=None if mtp == Mtp.keep else 0,
        scale_fmt=scale_fmt,
        dense_layers=dense_layers,
        profile=profile,
    )
    with report.byte_progress(plan.bytes, "synth", enabled=not json_) as advance:
        r = run_synth(plan, progress=advance)
    report.emit(r, json_, report.render_synth)


@app.command()
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint folder (HF or model-parallel).")],
    json_: JsonOpt = False,
) -> None:
    """Describe a checkpoint and list every problem found. Exit 0 clean, 1 problems, 2 bad input."""
    from . import report
    from .inspect import inspect_checkpoint

    r = inspect_checkpoint(ckpt)
    report.emit(r, json_, report.render_inspect)
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
    from .download import plan_download, run_download

    plan = plan_download(
        repo_id,
        local_dir=local_dir,
        revision=revision,
        include=include or (),
        exclude=exclude or (),
        max_workers=max_workers,
        verify=not no_verify,
        repair=repair,
    )
    r = plan.report
    if not json_:
        report.render_download_plan(r)
    if dry_run or r.offline:
        if json_:
            report.print_json(r)
        elif r.offline:
            report.render_download_result(r)
        raise typer.Exit(0 if r.ok else 1)
    on_file = None if json_ else report.render_download_file
    with report.byte_progress(r.need_bytes, "download", enabled=not json_ and r.need_bytes > 0) as advance:
        r = run_download(plan, force=force, progress=advance, on_file=on_file)
    report.emit(r, json_, report.render_download_result)
    raise typer.Exit(0 if r.ok else 1)


@app.command()
def shard(
    src: Annotated[Path, typer.Argument(help="Hugging Face checkpoint folder (FP8 with scales, or BF16).")],
    dst: Annotated[Path, typer.Argument(help="New folder for model{r}-mp{N}.safetensors (or the same, to resume).")],
    mp: Annotated[int, typer.Option("--mp", help="Model-parallel degree N (ranks).")],
    mtp: MtpOpt = Mtp.keep,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check N and free space, print the plan only.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Stream a checkpoint into the official model-parallel layout (one file per rank), in bounded memory."""
    from . import report
    from .shard import plan_shard, run_shard

    plan = plan_shard(src, dst, mp=mp, mtp=mtp.value)
    if dry_run:
        r = plan.report()
        report.emit(r, json_, report.render_shard_plan)
        plan.output.check_space()
        return
    plan.output.check_space()  # before the progress bar is drawn
    with report.byte_progress(plan.report().bytes_written, f"shard mp{mp}", enabled=not json_) as advance:
        r = run_shard(plan, progress=advance)
    report.emit(r, json_, report.render_shard_result)


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
    mtp: MtpOpt = Mtp.keep,
    checksums: Annotated[bool, typer.Option("--checksums", help="Re-hash files against the manifest / Hub.")] = False,
    tier: Annotated[str | None, typer.Option(help="Force the thresholds: exact, float or quantized.")] = None,
    min_top1: Annotated[float | None, typer.Option(help="Override: minimum top-1 agreement.")] = None,
    max_kl_mean: Annotated[float | None, typer.Option(help="Override: maximum mean KL (nats).")] = None,
    max_kl: Annotated[float | None, typer.Option(help="Override: maximum KL of any position.")] = None,
    min_cos: Annotated[float | None, typer.Option(help="Override: minimum cosine similarity of any position.")] = None,
    max_rel_diff: Annotated[float | None, typer.Option(help="Override: max |diff| / logit scale.")] = None,
    hidden_tol: Annotated[
        float | None, typer.Option(help="Override: free-run hidden-state error naming a layer (no layer inputs).")
    ] = None,
    max_layer_err: Annotated[
        float | None,
        typer.Option(help="Override: a layer on the reference's inputs, worst position's error / its update."),
    ] = None,
    max_gain_dev: Annotated[
        float | None, typer.Option(help="Override: a layer on the reference's inputs, maximum |gain - 1|.")
    ] = None,
    json_: JsonOpt = False,
) -> None:
    """Check a checkpoint's structure and compare its logits with a reference. Exit 0 pass, 1 fail, 2 bad input."""
    from . import report
    from .checkpoint import open_checkpoint
    from .errors import Dsv3Error

    # A bad path answers before torch is imported (the verify package needs it): the same errors verify gives.
    if not ckpt.is_dir() or not any(ckpt.glob("*.safetensors")):
        open_checkpoint(ckpt)
    if reference is not None and not reference.exists():
        raise Dsv3Error(f"{reference}: no such reference file or folder")
    from .runtime import init_distributed, resolve_device, resolve_engine
    from .verify import check_limits, planned_bytes, read_prompts_file, read_tokens_file, verify_checkpoint

    device = resolve_device(device)
    engine = resolve_engine(engine, device)
    rank, _ = init_distributed(device)
    lead = rank == 0
    texts = read_prompts_file(prompts) if prompts is not None else None
    ids = read_tokens_file(tokens) if tokens is not None else None
    overrides = {"min_top1": min_top1, "max_kl_mean": max_kl_mean, "max_kl": max_kl, "min_cos": min_cos}
    overrides |= {"max_rel_diff": max_rel_diff, "hidden_tol": hidden_tol}
    overrides |= {"max_layer_err": max_layer_err, "max_gain_dev": max_gain_dev}
    check_limits(overrides)  # before anything is read or drawn
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
            mtp=mtp == Mtp.keep,
            checksums=checksums,
            thresholds=overrides,
            tier=tier,
            topk=topk,
            dtype=dtype,
            progress=advance,
            notify=report.verify_event if lead and not json_ else None,
        )
    if lead:
        report.emit(r, json_, report.render_verify)
    raise typer.Exit(r.exit_code)


cast_app = typer.Typer(
    no_args_is_help=True, help="Convert between block-FP8 (FP4 on DeepSeek-V4) and BF16 (streaming, resumable)."
)
app.add_typer(cast_app, name="cast")
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan (files, bytes, free disk) only.")]


def _cast(plan, dry_run: bool, json_: bool, label: str) -> None:
    """Shared by both casts: the plan (refused early when the disk is too small), then the run with a progress bar."""
    from . import report
    from .cast import run_cast

    if dry_run:
        r = plan.report()
        report.print_json(r) if json_ else report.render_cast_plan(r, label)
        plan.output.check_space()
        return
    plan.output.check_space()  # before the progress bar is drawn
    with report.byte_progress(plan.report().bytes_in, f"cast {label}", enabled=not json_) as advance:
        r = run_cast(plan, progress=advance)
    report.emit(r, json_, report.render_cast_result)


@cast_app.command("fp8-bf16")
def cast_fp8_bf16(
    src: Annotated[Path, typer.Argument(help="FP8 Hugging Face checkpoint folder (weights + weight_scale_inv).")],
    dst: Annotated[Path, typer.Argument(help="New folder for the BF16 checkpoint (or the same, to resume).")],
    device: Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="CPU threads for dequantization (default: all cores).")] = None,
    mtp: MtpOpt = Mtp.keep,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Dequantize every FP8 weight to BF16 (bf16(w * s), exact); a complete, loadable HF folder."""
    from .cast import plan_fp8_to_bf16

    _cast(plan_fp8_to_bf16(src, dst, device=device, workers=workers, mtp=mtp.value), dry_run, json_, "fp8-bf16")


@cast_app.command("to-bf16")
def cast_to_bf16(
    src: Annotated[Path, typer.Argument(help="Quantized Hugging Face checkpoint folder (FP8, and FP4 experts on V4).")],
    dst: Annotated[Path, typer.Argument(help="New folder for the BF16 checkpoint (or the same, to resume).")],
    device: Annotated[str, typer.Option(help="auto (cuda when available; V4: the CPU), cpu or cuda.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="CPU threads for the arithmetic (default: all cores).")] = None,
    mtp: MtpOpt = Mtp.keep,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Every quantized weight to BF16, exactly: block FP8 (bf16(w * s)) and DeepSeek-V4's FP4 experts; a complete,
    loadable HF folder. The same as fp8-bf16, named for what it does on V4."""
    from .cast import plan_fp8_to_bf16

    _cast(plan_fp8_to_bf16(src, dst, device=device, workers=workers, mtp=mtp.value), dry_run, json_, "to-bf16")


@cast_app.command("fp4-fp8")
def cast_fp4_fp8(
    src: Annotated[Path, typer.Argument(help="DeepSeek-V4 Hugging Face folder with FP4 experts.")],
    dst: Annotated[Path, typer.Argument(help="New folder with FP8 experts (or the same, to resume).")],
    device: Annotated[str, typer.Option(help="auto or cpu (the V4 arithmetic runs on the CPU).")] = "auto",
    workers: Annotated[int | None, typer.Option(help="CPU threads for the arithmetic (default: all cores).")] = None,
    mtp: MtpOpt = Mtp.keep,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """DeepSeek-V4's FP4 experts to FP8 with 128x128 E8M0 scales, losslessly, for GPUs without FP4 (Hopper); a block
    FP8 cannot hold exactly is refused (tensor and block named) before anything is written."""
    from .cast import plan_fp4_to_fp8

    _cast(plan_fp4_to_fp8(src, dst, device=device, workers=workers, mtp=mtp.value), dry_run, json_, "fp4-fp8")


@cast_app.command("bf16-fp8")
def cast_bf16_fp8(
    src: Annotated[Path, typer.Argument(help="BF16 Hugging Face checkpoint folder.")],
    dst: Annotated[Path, typer.Argument(help="New folder for the block-FP8 checkpoint (or the same, to resume).")],
    scale_fmt: Annotated[
        str | None,
        typer.Option(
            help="Quantize every block afresh with f32 (amax / 448) or ue8m0 (power of two, rounded up) scales. "
            "Default: keep each block's original scale where it reproduces the block exactly (unchanged blocks "
            "come back byte for byte) and give changed blocks fresh scales of their tensor's original kind (from "
            "the fp8-bf16 manifest), else f32."
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None, typer.Option(help="Keep weights matching this fnmatch pattern in BF16 (repeatable).")
    ] = None,
    mtp: MtpOpt = Mtp.keep,
    dry_run: DryRunOpt = False,
    json_: JsonOpt = False,
) -> None:
    """Re-quantize to DeepSeek block-FP8: exactly the weights that were FP8 (from the fp8-bf16 manifest)."""
    from .cast import plan_bf16_to_fp8

    plan = plan_bf16_to_fp8(src, dst, scale_fmt=scale_fmt, ignore=tuple(ignore or ()), mtp=mtp.value)
    _cast(plan, dry_run, json_, "bf16-fp8")


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
    batch_invariant: Annotated[
        bool | None,
        typer.Option(
            "--batch-invariant/--no-batch-invariant",
            help="Decode on kernels whose result for a sequence does not depend on its batch (Triton engine; the "
            "default there): the same tokens alone or batched, and --speculative mtp exactly plain greedy's in "
            "bfloat16 too. --no-batch-invariant: cuBLAS and torch's reductions (faster at batch 1-4).",
        ),
    ] = None,
    speculative: Annotated[
        str | None,
        typer.Option(
            help="mtp: greedy decoding with the checkpoint's MTP module drafting the token after next, checked in "
            "the next step (the same tokens as plain greedy; two tokens a step when a draft is right; one process)."
        ),
    ] = None,
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
        speculative=speculative, batch_invariant=batch_invariant,
    )  # fmt: skip
    raise typer.Exit(run_generate(opts, report.generate_ui(json_)))


# What Ctrl-C leaves behind, per command: only the commands that resume say "run it again to resume".
_INTERRUPTED = {
    "cast": "interrupted; finished files are kept: run the same command again to resume",
    "shard": "interrupted; finished files are kept: run the same command again to resume",
    "download": "interrupted; finished files and partial transfers are kept: run the same command again to resume",
    "synth": "interrupted; the output folder is incomplete (no config.json): remove it, then run the command again",
    "demo": "interrupted; run the same command again: it starts over in its work folder",
}


def _interrupted() -> str:
    cmd = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    return _INTERRUPTED.get(cmd, "interrupted")


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2, and anything unexpected into one
    line and exit code 1 (``DSV3_DEBUG=1`` shows the traceback instead)."""
    import os

    from . import report
    from .errors import disk_error

    try:
        rc = app(standalone_mode=False, prog_name="dsv3-tools")  # click returns typer.Exit's code in this mode
        if rc == 130:  # typer turns KeyboardInterrupt into a silent Exit(130): the except below never sees it
            report.error(_interrupted())
        sys.exit(rc if isinstance(rc, int) else 0)
    except Dsv3Error as e:
        report.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        report.error(_interrupted())
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
        err = disk_error(e) if isinstance(e, OSError) else None
        if err is not None:
            report.error(str(err))
            sys.exit(err.exit_code)
        if os.environ.get("DSV3_DEBUG") == "1":
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        report.error(f"unexpected {type(e).__name__}: {first} (run with DSV3_DEBUG=1 for the traceback)")
        sys.exit(1)
