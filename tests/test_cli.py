"""The command line as a user's pipe or log file sees it: tables laid out for a file never wrap or cut a cell."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file


def _run(*args: str) -> subprocess.CompletedProcess:
    # stdout is a pipe here, as in `dsv3-tools inspect DIR | grep ...` or `dsv3-tools verify ... > log`
    return subprocess.run([sys.executable, "-m", "dsv3_tools", *args], capture_output=True, text=True)


def test_inspect_piped_keeps_each_problem_on_one_line(tiny_fp8: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(tiny_fp8, ck)
    # Drop one expert's weight: the problem table names it (a long tensor name) in a row of its own.
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    f = next(p for p in sorted(ck.glob("*.safetensors")) if name in load_file(p))
    t = load_file(f)
    del t[name]
    save_file(t, f, metadata={"format": "pt"})
    p = _run("inspect", str(ck))
    assert p.returncode == 1, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "experts.5.down_proj" in ln]
    assert any(name in ln and "missing" in ln.lower() for ln in lines), p.stdout


def test_verify_to_a_file_keeps_every_metric_whole(tiny_fp8: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref.safetensors"
    assert _run("verify", str(tiny_fp8), "--save-reference", str(ref)).returncode == 0
    p = _run("verify", str(tiny_fp8), "--reference", str(ref))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "…" not in p.stdout, p.stdout
    rows = [ln for ln in p.stdout.splitlines() if re.match(r"^\S\s+(\d+|all)\s", ln)]
    assert len(rows) >= 6, p.stdout  # five prompts and "all", one line each
    for ln in rows:
        cells = [c.strip() for c in ln.strip("│┃ ").split("│")]
        assert len(cells) == 9 and cells[-1] == "yes", ln
        assert all(re.fullmatch(r"-?\d+\.\d+(e[-+]\d+)?", c) for c in cells[2:8]), ln


def test_mtp_means_one_thing_with_one_default() -> None:
    """``--mtp`` is keep|drop, default keep, in every command that touches the MTP module."""
    from typer.testing import CliRunner

    from dsv3_tools.cli import app

    for cmd in (["synth"], ["cast", "fp8-bf16"], ["cast", "bf16-fp8"], ["shard"], ["verify"]):
        res = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
        text = " ".join(res.stdout.replace("│", " ").split())
        after = text.split("--mtp ", 1)[1]
        assert re.match(r"\W*keep\|drop\W", after) and "[default: keep]" in after.split(" --", 1)[0], (cmd, text)


def test_mtp_keep_and_drop_through_the_cli(tmp_path: Path) -> None:
    import json

    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    assert _run("synth", str(kept), "--json").returncode == 0
    assert _run("synth", str(dropped), "--mtp", "drop", "--json").returncode == 0
    cfg = json.loads((dropped / "config.json").read_text())
    index = json.loads((dropped / "model.safetensors.index.json").read_text())["weight_map"]
    assert cfg["num_nextn_predict_layers"] == 0 and not any(".layers.3." in k for k in index)
    assert any(".layers.3." in k for k in json.loads((kept / "model.safetensors.index.json").read_text())["weight_map"])
    # verify's default compares the MTP module's logits too
    ref = tmp_path / "ref.safetensors"
    p = _run("verify", str(kept), "--save-reference", str(ref), "--json")
    assert p.returncode == 0, p.stderr
    p = _run("verify", str(kept), "--reference", str(ref), "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["mtp_overall"]["positions"] > 0, p.stdout[-2000:]
    p = _run("verify", str(kept), "--reference", str(ref), "--mtp", "drop", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["mtp_overall"] is None
