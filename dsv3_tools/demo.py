"""``dsv3-tools demo``: every stage, end to end, on the built-in tiny model."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from .disk import check_destination
from .errors import OutputError


def _step(title: str, args: list[str]) -> int:
    from . import report

    report.info(f"\n[bold cyan]$ dsv3-tools {' '.join(args)}[/]  # {title}")
    return subprocess.call([sys.executable, "-m", "dsv3_tools", *args])


MARKER = ".dsv3-demo"  # in a work folder the demo made: only such a folder is emptied by a later demo


def prepare_workdir(workdir: Path) -> None:
    """A fresh work folder: made new, or emptied when an earlier demo made it (its marker file says so). Any other
    existing folder that is not empty is refused: the demo deletes nothing it did not create."""
    check_destination(workdir)
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).is_file():
            raise OutputError(f"{workdir} is not empty and was not made by dsv3-tools demo; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by dsv3-tools demo: a later demo may empty this folder\n")


def run_demo(workdir: Path) -> int:
    """Run the demo pipeline in ``workdir`` (a new folder, or one an earlier demo made); return the first failing
    exit code or 0."""
    prepare_workdir(workdir)
    fp8 = str(workdir / "tiny-fp8")
    steps = [
        ("a synthetic FP8 checkpoint in the exact HF format", ["synth", fp8, "--config", "tiny"]),
        ("layout, family, sizes and problems", ["inspect", fp8]),
    ]
    ref = str(workdir / "tiny-fp8.reference.safetensors")
    save = ["verify", fp8, "--save-reference", ref]
    steps.append(("a verify reference: the original's logits and hidden states", save))
    mp2 = str(workdir / "tiny-mp2")
    steps.append(("the official model-parallel layout, 2 rank files", ["shard", fp8, mp2, "--mp", "2"]))
    steps.append(("the rank files re-assemble into the full model", ["inspect", mp2]))
    bf16, fp8_again = str(workdir / "tiny-bf16"), str(workdir / "tiny-fp8-again")
    steps.append(("dequantize to BF16: exact, a complete loadable folder", ["cast", "fp8-bf16", fp8, bf16]))
    steps.append(("re-quantize exactly the weights that were FP8", ["cast", "bf16-fp8", bf16, fp8_again]))
    steps += _verify_steps(steps, ref)  # verifies every stage output listed above against the original
    talk = ["--max-new-tokens", "24", "--seed", "0"]
    steps.append(("the model talks: the chat template, a KV cache, streamed text (noise: random weights)",
                  ["generate", fp8, "--prompt", "Hello! Who are you?", *talk]))  # fmt: skip
    prompts = workdir / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "What is 2 + 2?"}\n'
        '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}\n'
        '{"prompt": "The quick brown fox", "temperature": 0, "stop": ["dog"]}\n'
    )
    steps.append(("a batch file on the MP-2 shards, one JSON object per request",
                  ["generate", mp2, "--input-file", str(prompts), "--json", "--max-batch-size", "2", *talk]))  # fmt: skip
    for title, args in steps:
        rc = _step(title, args)
        if rc != 0:
            return rc
    from . import report

    report.info(f"\n[bold green]demo finished[/]: outputs in {workdir}")
    return 0


def _verify_steps(steps: list[tuple[str, list[str]]], ref: str) -> list[tuple[str, list[str]]]:
    """One ``verify --reference`` step per checkpoint a cast or shard step above writes."""
    out = []
    for _, args in steps:
        dst = args[3] if args[0] == "cast" and len(args) > 3 else args[2] if args[0] == "shard" else None
        if dst is not None:
            check = ["verify", dst, "--reference", ref]
            out.append((f"{Path(dst).name} computes what the original computed", check))
    return out
