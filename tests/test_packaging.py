"""The wheel installs into a fresh venv outside the repo and runs there, with configs shipped inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repo(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (whl,) = wheels.glob("dsv3_tools-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "dsv3_tools/configs/tiny.json" in names and "dsv3_tools/configs/deepseek-v3.json" in names
    assert "dsv3_tools/kernels/weight_dequant.py" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels must not be a top-level package"
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for dep in ("torch", "triton", "safetensors", "huggingface-hub", "typer", "rich", "numpy"):
        assert f"Requires-Dist: {dep}" in meta, dep

    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(whl)], check=True)
    # The heavy dependencies (torch, triton ...) come from this venv's site-packages through a plain path entry,
    # which does not activate the repo's editable install: the package itself can only come from the wheel.
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run(
        [str(py), "-c", "import dsv3_tools, dsv3_tools.kernels as k; print(dsv3_tools.__file__, k.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(venv) in where and str(ROOT) not in where, where
    cli = venv / "bin" / "dsv3-tools"
    r = subprocess.run([str(cli), "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "synth" in r.stdout
    r = subprocess.run([str(cli), "synth", "out", "--json"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (work / "out" / "model.safetensors.index.json").is_file()
    r = subprocess.run(
        [str(py), "-m", "dsv3_tools", "inspect", "out"], cwd=work, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
