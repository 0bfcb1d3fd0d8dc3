"""The reader and inspect on a checkpoint written by an independent generator (safetensors' own writer and
names typed in from FORMAT.md, not by `synth`), and each planted defect reported by name with the right exit code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.errors import (
    MissingFileError,
    MissingScaleError,
    OrphanScaleError,
    ScaleShapeError,
    TruncatedFileError,
    UnsafePathError,
)

H, V, Q, KV, ROPE, NOPE, VH, HEADS, INTER, MOE, E = 200, 96, 136, 96, 32, 32, 32, 2, 256, 72, 4

CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": V,
    "hidden_size": H,
    "intermediate_size": INTER,
    "moe_intermediate_size": MOE,
    "num_hidden_layers": 2,
    "num_nextn_predict_layers": 1,
    "first_k_dense_replace": 1,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "n_routed_experts": E,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "q_lora_rank": Q,
    "kv_lora_rank": KV,
    "qk_nope_head_dim": NOPE,
    "qk_rope_head_dim": ROPE,
    "v_head_dim": VH,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "max_position_embeddings": 4096,
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    },
    "torch_dtype": "bfloat16",
}


def _fp8(rows: int, cols: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    w = (torch.randn(rows, cols, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand((rows + 127) // 128, (cols + 127) // 128, generator=g) / 100
    return {"weight": w, "weight_scale_inv": s}


def _bf16(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


def write_independent_checkpoint(root: Path) -> Path:
    """Three files; one weight's scale in a different file from the weight; index with total_size."""
    g = torch.Generator().manual_seed(7)
    t: dict[str, torch.Tensor] = {"model.embed_tokens.weight": _bf16(V, H, g=g)}
    for layer in range(3):
        p = f"model.layers.{layer}."
        lin = {
            "self_attn.q_a_proj": (Q, H),
            "self_attn.q_b_proj": (HEADS * (NOPE + ROPE), Q),
            "self_attn.kv_a_proj_with_mqa": (KV + ROPE, H),
            "self_attn.kv_b_proj": (HEADS * (NOPE + VH), KV),
            "self_attn.o_proj": (H, HEADS * VH),
        }
        if layer == 0:
            lin |= {"mlp.gate_proj": (INTER, H), "mlp.up_proj": (INTER, H), "mlp.down_proj": (H, INTER)}
        else:
            for e in range(E):
                lin |= {
                    f"mlp.experts.{e}.gate_proj": (MOE, H),
                    f"mlp.experts.{e}.up_proj": (MOE, H),
                    f"mlp.experts.{e}.down_proj": (H, MOE),
                }
            lin |= {
                "mlp.shared_experts.gate_proj": (MOE, H),
                "mlp.shared_experts.up_proj": (MOE, H),
                "mlp.shared_experts.down_proj": (H, MOE),
            }
            t[p + "mlp.gate.weight"] = _bf16(E, H, g=g)
            t[p + "mlp.gate.e_score_correction_bias"] = torch.randn(E, generator=g)
        for mod, (r, c) in lin.items():
            for leaf, v in _fp8(r, c, g).items():
                t[f"{p}{mod}.{leaf}"] = v
        for norm, n in (
            ("input_layernorm", H),
            ("post_attention_layernorm", H),
            ("self_attn.q_a_layernorm", Q),
            ("self_attn.kv_a_layernorm", KV),
        ):
            t[f"{p}{norm}.weight"] = _bf16(n, g=g)
        if layer == 2:  # the MTP layer
            t[p + "embed_tokens.weight"] = _bf16(V, H, g=g)
            t[p + "enorm.weight"] = _bf16(H, g=g)
            t[p + "hnorm.weight"] = _bf16(H, g=g)
            t[p + "eh_proj.weight"] = _bf16(H, 2 * H, g=g)
            t[p + "shared_head.norm.weight"] = _bf16(H, g=g)
            t[p + "shared_head.head.weight"] = _bf16(V, H, g=g)
    t["model.norm.weight"] = _bf16(H, g=g)
    t["lm_head.weight"] = _bf16(V, H, g=g)

    names = sorted(t)
    files = {f"model-0000{i + 1}-of-000003.safetensors": names[i::3] for i in range(3)}
    # Put one FP8 weight and its scale in different files, as the real V3 files do.
    w = "model.layers.1.mlp.experts.3.gate_proj.weight"
    placed = {n: f for f, ns in files.items() for n in ns}
    if placed[w] == placed[w + "_scale_inv"]:
        src = placed[w + "_scale_inv"]
        dst = next(f for f in files if f != src)
        files[src].remove(w + "_scale_inv")
        files[dst].append(w + "_scale_inv")
    root.mkdir(parents=True)
    weight_map = {}
    for f, ns in files.items():
        save_file({n: t[n].contiguous() for n in ns}, str(root / f), metadata={"format": "pt"})
        weight_map |= {n: f for n in ns}
    total = sum(v.numel() * v.element_size() for v in t.values())
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (root / "config.json").write_text(json.dumps(CONFIG))
    return root


@pytest.fixture()
def indep(tmp_path: Path) -> Path:
    return write_independent_checkpoint(tmp_path / "indep")


def _inspect_cli(path: Path) -> tuple[int, dict]:
    r = subprocess.run(
        [sys.executable, "-m", "dsv3_tools", "inspect", str(path), "--json"], capture_output=True, text=True
    )
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else {})


def test_independent_checkpoint_reads_and_validates_clean(indep: Path) -> None:
    ck = open_checkpoint(indep)  # strict: raises on any problem
    assert ck.layout == "hf-sharded" and len(ck.files) == 3
    ref = {}
    for f in ck.files:
        ref |= load_file(str(indep / f))
    assert set(ck.tensors) == set(ref)
    for name, want in ref.items():
        got = ck.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
    # row slices read only the rows asked for and equal the full read's rows
    name = "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(ck.read_rows(name, 100, 180).view(torch.uint8), ref[name][100:180].view(torch.uint8))
    rc, rep = _inspect_cli(indep)
    assert rc == 0, rep
    assert rep["family"] == "DeepSeek-V3" and rep["layout"] == "hf-sharded" and rep["mtp_layers"] == [2]
    assert rep["dtypes"]["F8_E4M3"] == sum(1 for v in ref.values() if v.dtype == torch.float8_e4m3fn)
    mtp_params = sum(v.numel() for k, v in ref.items() if ".layers.2." in k and not k.endswith("_scale_inv"))
    assert rep["params_mtp"] == mtp_params


def _rewrite_without(root: Path, name: str, replace: torch.Tensor | None = None) -> None:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    f = index["weight_map"][name]
    d = load_file(str(root / f))
    if replace is None:
        del d[name]
        del index["weight_map"][name]
    else:
        d[name] = replace
    save_file(d, str(root / f), metadata={"format": "pt"})
    index["metadata"]["total_size"] = _sum_bytes(root, index)
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


def _sum_bytes(root: Path, index: dict) -> int:
    total = 0
    for f in set(index["weight_map"].values()):
        total += sum(v.numel() * v.element_size() for v in load_file(str(root / f)).values())
    return total


def _expect(root: Path, exc: type, needle: str) -> None:
    with pytest.raises(exc) as e:
        open_checkpoint(root)
    assert needle in str(e.value)
    rc, rep = _inspect_cli(root)
    assert rc == 1, rep
    assert any(needle in json.dumps(p) for p in rep["problems"]), rep["problems"]


def test_missing_scale(indep: Path) -> None:
    w = "model.layers.0.self_attn.o_proj.weight"
    _rewrite_without(indep, w + "_scale_inv")
    _expect(indep, MissingScaleError, w)


def test_orphan_scale(indep: Path) -> None:
    w = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite_without(indep, w)
    _expect(indep, OrphanScaleError, w + "_scale_inv")


def test_wrong_scale_shape(indep: Path) -> None:
    s = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"  # 128 rows of 576-like ragged: 1 x 2 grid
    _rewrite_without(indep, s, replace=torch.ones(2, 2))
    _expect(indep, ScaleShapeError, s)


def test_truncated_file(indep: Path) -> None:
    f = indep / "model-00002-of-000003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    _expect(indep, TruncatedFileError, "model-00002-of-000003.safetensors")


def test_index_entry_outside_folder(indep: Path, tmp_path: Path) -> None:
    index = json.loads((indep / "model.safetensors.index.json").read_text())
    shutil.copy(indep / "model-00001-of-000003.safetensors", tmp_path / "evil.safetensors")
    name = next(n for n, f in index["weight_map"].items() if f == "model-00001-of-000003.safetensors")
    index["weight_map"][name] = "../evil.safetensors"
    (indep / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(indep, UnsafePathError, "../evil.safetensors")
    index["weight_map"][name] = str(tmp_path / "evil.safetensors")
    (indep / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect(indep, UnsafePathError, "evil.safetensors")


def test_missing_shard(indep: Path) -> None:
    (indep / "model-00003-of-000003.safetensors").unlink()
    _expect(indep, MissingFileError, "model-00003-of-000003.safetensors")


def test_bad_input_exit_code_2(tmp_path: Path) -> None:
    rc, _ = _inspect_cli(tmp_path / "nope")
    assert rc == 2
    (tmp_path / "empty").mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "dsv3_tools", "inspect", str(tmp_path / "empty")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "no safetensors checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_usage_errors_are_one_line_and_version() -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dsv3_tools", *args], capture_output=True, text=True)

    for args, words in ((["inspect", "--bogus"], "No such option: --bogus"), (["inspect"], "Missing argument")):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and words in r.stderr and "dsv3-tools inspect --help" in r.stderr, r.stderr
    r = cli()  # no arguments: the help, and no traceback
    assert r.returncode == 2 and "Usage" in r.stdout and "Traceback" not in r.stderr, r.stderr
    from dsv3_tools import __version__

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dsv3-tools {__version__}"


def test_unexpected_and_mis_shaped_tensors(indep: Path) -> None:
    _rewrite_without(indep, "model.layers.0.input_layernorm.weight", replace=torch.ones(H + 1, dtype=torch.bfloat16))
    rc, rep = _inspect_cli(indep)
    assert rc == 1
    assert any(
        p["tensor"] == "model.layers.0.input_layernorm.weight" and p["kind"] == "tensor_spec" for p in rep["problems"]
    )


def test_fp8_config_with_bf16_content_is_reported(tiny_bf16: Path, tmp_path: Path) -> None:
    dst = tmp_path / "x"
    shutil.copytree(tiny_bf16, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = CONFIG["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    rc, rep = _inspect_cli(dst)
    assert rc == 1 and "no tensor is FP8" in json.dumps(rep["problems"])


def test_fp8_eh_proj_with_its_scale_is_accepted(indep: Path) -> None:
    """FORMAT.md leaves the MTP eh_proj dtype unconfirmed: an FP8 eh_proj with a scale must validate."""
    name = "model.layers.2.eh_proj.weight"
    index = json.loads((indep / "model.safetensors.index.json").read_text())
    f = index["weight_map"][name]
    d = load_file(str(indep / f))
    d |= {name: torch.zeros(H, 2 * H).to(torch.float8_e4m3fn), name + "_scale_inv": torch.ones(2, 4)}
    save_file(d, str(indep / f), metadata={"format": "pt"})
    index["weight_map"][name + "_scale_inv"] = f
    index["metadata"]["total_size"] = _sum_bytes(indep, index)
    (indep / "model.safetensors.index.json").write_text(json.dumps(index))
    open_checkpoint(indep)  # strict: no problem


def test_wrong_index_total_size_is_a_warning_not_a_refusal(tiny_fp8: Path, tmp_path: Path) -> None:
    """Metadata that changes no tensor is not a reason to refuse work: inspect and verify warn, cast and shard go on
    and cast writes the right value; a real problem in the same folder is still reported."""
    from dsv3_tools.cast import cast_fp8_to_bf16
    from dsv3_tools.errors import MissingScaleError
    from dsv3_tools.inspect import inspect_checkpoint
    from dsv3_tools.shard import shard_checkpoint
    from dsv3_tools.verify import verify_checkpoint

    src = tmp_path / "src"
    shutil.copytree(tiny_fp8, src)
    ipath = src / "model.safetensors.index.json"
    index = json.loads(ipath.read_text())
    right = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = right + 4096  # e.g. a tool that wrote file sizes
    ipath.write_text(json.dumps(index))
    rep = inspect_checkpoint(src)
    assert rep.ok and len(rep.warnings) == 1 and "total_size" in rep.warnings[0], (rep.problems, rep.warnings)
    v = verify_checkpoint(src)
    assert v.verdict == "pass" and any("total_size" in w for w in v.warnings), (v.failures, v.warnings)
    r = cast_fp8_to_bf16(src, tmp_path / "bf16", device="cpu")
    assert r.warnings and "total_size" in r.warnings[0]
    out_index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    data = sum(
        v.numel() * v.element_size()
        for f in set(out_index["weight_map"].values())
        for v in load_file(str(tmp_path / "bf16" / f)).values()
    )
    assert out_index["metadata"]["total_size"] == data
    assert shard_checkpoint(src, tmp_path / "mp2", mp=2).warnings
    # The real problem in the same folder is what cast reports.
    name = next(n for n in index["weight_map"] if n.endswith("_scale_inv"))
    _rewrite_without(src, name)
    index = json.loads(ipath.read_text())
    index["metadata"]["total_size"] += 4096
    ipath.write_text(json.dumps(index))
    with pytest.raises(MissingScaleError, match=name.removesuffix("_scale_inv")):
        cast_fp8_to_bf16(src, tmp_path / "bf16-b", device="cpu")
