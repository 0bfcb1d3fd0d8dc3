"""``dsv3-tools demo``: every stage, end to end, on the built-in tiny model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def _step(title: str, args: list[str]) -> int:
    from . import report

    report.info(f"\n[bold cyan]$ dsv3-tools {' '.join(args)}[/]  # {title}")
    return subprocess.call([sys.executable, "-m", "dsv3_tools", *args])


def run_demo(workdir: Path) -> int:
    """Run the demo pipeline in ``workdir`` (recreated); return the first failing exit code or 0."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    fp8 = str(workdir / "tiny-fp8")
    steps = [
        ("a synthetic FP8 checkpoint in the exact HF format", ["synth", fp8, "--config", "tiny"]),
        ("layout, family, sizes and problems", ["inspect", fp8]),
    ]
    for title, args in steps:
        rc = _step(title, args)
        if rc != 0:
            return rc
    from . import report

    report.info(f"\n[bold green]demo finished[/]: outputs in {workdir}")
    return 0
