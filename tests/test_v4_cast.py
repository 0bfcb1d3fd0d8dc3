"""cast on DeepSeek-V4 against the independent decoders of tests/v4_ref.py (written from the format facts): to-bf16
bit-exact for FP8 (E8M0 and -Base F32 scales) and FP4 experts, fp4-fp8 lossless (both decoded, compared exactly)
and refused exactly where a block cannot be held; outputs read by safetensors' own reader, complete and loadable
(index, config, sidecars), streaming in small chunks, resumable after SIGKILL."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from v4_ref import bits_equal, copy_ckpt, fp4_values, fp8_values, holder, read_folder, rewrite

from dsv3_tools import cast as C
from dsv3_tools.errors import ConfigError, DeviceError, InexactConversionError, ScaleValueError
from dsv3_tools.inspect import inspect_checkpoint
from dsv3_tools.layout import INDEX_NAME, MANIFEST_NAME

FP4_EXPERT = "layers.1.ffn.experts.3.w2.weight"


def decoded(t: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """float64 value of a weight of a V4 folder (FP4 or FP8 with its scale; anything else as stored)."""
    w, s = t[name], t.get(name.removesuffix(".weight") + ".scale")
    if s is None:
        return w.double()
    return fp4_values(w, s) if w.dtype == torch.int8 else fp8_values(w, s)


@pytest.fixture(scope="module")
def bf16_out(tiny_v4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("v4cast") / "bf16"
    C.cast_fp8_to_bf16(tiny_v4, dst, device="cpu")
    return dst


@pytest.fixture(scope="module")
def fp8_out(tiny_v4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("v4cast") / "fp8"
    C.run_cast(C.plan_fp4_to_fp8(tiny_v4, dst))
    return dst


def check_bf16(src: Path, dst: Path) -> None:
    """Every weight of ``dst`` is the BF16 of ``src``'s exactly decoded value (one rounding from the F32 product,
    as bf16(f32(w) * s); FP4 and E8M0 products are exact); everything else is byte-identical; no scale is left."""
    a, b = read_folder(src), read_folder(dst)
    assert set(b) == {n for n in a if not n.endswith(".scale")}
    for n, t in b.items():
        if n.removesuffix(".weight") + ".scale" in a:
            want = decoded(a, n).float().to(torch.bfloat16)
            assert bits_equal(t, want), n
        else:
            assert bits_equal(t, a[n]), n


def test_to_bf16_release_is_exact_and_complete(tiny_v4: Path, bf16_out: Path) -> None:
    check_bf16(tiny_v4, bf16_out)
    cfg_in = json.loads((tiny_v4 / "config.json").read_text())
    cfg = json.loads((bf16_out / "config.json").read_text())
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg and cfg["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == {
        k: v for k, v in cfg_in.items() if k != "quantization_config"
    }
    index = json.loads((bf16_out / INDEX_NAME).read_text())
    t = read_folder(bf16_out)
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "LICENSE"):
        assert (bf16_out / side).read_bytes() == (tiny_v4 / side).read_bytes(), side
    r = inspect_checkpoint(bf16_out)
    assert r.ok and r.variant == "BF16 (no quantization)", r.problems
    man = json.loads((bf16_out / MANIFEST_NAME).read_text())
    assert (
        man["complete"]
        and FP4_EXPERT in man["extra"]["converted"]
        and "layers.0.attn.wq_a.weight" in man["extra"]["converted"]
    )


def test_to_bf16_base_f32_scales(tiny_v4_base: Path, tmp_path: Path) -> None:
    r = C.cast_fp8_to_bf16(tiny_v4_base, tmp_path / "o", device="cpu")
    assert r.tensors_cast == sum(1 for n in read_folder(tiny_v4_base) if n.endswith(".scale"))
    check_bf16(tiny_v4_base, tmp_path / "o")


def test_fp4_fp8_is_lossless(tiny_v4: Path, fp8_out: Path) -> None:
    a, b = read_folder(tiny_v4), read_folder(fp8_out)
    assert set(a) == set(b)
    experts = [n for n in a if ".experts." in n and "shared" not in n and n.endswith(".weight")]
    assert experts and len(experts) == 5 * 8 * 3
    for n in experts:
        s = n.removesuffix(".weight") + ".scale"
        assert b[n].dtype == torch.float8_e4m3fn and b[n].shape == (a[n].shape[0], a[n].shape[1] * 2)
        assert b[s].dtype == torch.float8_e8m0fnu and b[s].shape == (a[n].shape[0] // 128, a[n].shape[1] * 2 // 128)
        assert bits_equal(decoded(b, n), decoded(a, n)), n  # the sign of zero included
    for n in set(a) - set(experts) - {e.removesuffix(".weight") + ".scale" for e in experts}:
        assert bits_equal(a[n], b[n]), n
    cfg = json.loads((fp8_out / "config.json").read_text())
    assert cfg["expert_dtype"] == "fp8" and cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    r = inspect_checkpoint(fp8_out)
    assert r.ok and r.variant == "FP8 experts, E8M0 scales (cast fp4-fp8)", r.problems


def test_fp4_fp8_then_bf16_equals_bf16(fp8_out: Path, bf16_out: Path, tmp_path: Path) -> None:
    """Lossless means the same BF16 either way, byte for byte (the files, not only the values)."""
    C.cast_fp8_to_bf16(fp8_out, tmp_path / "b", device="cpu")
    for f in sorted(p.name for p in bf16_out.glob("*.safetensors")):
        assert (tmp_path / "b" / f).read_bytes() == (bf16_out / f).read_bytes(), f


def _plant_spread(files: dict, low_codes: int) -> None:
    """In FP4_EXPERT's block (1, 0): one group 15 exponents below the block's largest, holding only ``low_codes``."""
    scale = FP4_EXPERT.removesuffix(".weight") + ".scale"
    ts = holder(files, scale)
    e = ts[scale].view(torch.uint8).clone()
    top = int(e[128:256, 0:4].max())
    assert top - int(e[128:256, 0:4].min()) <= 14  # (synth's blocks are exact)
    e[129, 0] = top - 15  # row 129, columns 0-31: shift -9 there
    ts[scale] = e.view(torch.float8_e8m0fnu)
    w = ts[FP4_EXPERT].view(torch.uint8).clone()
    w[129, 0:16] = low_codes
    ts[FP4_EXPERT] = w.view(torch.int8)


def test_fp4_fp8_refuses_an_inexact_block_before_writing(tiny_v4: Path, tmp_path: Path) -> None:
    bad = copy_ckpt(tiny_v4, tmp_path / "bad")
    rewrite(bad, lambda files: _plant_spread(files, 0x11))  # 0.5, 0.5: 0.5 * 2**-9 is below e4m3's subnormal step
    with pytest.raises(InexactConversionError) as e:
        C.plan_fp4_to_fp8(bad, tmp_path / "o")
    msg = str(e.value)
    assert FP4_EXPERT in msg and "block (1, 0)" in msg and "spanning 15" in msg and "\n" not in msg
    assert not (tmp_path / "o").exists()
    # the same spread holding only values that stay multiples of 2**-9 (1.0 and 3.0): converted, losslessly
    ok = copy_ckpt(tiny_v4, tmp_path / "ok")
    rewrite(ok, lambda files: _plant_spread(files, 0x52))  # 1.0, 3.0
    C.run_cast(C.plan_fp4_to_fp8(ok, tmp_path / "o2"))
    a, b = read_folder(ok), read_folder(tmp_path / "o2")
    assert bits_equal(decoded(b, FP4_EXPERT), decoded(a, FP4_EXPERT))


def test_bad_scales_and_wrong_inputs_are_refused(
    tiny_v4: Path, tiny_v4_base: Path, tiny_fp8: Path, tmp_path: Path
) -> None:
    nan = copy_ckpt(tiny_v4, tmp_path / "nan")
    scale = "layers.2.attn.wq_b.scale"

    def nan_scale(files: dict) -> None:
        ts = holder(files, scale)
        ts[scale] = torch.full_like(ts[scale].view(torch.uint8), 255).view(torch.float8_e8m0fnu)

    rewrite(nan, nan_scale)
    for plan in (C.plan_fp8_to_bf16, C.plan_fp4_to_fp8):
        with pytest.raises(ScaleValueError, match="NaN"):
            plan(nan, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="not FP4"):
        C.plan_fp4_to_fp8(tiny_v4_base, tmp_path / "o")
    with pytest.raises(ConfigError, match="DeepSeek-V4"):
        C.plan_fp4_to_fp8(tiny_fp8, tmp_path / "o")
    with pytest.raises(ConfigError, match="DeepSeek-V4 is not supported"):
        C.plan_bf16_to_fp8(tiny_v4, tmp_path / "o")
    with pytest.raises(DeviceError):
        C.plan_fp8_to_bf16(tiny_v4, tmp_path / "o", device="cuda")


def test_small_chunks_and_mtp_drop(
    tiny_v4: Path, bf16_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several chunks per tensor (FP4 scale rows and E8M0 block rows sliced per chunk) give the same bytes."""
    monkeypatch.setattr(C, "CPU_CHUNK", 128 * 128)
    monkeypatch.setattr(C, "COPY_CHUNK", 4096)
    C.cast_fp8_to_bf16(tiny_v4, tmp_path / "small", device="cpu")
    for f in sorted(p.name for p in bf16_out.glob("*.safetensors")):
        assert (tmp_path / "small" / f).read_bytes() == (bf16_out / f).read_bytes(), f
    r = C.run_cast(C.plan_fp4_to_fp8(tiny_v4, tmp_path / "nomtp", mtp="drop"))
    t = read_folder(tmp_path / "nomtp")
    assert r.tensors_dropped > 0 and not [n for n in t if n.startswith("mtp.")]
    assert json.loads((tmp_path / "nomtp" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert inspect_checkpoint(tmp_path / "nomtp").ok


KILLER = """
import os, signal, sys
from dsv3_tools import cast, writer
src, dst = sys.argv[1:3]
orig = writer.Manifest.record
def record(self, rec, **info):
    orig(self, rec, **info)
    if rec.name.startswith("model-00003"):
        os.kill(os.getpid(), signal.SIGKILL)
writer.Manifest.record = record
cast.run_cast(cast.plan_fp4_to_fp8(src, dst))
"""


def test_resume_after_sigkill(tiny_v4: Path, fp8_out: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILLER, str(tiny_v4), str(dst)], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not json.loads((dst / MANIFEST_NAME).read_text())["complete"] and not (dst / "config.json").exists()
    r = C.run_cast(C.plan_fp4_to_fp8(tiny_v4, dst))
    assert sorted(r.kept) == [f"model-0000{i}-of-00007.safetensors" for i in (1, 2, 3)]
    for f in sorted(p.name for p in fp8_out.iterdir() if p.name != MANIFEST_NAME):
        assert (dst / f).read_bytes() == (fp8_out / f).read_bytes(), f


def test_cli_dry_run(tiny_v4: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsv3_tools.cli import app

    res = CliRunner().invoke(app, ["cast", "fp4-fp8", str(tiny_v4), str(tmp_path / "o"), "--dry-run", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["direction"] == "fp4-fp8" and d["tensors_cast"] == 120 and d["dry_run"] and not (tmp_path / "o").exists()
