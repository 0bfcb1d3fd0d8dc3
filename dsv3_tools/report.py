"""Rendering for people: progress bars, tables, one-line errors. The only module that imports ``rich``.

Every command's plan and result is a dataclass made by its stage; this module shows them. Tables go to stdout, the
progress bars and one-line messages to stderr. When stdout is not a terminal (a pipe, a file), tables are laid out
without a width limit, so no cell is wrapped or cut: ``dsv3-tools inspect DIR | grep ...`` sees each line whole.
"""

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

from .disk import human_bytes

_UNLIMITED = 1 << 20  # columns: a table laid out for a pipe or a file never wraps


def _console(stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    return Console(stderr=stderr, highlight=False, width=None if tty else _UNLIMITED, soft_wrap=not tty)


console = _console(stderr=True)
out = _console(stderr=False)


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}T"


@contextmanager
def byte_progress(total: int, description: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A progress bar over bytes with throughput and ETA; yields ``advance(nbytes)``. The bar appears with the first
    bytes, so an error found before any work (bad input) is never preceded by an empty bar."""
    if not enabled:
        yield lambda n: None
        return
    p = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task = p.add_task(description, total=total, start=False)
    started = False

    def advance(n: int) -> None:
        nonlocal started
        if not started:
            started = True
            p.start()
            p.start_task(task)
        p.advance(task, n)

    try:
        yield advance
    finally:
        if started:
            p.stop()


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


def emit(obj: Any, json_: bool, render: Callable[[Any], None]) -> None:
    """A command's plan or result: as JSON on stdout, or rendered for people."""
    if json_:
        print_json(obj)
    else:
        render(obj)


def error(msg: str) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)


def warn(messages: list[str]) -> None:
    """Warnings: things that are off but do not stop the work."""
    for w in messages:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)


def info(msg: str) -> None:
    console.print(msg, soft_wrap=True)


def kv_table(title: str, rows: list[tuple[str, Any]]) -> None:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(escape(k), escape(str(v)))
    out.print(t)


def problems_table(problems: list[dict], what: str, limit: int) -> None:
    """Problems (kind, file, tensor, message) as a table, the first ``limit`` of them."""
    t = Table(title=f"{len(problems)} {what}", title_justify="left", title_style="bold red")
    for c in ("kind", "file", "tensor", "message"):
        t.add_column(c, overflow="fold")
    for p in problems[:limit]:
        t.add_row(*(escape(str(x)) for x in (p["kind"], p.get("file") or "", p.get("tensor") or "", p["message"])))
    out.print(t)
    if len(problems) > limit:
        out.print(f"... and {len(problems) - limit} more (use --json for all)")


# ---------------------------------------------------------------------- synth, inspect
def render_synth(r: Any) -> None:
    info(f"wrote {r.tensors} tensors, {human_bytes(r.bytes)} in {r.files} file(s) to {r.path}")


def render_inspect(r: Any) -> None:
    rows = [
        ("path", r.path),
        ("layout", r.layout + (f" (world {r.world})" if r.layout == "mp" else "")),
        ("files", r.files),
        ("family", r.family or "?"),
        ("model_type", r.model_type or "?"),
        ("layers", f"{r.layers} (dense: {r.dense_layers})" if r.layers is not None else "?"),
        *([("layer kinds", ", ".join(f"{k}: {v}" for k, v in r.layer_kinds.items()))] if r.layer_kinds else []),
        *([("variant", r.variant)] if r.variant else []),
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
    warn(r.warnings)
    if r.problems:
        problems_table(r.problems, "problem(s)", limit=200)
    else:
        out.print("[bold green]no problems found[/]")


# ---------------------------------------------------------------------- cast, shard
def _disk_row(needed: int, free: int) -> tuple[str, str]:
    return ("disk", f"needs {human_bytes(needed)}, {human_bytes(free)} free")


def render_cast_plan(plan: Any, label: str) -> None:
    """A cast's dry run: every output file, what is read and written, the disk, the device."""
    rows = [(f.name, f"{f.tensors} tensors, {human_bytes(f.bytes_out)} ({f.status})") for f in plan.files]
    rows += [
        ("tensors", f"{plan.tensors_cast} cast, {plan.tensors_copied} copied, {plan.tensors_dropped} dropped"),
        ("to read", human_bytes(plan.bytes_in)),
        ("to write", human_bytes(plan.bytes_out)),
        _disk_row(plan.bytes_needed, plan.free_bytes),
        ("device", plan.device),
        ("sidecars", ", ".join(plan.sidecars)),
    ]
    kv_table(f"cast {label}: {plan.src} -> {plan.dst}", rows)
    warn(plan.warnings)


def render_cast_result(r: Any) -> None:
    written = sum(f.status == "written" for f in r.files)
    warn(r.warnings)
    info(
        f"cast {r.tensors_cast} tensors, wrote {written} file(s) ({human_bytes(r.bytes_out)}), "
        f"kept {len(r.kept)}, on {r.device} in {r.seconds:.1f} s to {r.dst}"
    )


def render_shard_plan(plan: Any) -> None:
    """A shard's dry run: every rank file, what is read and written, the disk, the degrees that work."""
    rows = [(f.name, f"{f.tensors} tensors, {human_bytes(f.bytes)} ({f.status})") for f in plan.files]
    rows += [
        ("input", f"{plan.dtype}, {plan.tensors_in} tensors ({plan.tensors_mtp_dropped} MTP dropped)"),
        ("to read", human_bytes(plan.bytes_read)),
        ("to write", human_bytes(plan.bytes_written)),
        _disk_row(plan.bytes_needed, plan.free_bytes),
        ("valid --mp", ", ".join(map(str, plan.valid_mp))),
        ("sidecars", ", ".join(plan.sidecars)),
        ("upstream demo", plan.upstream_command),
    ]
    kv_table(f"shard plan: --mp {plan.mp} --mtp {plan.mtp}", rows)
    warn(plan.warnings)


def render_shard_result(r: Any) -> None:
    kept = sum(f.status == "kept" for f in r.files)
    warn(r.warnings)
    info(
        f"wrote {r.mp - kept} rank file(s) ({human_bytes(r.bytes_written)}), kept {kept}, "
        f"read {human_bytes(r.bytes_read)} in {r.seconds:.1f} s to {r.dst}"
    )
    info(f"upstream demo (from its inference/ folder): {r.upstream_command}")


# ---------------------------------------------------------------------- download
def render_download_plan(p: Any) -> None:
    states = {s: sum(f.state == s for f in p.files) for s in ("present", "planned")}
    rows = [
        ("repository", f"{p.repo_id} @ {p.revision}" + (f" ({p.commit[:12]})" if p.commit else "")),
        ("destination", p.destination),
        ("files", f"{len(p.files)} selected, {states['present']} present, {states['planned']} to fetch"),
        (
            "bytes",
            f"{human_bytes(p.total_bytes)} in all, {human_bytes(p.present_bytes)} present, "
            f"{human_bytes(p.resume_bytes)} resumable",
        ),
        ("to download", human_bytes(p.need_bytes)),
        (
            "free space",
            f"{human_bytes(p.free_bytes)} (margin {human_bytes(p.margin_bytes)})"
            + ("" if p.fits else ": NOT ENOUGH (--force to try anyway)"),
        ),
    ]
    if p.offline:
        rows = [rows[0], rows[1], ("mode", "offline (HF_HUB_OFFLINE=1): checking the local copy only")]
    kv_table("download plan", rows)


def render_download_file(f: Any) -> None:
    """One line per file as it is done (files already present say nothing)."""
    if f.state == "present":
        return
    rate = f"{human_bytes(f.transferred / f.seconds)}/s" if f.seconds > 0 else ""
    line = f"{f.state:>8}  {f.name}  {human_bytes(f.transferred)} in {f.seconds:.1f} s {rate}"
    (error if f.problem else info)(line + (f": {f.problem}" if f.problem else ""))


def render_download_result(r: Any) -> None:
    counts: dict[str, int] = {}
    for f in r.files:
        counts[f.state] = counts.get(f.state, 0) + 1
    info(
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        + f"; received {human_bytes(r.transferred_bytes)} in {r.seconds:.1f} s"
        + (f" ({human_bytes(r.throughput)}/s)" if r.throughput else "")
        + f" -> {r.destination}"
    )
    warn(r.warnings)
    for p in r.problems:
        error(f"{p['kind']}: {p['file'] or ''}: {p['message']}")
    if r.problems:
        error("run the same command again (add --repair to re-check files already present) to fix these")


# ---------------------------------------------------------------------- verify
def verify_event(event: str, data: Any) -> None:
    """A line as each step of ``verify`` ends (``verify_checkpoint``'s ``notify``)."""
    if event == "structure":
        info(f"structure: {len(data.problems)} problem(s), {len(data.warnings)} warning(s)")
    elif event == "memory":
        p = data
        layer = (
            f"largest layer {p.largest_layer}: {human_bytes(p.largest_layer_bytes)}, "
            if p.largest_layer is not None
            else ""
        )
        info(
            f"memory plan: {p.mode} on {p.device}: peak ~{human_bytes(p.peak_bytes)} of "
            f"{human_bytes(p.available_bytes)} available (weights {human_bytes(p.weights_bytes)}, {layer}"
            f"embedding+head {human_bytes(p.top_bytes)}, activations for {p.prompts} prompt(s) / {p.tokens} tokens "
            f"{human_bytes(p.activation_bytes)})"
        )
    elif event == "model":
        tokens = sum(p.tokens for p in data.prompts) if data.prompts else (data.memory.tokens if data.memory else 0)
        n = data.memory.prompts if data.memory else 0
        info(f"model: {n} prompt(s), {tokens} tokens in {data.seconds.get('model', 0.0):.2f} s")
    elif event == "reference":
        path, size = data
        info(f"reference: wrote {path} ({size} bytes)")


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
        if r.layers:
            n = sum(lr.stats is not None for lr in r.layers)
            mtp = " and the MTP module" if any(lr.logits is not None for lr in r.layers) else ""
            rows.append(
                ("layers", f"{n} layer(s){mtp} run on the reference's inputs (teacher-forced), each judged alone")
            )
        else:
            rows.append(("layers", "not judged alone (the reference holds no layer inputs): the logits, and the "
                                   "hidden-state summaries for localization"))  # fmt: skip
    if r.checksums is not None:
        c = r.checksums
        rows.append(("checksums", f"{c['files_checked']} file(s) re-hashed, {c['mismatches']} mismatch(es)"))
    rows.append(("structure", f"{len(r.problems)} problem(s), {len(r.warnings)} warning(s)"))
    kv_table("verify", rows)
    for w in r.warnings:
        out.print(f"[yellow]warning:[/] {escape(w)}")
    if r.problems:
        problems_table(r.problems, "structural problem(s)", limit=50)
    if r.overall is not None:
        t = Table(title="logits against the reference", title_justify="left")
        for c in ("prompt", "tokens", "top-1", "KL mean", "KL max", "cos min", "max |diff|", "rel diff", "ok"):
            t.add_column(c, justify="right", no_wrap=True)

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
        t.add_row(*row("all", r.overall.positions, r.overall, bool(r.logits_ok)))
        if r.mtp_overall is not None:
            t.add_row(*row("all MTP", r.mtp_overall.positions, r.mtp_overall, bool(r.mtp_logits_ok)))
        out.print(t)
    if r.layers:
        t = Table(title="each layer on the reference's inputs (teacher-forced)", title_justify="left")
        for c in ("layer", "error / update", "worst position", "at (prompt, position)", "gain", "ok"):
            t.add_column(c, justify="right", no_wrap=True)
        for lr in r.layers:
            good = "[green]yes[/]" if not lr.failures else "[red]no[/]"
            if lr.stats is not None:
                s = lr.stats
                at = f"{s.prompt}, {s.position}" if s.prompt is not None else ""
                t.add_row(f"layer {lr.layer}", f"{s.rel:.2e}", f"{s.rel_max:.2e}", at, f"{s.gain:.5f}", good)
            else:
                lg = lr.logits
                kl, c = f"KL mean {lg.kl_mean:.1e}", f"cos min {lg.cos_min:.5f}"
                t.add_row(f"MTP (layer {lr.layer})", kl, c, "", "", good)
        out.print(t)
    if r.divergence is not None:
        d = r.divergence
        at = f" (prompt {d.prompt}, position {d.position})" if d.prompt is not None else ""
        what = "error on the reference's input" if r.layers else "hidden-state error"
        out.print(f"[bold]first divergence:[/] {escape(d.where)}, {what} {d.error:.3e}{at}")
    if r.tensor_diffs:
        t = Table(title=f"{len(r.tensor_diffs)} tensor(s) differ from the reference checkpoint", title_justify="left")
        for c in ("tensor", "kind", "relative error", "detail"):
            t.add_column(c, overflow="fold")
        for d in r.tensor_diffs[:20]:
            rel = f"{d.rel_err:.3e}" if d.rel_err is not None else ""
            t.add_row(escape(d.name), d.kind, rel, escape(d.detail))
        out.print(t)
        if r.suspect_files:
            out.print("files holding them: " + ", ".join(f"{f} ({n})" for f, n in r.suspect_files.items()))
    for f in r.failures:
        out.print(f"[red]fail:[/] {escape(f)}")
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
    h = human_bytes
    info(
        f"memory plan: {p.device}, {p.world} rank(s), {p.dtype}, gemm {p.gemm}: ~{h(p.total_bytes)} per rank of "
        f"{h(p.available_bytes)} free (weights {h(p.weights_bytes + p.absorbed_bytes)}, KV cache "
        f"{h(p.cache_bytes)} for {p.batch} x {p.max_len} tokens, activations {h(p.activation_bytes)})"
    )


def render_generation(r: Any, streamed: bool) -> None:
    """A finished request: its text (unless it was streamed) and one line of figures."""
    n = len(r.output_ids)
    rate = f", {n / r.decode_seconds:.1f} tokens/s" if r.decode_seconds > 0 else ""
    spec = r.speculative
    drafts = f", MTP drafts accepted {spec['accepted']}/{spec['drafted']}" if spec else ""
    figures = (
        f"[{r.finish_reason}, {len(r.prompt_ids)} + {n} tokens, prefill {r.prefill_seconds:.3f} s, "
        f"decode {r.decode_seconds:.3f} s{rate}{drafts}]"
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
