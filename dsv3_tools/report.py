"""Rendering for people: progress bars, tables, one-line errors. The only module that imports ``rich``."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any

from rich.console import Console
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
        t = Table(title=f"{len(r.problems)} problem(s)", title_justify="left", title_style="bold red")
        for c in ("kind", "file", "tensor", "message"):
            t.add_column(c, overflow="fold")
        for p in r.problems[:200]:
            t.add_row(p["kind"], p.get("file") or "", p.get("tensor") or "", p["message"])
        out.print(t)
        if len(r.problems) > 200:
            out.print(f"... and {len(r.problems) - 200} more (use --json for all)")
    else:
        out.print("[bold green]no problems found[/]")
