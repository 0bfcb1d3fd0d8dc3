"""shard on DeepSeek-V4, against the official converter's rules restated here (inference/convert.py as
docs/format-v4.md 5 states them, not dsv3_tools' name table): outputs read by safetensors' own reader, every tensor
re-assembled bit for bit, wo_a the BF16 of its FP8 blocks (decoded by tests/v4_ref.py), FP4 experts as F4; the
degrees of V4-Flash and -Pro; ModelArgs equal to the official V4-Flash file; the key set of each rank file checked by
verify. With ``DSV4_UPSTREAM_DIR`` (a copy of V4's ``inference/``), each rank file loads *strictly* into the official
``Transformer`` built from the ``model_args.json`` shard wrote."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from v4_ref import bits_equal, fp8_values, read_folder

from dsv3_tools import shard as S
from dsv3_tools.errors import ShardingError
from dsv3_tools.family import load_config
from dsv3_tools.inspect import inspect_checkpoint
from dsv3_tools.v4 import names as V
from dsv3_tools.v4.modelargs import demo_model_args
from dsv3_tools.v4.shard import valid_mp_degrees
from dsv3_tools.verify import verify_checkpoint

# convert.py's mapping of the V4 keys (72-78): key -> split dim
SPLIT = {"embed": 0, "head": 0, "wq_b": 0, "wo_a": 0, "wo_b": 1, "attn_sink": 0, "weights_proj": 0}


def official_rule(name: str) -> int | str | None:
    """convert.py's key rule (111-125): routed experts whole; else the split dim of the name's key, if any."""
    if "experts" in name and "shared_experts" not in name:
        return "expert"
    key = name.split(".")[-1] if any(x in name for x in ("hc", "attn_sink", "tie2eid", "ape")) else name.split(".")[-2]
    return SPLIT.get(key)


def check_roundtrip(src: Path, dst: Path, world: int, mtp: bool = True) -> None:
    cfg = json.loads((src / "config.json").read_text())
    per = cfg["n_routed_experts"] // world
    ranks = [load_file(dst / f"model{r}-mp{world}.safetensors") for r in range(world)]
    seen: list[set[str]] = [set() for _ in range(world)]
    hf = read_folder(src)
    for name, t in hf.items():
        if name.startswith("mtp.") and not mtp:
            assert all(name not in rk for rk in ranks), name
            continue
        if name.endswith("wo_a.scale") and t.dtype != torch.bfloat16:
            assert all(name not in rk for rk in ranks), f"{name}: dropped with wo_a's dequantization"
            continue
        rule = official_rule(name)
        if rule == "expert":
            e = int(name.split(".")[-3])
            holders = [r for r in range(world) if name in ranks[r]]
            assert holders == [e // per], (name, holders)
            got = ranks[holders[0]][name]
            seen[holders[0]].add(name)
            if t.dtype == torch.int8:  # FP4: the same bytes as float4_e2m1fn_x2 (safetensors dtype F4)
                assert got.dtype == torch.float4_e2m1fn_x2 and torch.equal(got.view(torch.int8), t), name
                continue
        elif rule is None:
            for r in range(world):
                assert bits_equal(ranks[r][name], t), f"{name}: replicated copy differs on rank {r}"
                seen[r].add(name)
            got = ranks[0][name]
        else:
            pieces = [ranks[r][name] for r in range(world)]
            for r in range(world):
                seen[r].add(name)
            got = torch.cat([p.contiguous().view(torch.uint8) for p in pieces], rule).view(pieces[0].dtype)
        if name.endswith("wo_a.weight") and t.dtype == torch.float8_e4m3fn:
            s = hf[name.removesuffix(".weight") + ".scale"]
            assert bits_equal(got, fp8_values(t, s).float().to(torch.bfloat16)), name
            continue
        assert bits_equal(got, t), name
    for r in range(world):
        assert set(ranks[r]) == seen[r], f"rank {r}: unexpected {sorted(set(ranks[r]) - seen[r])[:4]}"


@pytest.fixture(scope="module")
def mp2(tiny_v4: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("v4shard") / "mp2"
    S.shard_checkpoint(tiny_v4, dst, mp=2)
    return dst


def test_roundtrip_release(tiny_v4: Path, mp2: Path, tmp_path: Path) -> None:
    check_roundtrip(tiny_v4, mp2, 2)
    S.shard_checkpoint(tiny_v4, tmp_path / "mp4", mp=4, mtp="drop")
    check_roundtrip(tiny_v4, tmp_path / "mp4", 4, mtp=False)
    assert json.loads((tmp_path / "mp4" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert json.loads((tmp_path / "mp4" / "model_args.json").read_text())["n_mtp_layers"] == 0


def test_roundtrip_base_and_bf16(tiny_v4_base: Path, tiny_v4: Path, tmp_path: Path) -> None:
    S.shard_checkpoint(tiny_v4_base, tmp_path / "base", mp=2)
    check_roundtrip(tiny_v4_base, tmp_path / "base", 2)
    args = json.loads((tmp_path / "base" / "model_args.json").read_text())
    assert args["scale_dtype"] == "fp32" and "expert_dtype" not in args
    from dsv3_tools.cast import cast_fp8_to_bf16

    cast_fp8_to_bf16(tiny_v4, tmp_path / "bf16", device="cpu")
    S.shard_checkpoint(tmp_path / "bf16", tmp_path / "bmp", mp=1)
    check_roundtrip(tmp_path / "bf16", tmp_path / "bmp", 1)
    assert json.loads((tmp_path / "bmp" / "model_args.json").read_text())["dtype"] == "bf16"


def test_folder_is_complete_and_verified(tiny_v4: Path, mp2: Path) -> None:
    assert (mp2 / "config.json").read_bytes() == (tiny_v4 / "config.json").read_bytes()
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (mp2 / side).read_bytes() == (tiny_v4 / side).read_bytes(), side
    args = json.loads((mp2 / "model_args.json").read_text())
    assert args["expert_dtype"] == "fp4" and args["o_groups"] == 4 and args["compress_ratios"] == [0, 4, 128, 4, 0]
    r = inspect_checkpoint(mp2)
    assert r.ok and r.layout == "mp" and r.world == 2 and r.dtypes["F4"] == 5 * 8 * 3, r.problems
    v = verify_checkpoint(mp2, checksums=True)
    assert v.verdict == "pass" and v.checksums["mismatches"] == 0, v.problems


def test_the_key_set_of_each_rank_file_is_checked(mp2: Path, tmp_path: Path) -> None:
    """The demo loads rank files with strict=False, silently leaving a missing key uninitialized: verify must not."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(mp2, bad)
    f = bad / "model1-mp2.safetensors"
    ts = load_file(f)
    del ts["layers.2.attn.compressor.wgate.weight"]
    ts["layers.0.attn.wo_a.scale"] = torch.ones(1, 1)  # what convert.py drops
    save_file(ts, f, metadata={"format": "pt"})
    v = verify_checkpoint(bad)
    named = {(p["tensor"], p["kind"]) for p in v.problems}
    assert ("layers.2.attn.compressor.wgate.weight", "missing_tensor") in named, v.problems
    assert any(t == "layers.0.attn.wo_a.scale" for t, _ in named) and v.verdict == "fail"


def test_degrees() -> None:
    fmt = V.Format()
    assert valid_mp_degrees(load_config("deepseek-v4-flash").with_layers(3), fmt) == [1, 2, 4, 8]
    assert valid_mp_degrees(load_config("deepseek-v4-pro").with_layers(3), fmt) == [1, 2, 4, 8, 16]


@pytest.mark.parametrize("mp,why", [(8, "o_groups"), (3, "not divisible by 3"), (16, "attn_sink': dim 0 of size 8")])
def test_invalid_degree_refused_before_writing(tiny_v4: Path, tmp_path: Path, mp: int, why: str) -> None:
    with pytest.raises(ShardingError) as e:
        S.shard_checkpoint(tiny_v4, tmp_path / "o", mp=mp)
    assert why in str(e.value) and str(e.value).endswith("degrees that work: 1, 2, 4")
    assert not (tmp_path / "o").exists()


def test_model_args_are_the_official_file() -> None:
    """For V4-Flash in its released format: the official inference/config.json, keys in its order (tests/data)."""
    want = (Path(__file__).parent / "data" / "deepseek-v4-flash.inference-config.json").read_text()
    got = demo_model_args(load_config("deepseek-v4-flash"), V.Format())
    assert json.dumps(got) == json.dumps(json.loads(want))


def test_small_chunks_same_bytes(tiny_v4: Path, mp2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks per tensor (wo_a dequantized 128 rows at a time, split-1 gathers across chunks): same files."""
    monkeypatch.setattr(S, "CHUNK", 4096)
    S.shard_checkpoint(tiny_v4, tmp_path / "small", mp=2)
    for r in range(2):
        f = f"model{r}-mp2.safetensors"
        assert (tmp_path / "small" / f).read_bytes() == (mp2 / f).read_bytes(), f


def test_dry_run_sizes(tiny_v4: Path, mp2: Path, tmp_path: Path) -> None:
    plan = S.shard_checkpoint(tiny_v4, tmp_path / "o", mp=2, dry_run=True)
    assert not (tmp_path / "o").exists() and plan.valid_mp == [1, 2, 4]
    assert [f.bytes for f in plan.files] == [(mp2 / f.name).stat().st_size for f in plan.files]


# ---------------------------------------------------------------------- the official demo (optional)
def _official_model(monkeypatch: pytest.MonkeyPatch):
    """The official V4 model.py, imported from ``DSV4_UPSTREAM_DIR`` with a stand-in for its ``kernel`` module
    (TileLang GPU kernels; building and loading the model calls none of them)."""
    root = os.environ.get("DSV4_UPSTREAM_DIR")
    if not root:
        pytest.skip("DSV4_UPSTREAM_DIR is not set (a copy of DeepSeek-V4's inference/ folder)")
    kernel = types.ModuleType("kernel")
    for f in ("act_quant", "fp4_act_quant", "fp8_gemm", "fp4_gemm", "sparse_attn", "hc_split_sinkhorn"):
        setattr(kernel, f, None)
    monkeypatch.setitem(sys.modules, "kernel", kernel)
    spec = importlib.util.spec_from_file_location("dsv4_upstream_model", Path(root) / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "which,mp", [("tiny_v4", 1), ("tiny_v4", 2), ("tiny_v4", 4), ("tiny_v4_base", 2), ("fp4-fp8", 2)]
)
def test_rank_files_load_strictly_into_the_official_transformer(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str, mp: int
) -> None:
    """Release (FP4 experts), -Base (FP8 experts, F32 scales) and ``cast fp4-fp8`` output (FP8 experts, E8M0: what the
    official converter's --expert-dtype fp8 writes); its ModelArgs say the experts' format."""
    from safetensors.torch import load_model

    model = _official_model(monkeypatch)
    src = request.getfixturevalue("tiny_v4" if which == "fp4-fp8" else which)
    if which == "fp4-fp8":
        from dsv3_tools.cast import plan_fp4_to_fp8, run_cast

        run_cast(plan_fp4_to_fp8(src, tmp_path / "fp8"))
        src = tmp_path / "fp8"
    dst = tmp_path / "o"
    S.shard_checkpoint(src, dst, mp=mp)
    args = json.loads((dst / "model_args.json").read_text())
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as the demo's generate.py builds it
    try:
        for rank in range(mp):
            # the demo reads its world size and rank from torch.distributed when it builds the model
            model.dist = types.SimpleNamespace(
                is_initialized=lambda: mp > 1, get_world_size=lambda: mp, get_rank=lambda r=rank: r
            )
            m = model.Transformer(model.ModelArgs(**args, max_batch_size=1, max_seq_len=256))
            load_model(m, str(dst / f"model{rank}-mp{mp}.safetensors"), strict=True)
            experts = [e for e in m.layers[0].ffn.experts if e is not None]
            assert len(experts) == 8 // mp
    finally:
        torch.set_default_dtype(old)
