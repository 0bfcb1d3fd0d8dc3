"""cast fp8-bf16 / bf16-fp8 against independent references: a plain-torch (de)quantizer written here, the raw bytes
of the input, safetensors' own reader, and transformers' DeepseekV3ForCausalLM loading the output."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv3_tools import cast as C
from dsv3_tools import names as N
from dsv3_tools import output as O
from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.errors import (
    CheckpointError,
    ConfigError,
    MissingScaleError,
    OrphanScaleError,
    OutputError,
    ScaleShapeError,
)
from dsv3_tools.layout import INDEX_NAME, MANIFEST_NAME
from dsv3_tools.output import MP_SIDECAR_PATTERNS, sidecar_files
from dsv3_tools.writer import SafetensorsWriter


# ---------------------------------------------------------------------- independent references
def plain_dequant(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """bf16(f32(w[i, j]) * s[i // B0, j // B1]) by explicit index maps."""
    rows = torch.arange(w.shape[0]) // block[0]
    cols = torch.arange(w.shape[1]) // block[1]
    return (w.to(torch.float32) * s[rows][:, cols]).to(torch.bfloat16)


def plain_quant(x: torch.Tensor, block: tuple[int, int], ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block by block: s = max(amax, 1e-4) / 448 (or the next power of two up), q = fp8(x / s)."""
    b0, b1 = block
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn)
    s = torch.empty((-(-M // b0), -(-K // b1)), dtype=torch.float32)
    for bi, i in enumerate(range(0, M, b0)):
        for bj, j in enumerate(range(0, K, b1)):
            blk = x[i : i + b0, j : j + b1].float()
            sc = torch.clamp(blk.abs().max(), min=1e-4) / 448.0
            if ue8m0:
                m, e = math.frexp(float(sc))
                sc = torch.tensor(2.0 ** (e - 1 if m == 0.5 else e), dtype=torch.float32)
            s[bi, bj] = sc
            q[i : i + b0, j : j + b1] = (blk / sc).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def tensors_of(folder: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every tensor of a folder with the file it is in, read by safetensors (not by dsv3_tools)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in load_file(f).items():
            out[k] = (f.name, v)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    ne = (a.view(torch.int16) != b.view(torch.int16)).nonzero()
    if not len(ne):
        return "equal"
    i = tuple(ne[0].tolist())
    return f"{len(ne)} differ; first at {i}: {a[i].item()} vs {b[i].item()}"


def file_digests(folder: Path, skip: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bf16_out(tiny_fp8: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("cast") / "tiny-bf16"
    C.cast_fp8_to_bf16(tiny_fp8, dst, device="cpu")
    return dst


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o644 if p.is_file() else 0o755)
    return dst


def rewrite(folder: Path, edit) -> None:
    """Apply ``edit(name -> tensor dict per file)`` to a copied checkpoint and fix its index (plants faults)."""
    index = json.loads((folder / INDEX_NAME).read_text())
    files = {f: load_file(folder / f) for f in sorted(set(index["weight_map"].values()))}
    edit(files)
    wmap, total = {}, 0
    for f, ts in files.items():
        save_file(ts, folder / f, metadata={"format": "pt"})
        for k, v in ts.items():
            wmap[k] = f
            total += v.numel() * v.element_size()
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}))


def holder(files: dict, name: str) -> dict:
    return next(ts for ts in files.values() if name in ts)


# ---------------------------------------------------------------------- kernels
def test_cpu_dequant_every_byte_ragged_and_nan() -> None:
    from dsv3_tools.kernels.cpu_dequant import dequant_fp8

    g = torch.Generator().manual_seed(0)
    for shape, block in [
        ((300, 200), (128, 128)),
        ((257, 129), (128, 128)),
        ((64, 96), (16, 32)),
        ((1, 5), (128, 128)),
    ]:
        raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        raw.view(-1)[: min(256, raw.numel())] = torch.arange(min(256, raw.numel()), dtype=torch.uint8)
        grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
        s = torch.exp2(torch.randint(-20, 3, grid, generator=g).float()) * (1 + torch.rand(grid, generator=g))
        for nan in (False, True):
            r = raw.clone()
            if not nan:
                r[(r & 0x7F) == 0x7F] = 0x7E  # the fast path runs only on NaN-free chunks: test both
            w = r.view(torch.float8_e4m3fn)
            got, want = dequant_fp8(w, s, block), plain_dequant(w, s, block)
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (
                shape,
                block,
                nan,
                first_diff(got, want),
            )


def test_cpu_quant_matches_plain_torch() -> None:
    from dsv3_tools.kernels.cpu_dequant import quant_fp8

    g = torch.Generator().manual_seed(1)
    x = (
        torch.randn(300, 200, generator=g) * torch.exp2(torch.randint(-8, 8, (300, 1), generator=g).float())
    ).bfloat16()
    x[:128, :128] = 0  # an all-zero block uses the amax floor
    for ue8m0 in (False, True):
        q, s = quant_fp8(x, (128, 128), "ue8m0" if ue8m0 else None)
        pq, ps = plain_quant(x, (128, 128), ue8m0)
        assert torch.equal(s, ps), (ue8m0, (s != ps).nonzero()[:3])
        assert torch.equal(q.view(torch.uint8), pq.view(torch.uint8)), ue8m0


def test_background_direct_writer_same_bytes(tmp_path: Path) -> None:
    ts = {"a": torch.randn(100, 33), "b": torch.randint(0, 255, (70001,), dtype=torch.uint8)}
    entries = [("a", "F32", (100, 33)), ("b", "U8", (70001,))]
    recs = []
    for i, kw in enumerate([{}, {"background": True}, {"background": True, "direct": True}]):
        w = SafetensorsWriter(tmp_path / f"{i}.safetensors", entries, {"format": "pt"}, **kw)
        for name, t in ts.items():
            flat = t.reshape(-1).view(torch.uint8)
            for j in range(0, flat.numel(), 9999):
                w.write_part(name, memoryview(flat[j : j + 9999].clone().numpy()))
        recs.append(w.finish())
        assert hashlib.sha256((tmp_path / f"{i}.safetensors").read_bytes()).hexdigest() == recs[-1].sha256
    assert len({r.sha256 for r in recs}) == 1
    got = load_file(tmp_path / "2.safetensors")
    assert all(torch.equal(got[k], v) for k, v in ts.items())


# ---------------------------------------------------------------------- fp8 -> bf16
def test_fp8_to_bf16_values_and_passthrough(tiny_fp8: Path, bf16_out: Path) -> None:
    cfg = ModelConfig.load(tiny_fp8)
    src, out = tensors_of(tiny_fp8), tensors_of(bf16_out)
    fp8 = {k for k, (_, v) in src.items() if v.dtype == torch.float8_e4m3fn}
    assert fp8 and set(out) == {k for k in src if not k.endswith("_scale_inv")}
    for name, (f, v) in src.items():
        if name.endswith("_scale_inv"):
            continue
        of, ov = out[name]
        assert of == f, f"{name}: in {of}, was in {f}"
        if name in fp8:
            want = plain_dequant(v, src[N.scale_name(name)][1], cfg.block_size)
            assert ov.dtype == torch.bfloat16 and torch.equal(ov.view(torch.int16), want.view(torch.int16)), (
                f"{name}: {first_diff(ov, want)}"
            )
        else:
            assert same_bytes(ov, v), f"{name}: not byte-identical"
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert out[bias][1].dtype == torch.float32


def test_output_inside_or_around_the_input_is_refused(tiny_fp8: Path, tmp_path: Path) -> None:
    """Inputs are never modified: an output folder that is the input, lies in it, or contains it is refused (cast
    both ways and shard), before anything is written."""
    from dsv3_tools.shard import shard_checkpoint

    src = tmp_path / "in"
    shutil.copytree(tiny_fp8, src)
    before = sorted(p.relative_to(src).as_posix() for p in src.rglob("*"))
    for dst in (src, src / "out", tmp_path):
        for run in (
            lambda d: C.cast_fp8_to_bf16(src, d, device="cpu"),
            lambda d: C.cast_fp8_to_bf16(src, d, device="cpu", dry_run=True),
            lambda d: shard_checkpoint(src, d, mp=2, mtp="drop"),
        ):
            with pytest.raises(OutputError, match="outside the input folder"):
                run(dst)
    assert sorted(p.relative_to(src).as_posix() for p in src.rglob("*")) == before


def test_sidecar_rules(tmp_path: Path) -> None:
    """cast (an HF folder) keeps every other file, sub-folders included; shard (MP layout) only the tokenizer,
    generation config, license and README; neither takes weights, index, config, manifest or hidden files."""
    for rel in ("config.json", INDEX_NAME, MANIFEST_NAME, "model-00001-of-00002.safetensors", "tokenizer.json",
                "tokenizer_config.json", "generation_config.json", "modeling_deepseek.py", "LICENSE", "README.md",
                "figures/benchmark.png", ".cache/huggingface/download/x.metadata", ".tokenizer.json.partial"):  # fmt: skip
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    shared = ["LICENSE", "README.md", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sidecar_files(tmp_path) == sorted([*shared, "figures/benchmark.png", "modeling_deepseek.py"])
    assert sidecar_files(tmp_path, MP_SIDECAR_PATTERNS) == shared


def test_fp8_to_bf16_folder(tiny_fp8: Path, bf16_out: Path) -> None:
    src_index = json.loads((tiny_fp8 / INDEX_NAME).read_text())
    index = json.loads((bf16_out / INDEX_NAME).read_text())
    want_map = {k: v for k, v in src_index["weight_map"].items() if not k.endswith("_scale_inv")}
    assert index["weight_map"] == want_map
    total = 0
    for f in sorted(set(want_map.values())):
        with safe_open(bf16_out / f, "pt") as sf:
            assert sf.metadata() == {"format": "pt"}, f
            for k in sf.keys():
                t = sf.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total
    cfg_in = json.loads((tiny_fp8 / "config.json").read_text())
    cfg_out = json.loads((bf16_out / "config.json").read_text())
    assert "quantization_config" not in cfg_out and cfg_out["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in cfg_in.items() if k != "quantization_config"} == cfg_out
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md", "LICENSE"):
        assert (bf16_out / side).read_bytes() == (tiny_fp8 / side).read_bytes(), side
    man = json.loads((bf16_out / MANIFEST_NAME).read_text())
    assert man["complete"] is True
    for rel, rec in man["files"].items():
        assert hashlib.sha256((bf16_out / rel).read_bytes()).hexdigest() == rec["sha256"], rel
    assert set(man["files"]) == set(file_digests(bf16_out))
    src_fp8 = {k for k, (_, v) in tensors_of(tiny_fp8).items() if v.dtype == torch.float8_e4m3fn}
    assert set(man["extra"]["fp8_weights"]) == src_fp8
    open_checkpoint(bf16_out, strict=True)  # the reader's full validation against the config


def test_bf16_output_loads_in_transformers(bf16_out: Path) -> None:
    transformers = pytest.importorskip("transformers")
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        bf16_out, dtype=torch.float32, output_loading_info=True
    )
    cfg = ModelConfig.load(bf16_out)
    assert info["missing_keys"] == [] or not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    extra = [k for k in info["unexpected_keys"] if not any(f"model.layers.{L}." in k for L in cfg.mtp_layers)]
    assert not extra, extra
    ours = tensors_of(bf16_out)
    params = dict(model.named_parameters())
    for name in ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.2.self_attn.o_proj.weight", "lm_head.weight"):  # fmt: skip
        assert torch.equal(params[name].detach(), ours[name][1].float()), name


# ---------------------------------------------------------------------- bf16 -> fp8
def test_round_trip_f32_scales(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    dst = tmp_path / "fp8-again"
    r = C.cast_bf16_to_fp8(bf16_out, dst)
    orig, again = tensors_of(tiny_fp8), tensors_of(dst)
    assert set(again) == set(orig)
    for name, (_, v) in orig.items():
        w = again[name][1]
        if name.endswith("_scale_inv"):
            rel = ((w - v).abs() / v).max().item()
            assert rel <= 2**-8, f"{name}: scale off by {rel}"
        else:
            assert same_bytes(w, v), f"{name}: bytes differ after fp8 -> bf16 -> fp8"
    assert r.tensors_cast == sum(1 for _, v in orig.values() if v.dtype == torch.float8_e4m3fn)
    cfg_in = json.loads((tiny_fp8 / "config.json").read_text())
    assert json.loads((dst / "config.json").read_text()) == cfg_in
    index = json.loads((dst / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(orig)
    open_checkpoint(dst, strict=True)


def test_round_trip_ue8m0(tiny_fp8_ue8m0: Path, tmp_path: Path) -> None:
    b1, f2, b2 = tmp_path / "b1", tmp_path / "f2", tmp_path / "b2"
    C.cast_fp8_to_bf16(tiny_fp8_ue8m0, b1, device="cpu")
    C.cast_bf16_to_fp8(b1, f2)  # no --scale-fmt: the original's, from the fp8-bf16 manifest
    qc = json.loads((f2 / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0" and qc["weight_block_size"] == [128, 128]
    for name, (_, s) in tensors_of(f2).items():
        if name.endswith("_scale_inv"):
            m, _ = torch.frexp(s)
            assert bool((m == 0.5).all()), f"{name}: not a power of two"
    C.cast_fp8_to_bf16(f2, b2, device="cpu")
    first, second = tensors_of(b1), tensors_of(b2)
    assert set(first) == set(second)
    for name, (_, v) in first.items():
        assert same_bytes(second[name][1], v), f"{name}: {first_diff(second[name][1], v)}"
    f3 = tmp_path / "f3"  # an explicit --scale-fmt wins over the original's
    C.cast_bf16_to_fp8(b1, f3, scale_fmt="f32")
    assert "scale_fmt" not in json.loads((f3 / "config.json").read_text())["quantization_config"]
    assert any(not bool((torch.frexp(s)[0] == 0.5).all()) for n, (_, s) in tensors_of(f3).items() if "_scale" in n)


def test_bf16_to_fp8_without_manifest_and_ignore(tiny_bf16: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.load(tiny_bf16)
    dst = tmp_path / "q"
    pattern = "model.layers.1.mlp.experts.0.*"
    C.cast_bf16_to_fp8(tiny_bf16, dst, ignore=[pattern])
    src, out = tensors_of(tiny_bf16), tensors_of(dst)
    default = set(N.quantizable_weights(cfg))
    want = {n for n in default if not n.startswith("model.layers.1.mlp.experts.0.")}
    got = {k for k, (_, v) in out.items() if v.dtype == torch.float8_e4m3fn}
    assert got == want and len(want) == len(default) - 3
    for name, (_, v) in src.items():
        if name in want:
            q, s = plain_quant(v, (128, 128), ue8m0=False)
            assert same_bytes(out[name][1], q), name
            assert torch.equal(out[N.scale_name(name)][1], s), name
        else:
            assert same_bytes(out[name][1], v), f"{name}: not byte-identical"
    assert set(out) == set(src) | {N.scale_name(n) for n in want}


# ---------------------------------------------------------------------- errors, dry run, MTP
@pytest.mark.parametrize(
    ("fault", "error", "tensor"),
    [
        ("missing_scale", MissingScaleError, "model.layers.1.self_attn.o_proj.weight"),
        ("orphan_scale", OrphanScaleError, "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"),
        ("scale_shape", ScaleShapeError, "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"),
    ],
)
def test_faults_name_the_tensor_and_write_nothing(tiny_fp8: Path, tmp_path: Path, fault, error, tensor) -> None:
    bad = copy_ckpt(tiny_fp8, tmp_path / "bad")

    def plant(files: dict) -> None:
        if fault == "missing_scale":
            del holder(files, tensor + "_scale_inv")[tensor + "_scale_inv"]
        elif fault == "orphan_scale":
            w = tensor.removesuffix("_scale_inv")
            del holder(files, w)[w]
        else:
            ts = holder(files, tensor)
            ts[tensor] = torch.ones((ts[tensor].shape[0] + 1, ts[tensor].shape[1]), dtype=torch.float32)

    rewrite(bad, plant)
    dst = tmp_path / "out"
    with pytest.raises(error) as e:
        C.cast_fp8_to_bf16(bad, dst, device="cpu")
    assert isinstance(e.value, CheckpointError) and tensor in str(e.value)
    assert not dst.exists()
    if fault != "missing_scale":
        return  # the CLI's one-line message and exit code: once is enough (a subprocess costs seconds)
    r = subprocess.run([sys.executable, "-m", "dsv3_tools", "cast", "fp8-bf16", str(bad), str(dst)], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 2 and tensor in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not dst.exists()


def test_dry_run_and_low_disk(tiny_fp8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "out"
    plan = C.cast_fp8_to_bf16(tiny_fp8, dst, device="cpu", dry_run=True)
    assert not dst.exists()
    assert [f.name for f in plan.files] == sorted(
        set(json.loads((tiny_fp8 / INDEX_NAME).read_text())["weight_map"].values())
    )
    assert plan.bytes_out > plan.bytes_in > 0 and plan.free_bytes > 0 and plan.bytes_needed >= plan.bytes_out
    monkeypatch.setattr(O, "free_bytes", lambda p: plan.bytes_out // 2)
    for dry in (True, False):
        with pytest.raises(OutputError, match="free"):
            C.cast_fp8_to_bf16(tiny_fp8, dst, device="cpu", dry_run=dry)
        assert not dst.exists()


def test_mtp_drop(tiny_fp8: Path, tmp_path: Path) -> None:
    cfg = ModelConfig.load(tiny_fp8)
    dst = tmp_path / "nomtp"
    r = C.cast_fp8_to_bf16(tiny_fp8, dst, device="cpu", mtp="drop")
    mtp = [f"model.layers.{L}." for L in cfg.mtp_layers]
    out = tensors_of(dst)
    assert r.tensors_dropped > 0 and not [k for k in out if k.startswith(tuple(mtp))]
    src = {k for k in tensors_of(tiny_fp8) if not k.endswith("_scale_inv") and not k.startswith(tuple(mtp))}
    assert set(out) == src
    assert json.loads((dst / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert not [
        k for k in json.loads((dst / MANIFEST_NAME).read_text())["extra"]["fp8_weights"] if k.startswith(tuple(mtp))
    ]
    open_checkpoint(dst, strict=True)


def test_workers_must_be_positive(tiny_fp8: Path, tmp_path: Path) -> None:
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="--workers must be a positive"):
            C.cast_fp8_to_bf16(tiny_fp8, tmp_path / "x", device="cpu", workers=bad)
    assert not (tmp_path / "x").exists()


def test_device_cuda_without_gpu_is_a_clear_error(tiny_fp8: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(C.DeviceError, match="cuda"):
        C.cast_fp8_to_bf16(tiny_fp8, tmp_path / "x", device="cuda")
    assert C.resolve_device("auto") == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_and_cpu_give_the_same_bytes(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    C.cast_fp8_to_bf16(tiny_fp8, tmp_path / "gpu", device="cuda")
    assert file_digests(tmp_path / "gpu") == file_digests(bf16_out)


# ---------------------------------------------------------------------- interruption
# Runs the CLI and sends this process a signal (KILL, or INT for Ctrl-C) once one output file is finished and the
# next one is partly written: the hooks live here, not in the product.
KILLER = """
import os, signal, sys, time
from dsv3_tools import output, writer
from dsv3_tools.cli import main
sig = getattr(signal, "SIG" + sys.argv[1])
finished = [0]
orig_record = output.Output.record
def record(self, rec, **info):
    orig_record(self, rec, **info)
    finished[0] += rec.name.endswith(".safetensors")
output.Output.record = record
orig_part = writer.SafetensorsWriter.write_part
def write_part(self, name, data):
    orig_part(self, name, data)
    if finished[0] == 1:
        finished[0] += 1
        time.sleep(0.5)  # let the writer put some bytes in the partial file first
        os.kill(os.getpid(), sig)
writer.SafetensorsWriter.write_part = write_part
sys.argv = ["dsv3-tools", *sys.argv[2:]]
main()
"""


def _killed_cast(sig: str, src: Path, dst: Path) -> subprocess.CompletedProcess:
    args = ["cast", "fp8-bf16", str(src), str(dst), "--device", "cpu", "--json"]
    return subprocess.run([sys.executable, "-c", KILLER, sig, *args], capture_output=True, text=True)


def test_sigkill_then_resume_is_byte_identical(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    dst = tmp_path / "killed"
    cmd = [sys.executable, "-m", "dsv3_tools", "cast", "fp8-bf16", str(tiny_fp8), str(dst), "--device", "cpu", "--json"]
    r = _killed_cast("KILL", tiny_fp8, dst)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    man = json.loads((dst / MANIFEST_NAME).read_text())
    assert not man["complete"] and len(man["files"]) == 1, man["files"]
    first = next(iter(man["files"]))
    assert not (dst / "config.json").exists() and not (dst / INDEX_NAME).exists()
    mtime = (dst / first).stat().st_mtime_ns
    r = subprocess.run(cmd[:-1] + ["--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["kept"] == [first] and (dst / first).stat().st_mtime_ns == mtime
    assert file_digests(dst) == file_digests(bf16_out)
    assert not list(dst.rglob("*.partial"))


def test_cli_ctrl_c_exits_130_with_a_resume_hint(tiny_fp8: Path, tmp_path: Path) -> None:
    dst = tmp_path / "sigint"
    r = _killed_cast("INT", tiny_fp8, dst)
    assert r.returncode == 130 and "run the same command again to resume" in r.stderr, (r.returncode, r.stderr)
    assert not list(dst.rglob("*.partial")) and not (dst / "config.json").exists()
    assert len(json.loads((dst / MANIFEST_NAME).read_text())["files"]) == 1


def test_ctrl_c_cleans_up_and_resumes(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    dst = tmp_path / "interrupted"
    calls = []

    def progress(n: int) -> None:
        calls.append(n)
        if len(calls) == 45:  # inside the second file
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.cast_fp8_to_bf16(tiny_fp8, dst, device="cpu", progress=progress)
    assert not list(dst.glob(".*partial")) and not (dst / "config.json").exists()
    assert len(json.loads((dst / MANIFEST_NAME).read_text())["files"]) == 1
    r = C.cast_fp8_to_bf16(tiny_fp8, dst, device="cpu")
    assert len(r.kept) == 1 and file_digests(dst) == file_digests(bf16_out)


def test_other_runs_output_is_refused(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    dst = copy_ckpt(bf16_out, tmp_path / "o")
    with pytest.raises(OutputError):
        C.cast_fp8_to_bf16(tiny_fp8, dst, device="cpu", mtp="drop")  # a different job
    assert file_digests(dst) == file_digests(bf16_out)


# ---------------------------------------------------------------------- CLI
def test_cli_casts_and_reports_json(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    dst, back = tmp_path / "cli-bf16", tmp_path / "cli-fp8"
    base = [sys.executable, "-m", "dsv3_tools", "cast"]
    r = subprocess.run(
        base + ["fp8-bf16", str(tiny_fp8), str(dst), "--dry-run", "--json"], capture_output=True, text=True
    )
    assert r.returncode == 0 and json.loads(r.stdout)["dry_run"] is True and not dst.exists(), r.stderr
    r = subprocess.run(base + ["fp8-bf16", str(tiny_fp8), str(dst), "--device", "cpu", "--workers", "1", "--json"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tensors_cast"] > 0 and file_digests(dst) == file_digests(bf16_out)
    r = subprocess.run(base + ["bf16-fp8", str(dst), str(back), "--scale-fmt", "ue8m0", "--ignore", "*.o_proj.weight"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = tensors_of(back)
    assert out["model.layers.0.self_attn.o_proj.weight"][1].dtype == torch.bfloat16
    assert out["model.layers.0.self_attn.q_b_proj.weight"][1].dtype == torch.float8_e4m3fn
    qc = json.loads((back / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0"
    cfg = ModelConfig.load(back)
    o_proj = [n.removesuffix(".weight") for n in N.quantizable_weights(cfg) if n.endswith(".o_proj.weight")]
    assert qc["modules_to_not_convert"] == sorted(o_proj)
    open_checkpoint(back, strict=True)  # the BF16 o_proj weights are expected, by modules_to_not_convert


def test_single_file_checkpoint(tmp_path: Path) -> None:
    from dsv3_tools.synth import synth

    src = tmp_path / "single"
    synth(src, "tiny", dtype="fp8", seed=3, shards=1, mtp=0)
    C.cast_fp8_to_bf16(src, tmp_path / "out", device="cpu")
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names == ["model.safetensors"] and not (tmp_path / "out" / INDEX_NAME).exists()
    cfg = ModelConfig.load(src)
    ins, outs = tensors_of(src), tensors_of(tmp_path / "out")
    for name, (_, v) in ins.items():
        if v.dtype == torch.float8_e4m3fn:
            want = plain_dequant(v, ins[N.scale_name(name)][1], cfg.block_size)
            assert torch.equal(outs[name][1].view(torch.int16), want.view(torch.int16)), name
    open_checkpoint(tmp_path / "out", strict=True)


# ---------------------------------------------------------------------- exact round trips (the original kept)
DATA = lambda folder: sorted(p.name for p in folder.glob("*.safetensors"))  # noqa: E731


@pytest.mark.parametrize("fmt", [None, "v3.1"])
def test_round_trip_gives_back_the_original_bytes(fmt: str | None, tmp_path: Path) -> None:
    """fp8 -> bf16 -> fp8 with nothing changed in between: every data file comes back byte for byte (weights,
    scales, a scale stored in another file than its weight, the headers), for f32 scales and for V3.1's (powers of
    two except o_proj's)."""
    from dsv3_tools.synth import synth

    src, bf16, again = tmp_path / "fp8", tmp_path / "bf16", tmp_path / "again"
    synth(src, "tiny", dtype="fp8", seed=7, shards=4, scale_fmt=fmt)
    C.cast_fp8_to_bf16(src, bf16, device="cpu")
    assert (bf16 / "dsv3-fp8-origin.st").is_file()
    assert "dsv3-fp8-origin.st" not in json.loads((bf16 / INDEX_NAME).read_text())["weight_map"].values()
    C.cast_bf16_to_fp8(bf16, again)
    assert DATA(again) == DATA(src) and not (again / "dsv3-fp8-origin.st").exists()
    for f in DATA(src):
        assert (again / f).read_bytes() == (src / f).read_bytes(), f
    assert json.loads((again / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert json.loads((again / INDEX_NAME).read_text()) == json.loads((src / INDEX_NAME).read_text())


def test_round_trip_keeps_each_tensors_scale_kind_without_the_origin(tmp_path: Path) -> None:
    """With the original scales gone (the origin file deleted), fresh scales follow each tensor's original kind,
    which the manifest records per tensor: V3.1's o_proj keeps non-power-of-two scales, every other weight
    power-of-two ones; BF16 values of the others come back exactly, o_proj's within quantization error."""
    from dsv3_tools.synth import synth

    src, b1, f2, b2 = tmp_path / "fp8", tmp_path / "b1", tmp_path / "f2", tmp_path / "b2"
    synth(src, "tiny", dtype="fp8", seed=5, shards=2, scale_fmt="v3.1")
    C.cast_fp8_to_bf16(src, b1, device="cpu")
    kinds = json.loads((b1 / MANIFEST_NAME).read_text())["extra"]["scale_kinds"]
    o_proj = sorted(n for n, _ in tensors_of(src).items() if n.endswith("self_attn.o_proj.weight"))
    assert kinds == {"default": "ue8m0", "other": o_proj}
    (b1 / "dsv3-fp8-origin.st").unlink()
    C.cast_bf16_to_fp8(b1, f2)
    for name, (_, s) in tensors_of(f2).items():
        if name.endswith("_scale_inv"):
            pow2 = bool((torch.frexp(s)[0] == 0.5).all())
            assert pow2 != name.startswith(tuple(o_proj)), f"{name}: powers of two: {pow2}"
    C.cast_fp8_to_bf16(f2, b2, device="cpu")
    first, second = tensors_of(b1), tensors_of(b2)
    for name, (_, v) in first.items():
        if name in o_proj:
            err = ((second[name][1].float() - v.float()).abs().max() / v.float().abs().max()).item()
            assert err < 2**-4, f"{name}: {err}"
        else:
            assert same_bytes(second[name][1], v), f"{name}: {first_diff(second[name][1], v)}"


def test_changed_blocks_get_fresh_scales_unchanged_ones_stay(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    """Fine-tune one block of one weight: that block is re-quantized (a fresh scale, as weight_quant_ref gives it);
    every other block of that weight, and every other tensor, is the original's bytes."""
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    bf16 = tmp_path / "tuned"
    shutil.copytree(bf16_out, bf16)
    name = "model.layers.1.self_attn.o_proj.weight"  # 320 x 512: a 3 x 4 grid of 128-blocks
    f = bf16 / json.loads((bf16 / INDEX_NAME).read_text())["weight_map"][name]
    t = load_file(f)
    t[name][128:256, 256:384] = (t[name][128:256, 256:384].float() * 1.5 + 1e-3).to(torch.bfloat16)
    save_file(t, f, metadata={"format": "pt"})
    again = tmp_path / "again"
    C.cast_bf16_to_fp8(bf16, again)
    orig, got = tensors_of(tiny_fp8), tensors_of(again)
    sname = name + "_scale_inv"
    for n, (_, v) in orig.items():
        if n not in (name, sname):
            assert same_bytes(got[n][1], v), n
    q, s = got[name][1], got[sname][1]
    q0, s0 = orig[name][1], orig[sname][1]
    changed = torch.zeros_like(s0, dtype=torch.bool)
    changed[1, 2] = True
    assert torch.equal(s[~changed], s0[~changed]) and s[1, 2] != s0[1, 2]
    fresh_q, fresh_s = weight_quant_ref(t[name][128:256, 256:384], (128, 128))
    assert s[1, 2] == fresh_s[0, 0] and same_bytes(q[128:256, 256:384], fresh_q)
    keep = torch.ones_like(q0, dtype=torch.bool)
    keep[128:256, 256:384] = False
    assert torch.equal(q.view(torch.uint8)[keep], q0.view(torch.uint8)[keep])


def test_round_trip_verifies_exact(tiny_fp8: Path, bf16_out: Path, tmp_path: Path) -> None:
    """The README's promise, as verify sees it: the FP8 checkpoint made back from the BF16 cast is rated exact."""
    from dsv3_tools.verify import verify_checkpoint

    ref = tmp_path / "ref.safetensors"
    verify_checkpoint(tiny_fp8, save_reference=ref)
    C.cast_bf16_to_fp8(bf16_out, tmp_path / "again")
    r = verify_checkpoint(tmp_path / "again", reference=ref)
    assert r.verdict == "pass" and r.tier == "exact" and r.overall.identical, (r.tier, r.tier_reasons, r.failures)
