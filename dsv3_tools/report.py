"""Rendering for people: progress bars, tables, one-line errors. The only module that imports ``rich``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}T"


@contextmanager
def byte_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar over bytes with throughput and ETA; yields ``advance(nbytes)``."""
    if not enabled:
        yield lambda n: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda n: p.advance(task, n)


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        d = obj.as_dict() if hasattr(obj, "as_dict") else asdict(obj)
        return to_jsonable(d)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_jsonable(obj), indent=2) + "\n")
    sys.stdout.flush()


def error(msg: str) -> None:
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)


def info(msg: str) -> None:
    console.print(msg, soft_wrap=True)


def kv_table(title: str, rows: list[tuple[str, Any]]) -> None:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, str(v))
    out.print(t)


def problems_table(problems: list[dict], what: str, limit: int) -> None:
    """Problems (kind, file, tensor, message) as a table, the first ``limit`` of them."""
    t = Table(title=f"{len(problems)} {what}", title_justify="left", title_style="bold red")
    for c in ("kind", "file", "tensor", "message"):
        t.add_column(c, overflow="fold")
    for p in problems[:limit]:
        t.add_row(p["kind"], p.get("file") or "", p.get("tensor") or "", p["message"])
    out.print(t)
    if len(problems) > limit:
        out.print(f"... and {len(problems) - limit} more (use --json for all)")


def render_inspect(r: Any) -> None:
    rows = [
        ("path", r.path),
        ("layout", r.layout + (f" (world {r.world})" if r.layout == "mp" else "")),
        ("files", r.files),
        ("family", r.family or "?"),
        ("model_type", r.model_type or "?"),
        ("layers", f"{r.layers} (dense: {r.dense_layers})" if r.layers is not None else "?"),
        ("MTP layers", r.mtp_layers or "none"),
        ("experts", f"{r.experts} routed, {r.experts_per_token} per token" if r.experts else "?"),
        ("quantization", r.quantization or "?"),
        ("dtypes", ", ".join(f"{k}: {v}" for k, v in r.dtypes.items())),
        ("tensors", r.tensors),
        ("parameters", f"{human_count(r.params_main)} main + {human_count(r.params_mtp)} MTP"),
        ("tensor bytes", f"{human_bytes(r.bytes_main)} main + {human_bytes(r.bytes_mtp)} MTP"),
        ("file bytes", human_bytes(r.file_bytes)),
    ]
    kv_table("checkpoint", rows)
    if r.problems:
        problems_table(r.problems, "problem(s)", limit=200)
    else:
        out.print("[bold green]no problems found[/]")


def render_verify(r: Any) -> None:
    """The verify report: verdict, what was compared and how, per-prompt metrics, where it diverges."""
    ok = r.verdict == "pass"
    rows = [("checkpoint", f"{r.path} ({r.layout}" + (f", world {r.world})" if r.layout == "mp" else ")"))]
    if r.reference:
        rows.append(("reference", f"{r.reference} ({r.reference_kind})"))
    if r.saved_reference:
        rows.append(("saved reference", r.saved_reference))
    if r.run:
        rows.append(("run", ", ".join(f"{k} {v}" for k, v in r.run.items())))
    if r.tier:
        rows.append(("comparison", f"{r.tier}: " + "; ".join(r.tier_reasons)))
    if r.checksums is not None:
        c = r.checksums
        rows.append(("checksums", f"{c['files_checked']} file(s) re-hashed, {c['mismatches']} mismatch(es)"))
    rows.append(("structure", f"{len(r.problems)} problem(s), {len(r.warnings)} warning(s)"))
    kv_table("verify", rows)
    for w in r.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    if r.problems:
        problems_table(r.problems, "structural problem(s)", limit=50)
    if r.overall is not None:
        t = Table(title="logits against the reference", title_justify="left")
        for c in ("prompt", "tokens", "top-1", "KL mean", "KL max", "cos min", "max |diff|", "rel diff", "ok"):
            t.add_column(c, justify="right")

        def row(name: str, n: Any, s: Any, good: bool) -> list[str]:
            return [
                name,
                str(n),
                f"{s.top1:.4f}",
                f"{s.kl_mean:.2e}",
                f"{s.kl_max:.2e}",
                f"{s.cos_min:.6f}",
                f"{s.max_abs_diff:.2e}",
                f"{s.max_rel_diff:.2e}",
                "[green]yes[/]" if good else "[red]no[/]",
            ]

        for p in r.prompts:
            t.add_row(*row(str(p.index), p.tokens, p.stats, not p.failures))
            if p.mtp is not None:
                t.add_row(*row(f"{p.index} MTP", p.tokens - 1, p.mtp, not any(f.startswith("MTP") for f in p.failures)))
        t.add_row(*row("all", r.overall.positions, r.overall, not [f for f in r.failures if not f.startswith("MTP")]))
        if r.mtp_overall is not None:
            t.add_row(
                *row(
                    "all MTP",
                    r.mtp_overall.positions,
                    r.mtp_overall,
                    not [f for f in r.failures if f.startswith("MTP")],
                )
            )
        out.print(t)
    if r.divergence is not None:
        d = r.divergence
        at = f" (prompt {d.prompt}, position {d.position})" if d.prompt is not None else ""
        out.print(f"[bold]first divergence:[/] {d.where}, hidden-state error {d.error:.3e}{at}")
    if r.tensor_diffs:
        t = Table(title=f"{len(r.tensor_diffs)} tensor(s) differ from the reference checkpoint", title_justify="left")
        for c in ("tensor", "kind", "relative error", "detail"):
            t.add_column(c, overflow="fold")
        for d in r.tensor_diffs[:20]:
            t.add_row(d.name, d.kind, f"{d.rel_err:.3e}" if d.rel_err is not None else "", d.detail)
        out.print(t)
        if r.suspect_files:
            out.print("files holding them: " + ", ".join(f"{f} ({n})" for f, n in r.suspect_files.items()))
    for f in r.failures:
        out.print(f"[red]fail:[/] {f}")
    out.print("[bold green]PASS[/]" if ok else "[bold red]FAIL[/]")


# ---------------------------------------------------------------------- generate
# Control characters other than newline and tab, shown as U+FFFD on a terminal: a model's text must not drive it
# (an ESC from random weights would start an escape sequence). Files and pipes get the text as it is.
_CONTROLS = {c: 0xFFFD for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}


def stream_text(text: str) -> None:
    """Answer text as it is produced (stdout, unformatted, flushed at once)."""
    sys.stdout.write(text.translate(_CONTROLS) if sys.stdout.isatty() else text)
    sys.stdout.flush()


def read_line(prompt: str) -> str:
    """A line typed after ``prompt`` (line editing when the readline module is there)."""
    try:
        import readline  # noqa: F401  (input() then edits lines and keeps a history)
    except ImportError:
        pass
    return input(prompt)


def render_generate_plan(p: Any) -> None:
    from .generate.plan import human

    info(
        f"memory plan: {p.device}, {p.world} rank(s), {p.dtype}, gemm {p.gemm}: ~{human(p.total_bytes)} per rank of "
        f"{human(p.available_bytes)} free (weights {human(p.weights_bytes + p.absorbed_bytes)}, KV cache "
        f"{human(p.cache_bytes)} for {p.batch} x {p.max_len} tokens, activations {human(p.activation_bytes)})"
    )


def render_generation(r: Any, streamed: bool) -> None:
    """A finished request: its text (unless it was streamed) and one line of figures."""
    n = len(r.output_ids)
    rate = f", {n / r.decode_seconds:.1f} tokens/s" if r.decode_seconds > 0 else ""
    figures = (
        f"[{r.finish_reason}, {len(r.prompt_ids)} + {n} tokens, prefill {r.prefill_seconds:.3f} s, "
        f"decode {r.decode_seconds:.3f} s{rate}]"
    )
    if streamed:
        stream_text("\n")
    else:
        prompt = r.prompt if isinstance(r.prompt, str) else json.dumps(r.prompt, ensure_ascii=False)
        out.print(f"[bold]Prompt {r.index}:[/] {escape(prompt)}", highlight=False, soft_wrap=True)
        out.print(r.text, markup=False, highlight=False, soft_wrap=True)
    console.print(figures, markup=False)


def generate_ui(json_: bool) -> Any:
    """The ``generate`` package's UI: status lines on stderr, answers on stdout (JSON lines with ``--json``)."""
    from .generate import UI
    from .generate.batch import json_line

    def result(r: Any, streamed: bool) -> None:
        if json_:
            stream_text(json_line(r) + "\n")
        else:
            render_generation(r, streamed)

    return UI(info=info, write=stream_text, read=read_line, plan=render_generate_plan, result=result)
