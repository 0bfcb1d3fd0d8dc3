"""inspect and the structural part of verify on DeepSeek-V4: a clean release-format folder (and -Base) passes and is
described (family, variant, layers, MTP, layer kinds), and each planted defect is reported by name, file and kind;
strict opening (what cast and shard do) turns the first one into a one-line error; V4.1 is refused whole."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner
from v4_ref import copy_ckpt, holder, rewrite

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.cli import app
from dsv3_tools.errors import CheckpointError
from dsv3_tools.inspect import inspect_checkpoint
from dsv3_tools.verify import verify_checkpoint


def test_inspect_clean_release_and_base(tiny_v4: Path, tiny_v4_base: Path) -> None:
    r = inspect_checkpoint(tiny_v4)
    assert r.ok, r.problems
    assert (r.family, r.model_type, r.layers, r.mtp_layers, r.experts) == ("DeepSeek-V4", "deepseek_v4", 4, [4], 8)
    assert r.variant == "instruct release: FP4 experts" and "fp4 e2m1 1x32" in r.quantization
    assert r.layer_kinds == {
        "sliding window": 1,
        "compressed 1/4 + indexer": 2,
        "compressed 1/128": 1,
        "hash-routed": 2,
    }
    assert r.dtypes["I8"] == 8 * 3 * 5 and r.dtypes["I64"] == 2 and r.dense_layers == []
    assert r.params_main > 0 and r.params_mtp > 0 and r.bytes_main + r.bytes_mtp < r.file_bytes
    b = inspect_checkpoint(tiny_v4_base)
    assert b.ok and b.variant == "-Base release: FP8 experts, F32 scales" and "I8" not in b.dtypes
    res = CliRunner().invoke(app, ["inspect", str(tiny_v4), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["variant"] == r.variant


def _drop(*names: str):
    def edit(files: dict) -> None:
        for n in names:
            del holder(files, n)[n]

    return edit


def _set(name: str, fn):
    def edit(files: dict) -> None:
        ts = holder(files, name)
        ts[name] = fn(ts[name])

    return edit


def _nan_byte(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(torch.uint8)[3, -1] = 255
    return t


def _add(name: str, like: str):
    def edit(files: dict) -> None:
        ts = holder(files, like)
        ts[name] = ts[like].clone()

    return edit


# (planted defect, problem kind, tensor named)
DEFECTS = {
    "missing scale": (_drop("layers.1.ffn.experts.2.w3.scale"), "missing_scale", "layers.1.ffn.experts.2.w3.weight"),
    "missing tensor": (
        _drop("layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.wq_b.scale"),
        "missing_tensor",
        "layers.1.attn.indexer.wq_b.weight",
    ),
    "scale grid": (
        _set("layers.2.attn.wo_b.scale", lambda t: t[:, :2].contiguous()),
        "scale_shape",
        "layers.2.attn.wo_b.scale",
    ),
    "FP4 group scale shape": (
        _set("mtp.0.ffn.experts.0.w1.scale", lambda t: t[:, :4].contiguous()),
        "scale_shape",
        "mtp.0.ffn.experts.0.w1.scale",
    ),
    "expert dtype": (
        _set("layers.3.ffn.experts.5.w2.weight", lambda t: t.view(torch.uint8)),
        "tensor_spec",
        "layers.3.ffn.experts.5.w2.weight",
    ),
    "unknown name": (_add("layers.0.attn.wq.weight", "layers.0.attn.wq_a.weight"), "unknown_name", "layers.0.attn.wq.weight"),
    "orphan scale": (_add("layers.0.attn.q_norm.scale", "layers.0.attn.q_norm.weight"), "unknown_name", "layers.0.attn.q_norm.scale"),
    "layer kind": (
        _add("layers.0.attn.compressor.ape", "layers.2.attn.compressor.ape"),
        "unexpected_tensor",
        "layers.0.attn.compressor.ape",
    ),
    "hash gate on a bias layer": (
        _add("layers.3.ffn.gate.tid2eid", "layers.0.ffn.gate.tid2eid"),
        "unexpected_tensor",
        "layers.3.ffn.gate.tid2eid",
    ),
    "NaN E8M0": (_set("layers.1.attn.wq_b.scale", _nan_byte), "scale_value", "layers.1.attn.wq_b.scale"),
    "NaN FP4 scale": (_set("layers.2.ffn.experts.7.w1.scale", _nan_byte), "scale_value", "layers.2.ffn.experts.7.w1.scale"),
    "overflowing FP4 scale": (
        _set("layers.2.ffn.experts.1.w2.scale", lambda t: torch.full_like(t.view(torch.uint8), 254).view(t.dtype)),
        "scale_value",
        "layers.2.ffn.experts.1.w2.scale",
    ),
    "routing table": (_set("layers.1.ffn.gate.tid2eid", lambda t: t * 3), "value", "layers.1.ffn.gate.tid2eid"),
}  # fmt: skip


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_planted_defects_are_named(tiny_v4: Path, tmp_path: Path, defect: str) -> None:
    edit, kind, tensor = DEFECTS[defect]
    ck = copy_ckpt(tiny_v4, tmp_path / "c")
    rewrite(ck, edit)
    r = inspect_checkpoint(ck)
    hits = [p for p in r.problems if p["tensor"] == tensor]
    assert hits and hits[0]["kind"] == kind, r.problems
    assert hits[0]["file"] is None or hits[0]["file"].startswith("model-"), hits
    v = verify_checkpoint(ck)
    assert v.verdict == "fail" and any(p["tensor"] == tensor for p in v.problems)
    if kind not in ("scale_value", "value"):  # the values are read by inspect and verify, not when opening
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(ck)
        assert tensor in str(e.value)


def test_cli_exit_codes(
    tiny_v4: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok = CliRunner().invoke(app, ["verify", str(tiny_v4)])
    assert ok.exit_code == 0 and "structural checks only" in ok.output
    bad = copy_ckpt(tiny_v4, tmp_path / "bad")
    rewrite(bad, DEFECTS["missing scale"][0])
    assert CliRunner().invoke(app, ["inspect", str(bad)]).exit_code == 1
    assert CliRunner().invoke(app, ["verify", str(bad)]).exit_code == 1
    code, err = main_exit(["verify", str(tiny_v4), "--reference", str(tiny_v4)], capsys, monkeypatch)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "structure only" in errors[0], err


def main_exit(args: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``dsv3-tools ARGS`` in this process, through ``cli.main`` (the one-line error mapping): (exit code, stderr)."""
    from dsv3_tools import cli

    monkeypatch.setattr(sys, "argv", ["dsv3-tools", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    return e.value.code, capsys.readouterr().err


def test_v41_is_refused_in_one_line(
    tiny_v4: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = copy_ckpt(tiny_v4, tmp_path / "v41")
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(cfg | {"model_type": "deepseek_v41"}))
    cmds = (["inspect", str(ck)], ["verify", str(ck)], ["shard", str(ck), str(tmp_path / "o"), "--mp", "2"])
    for cmd in (*cmds, ["cast", "to-bf16", str(ck), str(tmp_path / "c")]):
        code, err = main_exit(cmd, capsys, monkeypatch)
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # (verify draws a progress bar)
        assert code == 2 and len(errors) == 1 and "DeepSeek-V4.1" in errors[0], (cmd, err)


def test_without_a_usable_config_the_v4_scales_are_still_checked(tiny_v4: Path, tmp_path: Path) -> None:
    """A broken config.json is reported, and the tensors are still checked by V4's rules (recognized by its names):
    the one real defect, not a V3 'missing weight_scale_inv' on every weight."""
    ck = copy_ckpt(tiny_v4, tmp_path / "c")
    rewrite(ck, DEFECTS["missing scale"][0])
    (ck / "config.json").write_text("{")
    r = inspect_checkpoint(ck)
    assert [(p["kind"], p["tensor"]) for p in r.problems] == [
        ("config", None),
        ("missing_scale", "layers.1.ffn.experts.2.w3.weight"),
    ], r.problems
