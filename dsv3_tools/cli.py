"""The ``dsv3-tools`` command line: one thin command per stage. Library functions do the work and return
report dataclasses; this file parses options and renders, and maps typed errors to one-line messages."""

from __future__ import annotations

import sys
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
    from .synth import synth as run
    from .config import ModelConfig
    from .synth import derive_config
    from .names import expected_tensors
    from .checkpoint import DTYPE_SIZE

    cfg = derive_config(ModelConfig.load(config), dtype=dtype, scale_fmt=scale_fmt, layers=layers, experts=experts, mtp=mtp)
    total = 0
    for s in expected_tensors(cfg).values():
        n = DTYPE_SIZE[s.dtype]
        for d in s.shape:
            n *= d
        total += n
    with report.byte_progress(total, "synth", enabled=not json_) as advance:
        r = run(out, config, dtype=dtype, seed=seed, shards=shards, layers=layers, experts=experts, mtp=mtp,
                scale_fmt=scale_fmt, progress=advance)
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
def demo(
    workdir: Annotated[Path, typer.Option(help="Where to write the demo checkpoints.")] = Path("demo-out"),
) -> None:
    """Run every stage on the built-in tiny model: synth, inspect, and each later stage."""
    from .demo import run_demo

    raise typer.Exit(run_demo(workdir))


def main() -> None:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    from . import report

    try:
        app(standalone_mode=False)
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
    except Exception as e:  # click usage errors arrive as ClickException in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            report.error("aborted")
            sys.exit(130)
        raise
