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
    assert "dsv3_tools/kernels/weight_dequant.py" in names and "dsv3_tools/verify/run.py" in names
    assert "dsv3_tools/generate/engine.py" in names and "dsv3_tools/chat_templates/deepseek-v3.jinja" in names
    assert not any(n.startswith("kernels/") for n in names), "kernels must not be a top-level package"
    meta = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for dep in ("torch", "triton", "safetensors", "huggingface-hub", "typer", "rich", "numpy", "jinja2"):
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
        [str(py), "-c", "import dsv3_tools, dsv3_tools.kernels as k; print(dsv3_tools.__file__, list(k.__path__))"],
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
    # Every sub-package is in the wheel: verify (a package of its own) runs the model from it.
    r = subprocess.run([str(cli), "verify", "out"], cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
    # generate: its package and the chat template (package data) come from the wheel too.
    r = subprocess.run(
        [str(cli), "generate", "out", "-p", "hi", "--max-new-tokens", "2", "--max-seq-len", "64", "--json"],
        cwd=work, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0 and '"finish_reason"' in r.stdout, r.stdout + r.stderr


def test_repo_root_does_not_shadow_a_top_level_kernels_package() -> None:
    """With the repository root first on sys.path (``python -c``, ``python -m pytest``, a REPL opened in the repo),
    transformers' DeepSeek-V3 model loads: it imports Hugging Face's ``kernels`` package, which the repo's own
    ``kernels/`` folder (the source of ``dsv3_tools.kernels``) must never stand in for."""
    code = """
import importlib.util, sys
assert sys.path[0] == "", sys.path[:2]
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
cfg = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
    n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
DeepseekV3ForCausalLM(cfg)
import dsv3_tools.kernels.weight_dequant as ours
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec is not None else None, ours.__file__)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs, ours = r.stdout.split()
    assert Path(ours).parent == ROOT / "dsv3_tools" / "kernels"
    assert theirs == "None" or not Path(theirs).resolve().is_relative_to(ROOT / "kernels"), theirs
