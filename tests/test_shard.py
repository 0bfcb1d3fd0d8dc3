"""``shard``: the model-parallel layout, checked against an independent reading of the upstream rules.

Outputs are read with the ``safetensors`` library (not our reader); names and split dims come from the
test's own rename rules (the upstream convert script's, as FORMAT.md section 2 states them), not from names.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dsv3_tools import names as N
from dsv3_tools import output as O
from dsv3_tools import shard as S
from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.config import ModelConfig
from dsv3_tools.errors import OutputError, ShardingError

# FORMAT.md section 2: HF module -> internal name, split dim (None: replicated). Experts are handled apart.
RENAMES = {
    "embed_tokens": ("embed", 0),
    "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0),
    "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None),
    "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1),
    "gate": ("gate", None),
    "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1),
    "up_proj": ("w3", 0),
    "norm": ("norm", None),
    "lm_head": ("head", 0),
    # The MTP module's own parts (kept under --mtp keep): its head is vocab-parallel like lm_head.
    "head": ("head", 0),
    "enorm": ("enorm", None),
    "hnorm": ("hnorm", None),
    "eh_proj": ("eh_proj", None),
}


def ref_mp(hf: str) -> tuple[str, int | str | None]:
    """(model-parallel name, split) of a HF name by the upstream string rules; split "expert" for routed experts."""
    name = hf.removeprefix("model.")
    for a, b in (
        ("self_attn", "attn"),
        ("mlp", "ffn"),
        ("weight_scale_inv", "scale"),
        ("e_score_correction_bias", "bias"),
    ):
        name = name.replace(a, b)
    parts = name.split(".")
    new, dim = RENAMES[parts[-2]]
    parts[-2] = new
    if ".experts." in hf:
        dim = "expert"
    return ".".join(parts), dim


def read_hf(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(folder / f), "pt") as fh:
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    return out


def read_rank(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def check_roundtrip(src: Path, dst: Path, world: int, mtp: bool) -> None:
    """Every input tensor is re-assembled bit for bit from the rank files; nothing else is in them."""
    hcfg = hf_config(src)
    n_layers, experts = hcfg["num_hidden_layers"], hcfg["n_routed_experts"]
    per = experts // world
    ranks = [read_rank(dst / f"model{r}-mp{world}.safetensors") for r in range(world)]
    # The MTP module, when kept, is in its own files beside the rank files (the demo loads rank files strictly).
    mtp_files = [dst / f"mtp{r}-mp{world}.safetensors" for r in range(world)]
    assert all(f.is_file() for f in mtp_files) == mtp and (mtp or not any(f.exists() for f in mtp_files))
    if mtp:
        for r, f in enumerate(mtp_files):
            extra = read_rank(f)
            assert all(k.startswith(f"layers.{hf_config(src)['num_hidden_layers']}.") for k in extra), sorted(extra)[:3]
            assert not set(extra) & set(ranks[r])
            ranks[r] |= extra
    seen: list[set[str]] = [set() for _ in range(world)]
    for hf, t in read_hf(src).items():
        mp, dim = ref_mp(hf)
        layer = int(hf.split(".")[2]) if hf.startswith("model.layers.") else None
        if layer is not None and layer >= n_layers and not mtp:
            assert all(mp not in rk for rk in ranks), f"{hf}: MTP tensor written under --mtp drop"
            continue
        if dim == "expert":
            e = int(hf.split(".")[5])
            holders = [r for r in range(world) if mp in ranks[r]]
            assert holders == [e // per], f"{hf}: expert {e} held by ranks {holders}, expected [{e // per}]"
            got = ranks[holders[0]][mp]
            seen[holders[0]].add(mp)
        elif dim is None:
            for r in range(world):
                assert torch.equal(raw(ranks[r][mp]), raw(t)), f"{hf}: replicated copy differs on rank {r}"
                seen[r].add(mp)
            got = ranks[0][mp]
        else:
            pieces = [ranks[r][mp] for r in range(world)]
            for r, p in enumerate(pieces):
                assert p.shape[dim] * world == t.shape[dim], f"{hf}: rank {r} piece {list(p.shape)} of {list(t.shape)}"
                seen[r].add(mp)
            got = torch.cat([raw(p) for p in pieces], dim).view(t.dtype)  # bytes of a row stay in order
        assert got.dtype == t.dtype and got.shape == t.shape, (
            f"{hf}: {got.dtype}{list(got.shape)} vs {t.dtype}{list(t.shape)}"
        )
        diff = (raw(got) != raw(t)).nonzero()
        assert diff.numel() == 0, f"{hf}: {diff.shape[0]} bytes differ, first at {diff[0].tolist()}"
    for r in range(world):
        extra = set(ranks[r]) - seen[r]
        assert not extra, f"rank {r}: unexpected keys {sorted(extra)[:5]}"


# ---------------------------------------------------------------------- degrees
def test_v3_valid_degrees() -> None:
    v3 = ModelConfig.builtin("deepseek-v3")
    # FP8: the dense 18432 dim is 144 blocks and the shared expert's 2048 is 16 blocks: gcd 16.
    assert S.valid_mp_degrees(v3, True) == [1, 2, 4, 8, 16]
    # BF16: no block constraint; heads (128) are the binding limit.
    assert S.valid_mp_degrees(v3, False) == [1, 2, 4, 8, 16, 32, 64, 128]
    tiny = ModelConfig.builtin("tiny")
    assert S.valid_mp_degrees(tiny, True) == [1, 2, 4]
    assert S.valid_mp_degrees(tiny, False) == [1, 2, 4, 8]


@pytest.mark.parametrize("mp", [3, 8, 0])
def test_invalid_mp_fp8_refused(tiny_fp8: Path, tmp_path: Path, mp: int) -> None:
    dst = tmp_path / "out"
    with pytest.raises(ShardingError) as e:
        S.shard_checkpoint(tiny_fp8, dst, mp=mp, mtp="drop")
    msg = str(e.value)
    if mp == 3:
        assert "'model.embed_tokens.weight'" in msg and "not divisible by 3" in msg
    if mp == 8:
        # 8 divides every dim, but the 512-wide splits would give 64-wide pieces: off the 128 FP8 blocks.
        assert "FP8 block" in msg and "pieces of 64" in msg
    if mp:
        assert msg.endswith("degrees that work: 1, 2, 4"), msg
    assert not dst.exists()


def test_invalid_mp_bf16_lists_degrees(tiny_bf16: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardingError, match=r"not divisible by 16; degrees that work: 1, 2, 4, 8$"):
        S.shard_checkpoint(tiny_bf16, tmp_path / "out", mp=16, mtp="drop")


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize(
    "which,mp,mtp",
    [("fp8", 1, "drop"), ("fp8", 2, "drop"), ("fp8", 4, "drop"), ("bf16", 1, "drop"), ("bf16", 2, "drop"),
     ("bf16", 4, "drop"), ("fp8", 2, "keep"), ("bf16", 4, "keep")],
)  # fmt: skip
def test_roundtrip(request: pytest.FixtureRequest, tmp_path: Path, which: str, mp: int, mtp: str) -> None:
    src = request.getfixturevalue(f"tiny_{which}")
    dst = tmp_path / "out"
    r = S.shard_checkpoint(src, dst, mp=mp, mtp=mtp)
    check_roundtrip(src, dst, mp, mtp == "keep")

    cfg = ModelConfig.load(src)
    for rank in range(mp):
        expected = N.expected_mp_tensors(cfg, rank, mp, mtp=mtp == "keep")
        got = read_rank(dst / f"model{rank}-mp{mp}.safetensors")
        if mtp == "keep":
            got |= read_rank(dst / f"mtp{rank}-mp{mp}.safetensors")
        assert set(got) == set(expected), f"rank {rank}: {sorted(set(got) ^ set(expected))[:6]}"
        for k, spec in expected.items():
            assert tuple(got[k].shape) == spec.shape, f"rank {rank} {k}: {list(got[k].shape)} vs {list(spec.shape)}"
    # The reader re-assembles and validates the output against the original config.
    ck = open_checkpoint(dst)
    assert ck.layout == "mp" and ck.world == mp
    hf = read_hf(src)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight", "lm_head.weight"):
        assert torch.equal(raw(ck.read(name)), raw(hf[name])), name
    # config.json is the source's HF config (transformers reads it); the demo's ModelArgs have their own file
    cfg_out = json.loads((dst / "config.json").read_text())
    if mtp == "keep":
        assert (dst / "config.json").read_bytes() == (src / "config.json").read_bytes()
    else:
        assert cfg_out == hf_config(src) | {"num_nextn_predict_layers": 0}
    assert not (dst / "hf_config.json").exists() and "dim" in json.loads((dst / "model_args.json").read_text())
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / side).read_bytes() == (src / side).read_bytes(), side
    man = json.loads((dst / "dsv3-manifest.json").read_text())
    assert man["complete"] and f"model{mp - 1}-mp{mp}.safetensors" in man["files"] and "config.json" in man["files"]
    mtp_bytes = sum(
        t.numel() * t.element_size() for k, t in hf.items() if k.startswith(f"model.layers.{cfg.num_hidden_layers}.")
    )
    total = sum(t.numel() * t.element_size() for t in hf.values())
    assert r.bytes_read == (total if mtp == "keep" else total - mtp_bytes)


def test_model_args(tiny_fp8_ue8m0: Path, tiny_bf16: Path, tmp_path: Path) -> None:
    S.shard_checkpoint(tiny_fp8_ue8m0, tmp_path / "a", mp=2, mtp="drop")
    S.shard_checkpoint(tiny_bf16, tmp_path / "b", mp=2, mtp="drop")
    h = hf_config(tiny_fp8_ue8m0)
    a = json.loads((tmp_path / "a" / "model_args.json").read_text())
    rs = h["rope_scaling"]
    assert a == {
        "vocab_size": h["vocab_size"], "dim": h["hidden_size"], "inter_dim": h["intermediate_size"],
        "moe_inter_dim": h["moe_intermediate_size"], "n_layers": h["num_hidden_layers"],
        "n_dense_layers": h["first_k_dense_replace"], "n_heads": h["num_attention_heads"],
        "n_routed_experts": h["n_routed_experts"], "n_shared_experts": h["n_shared_experts"],
        "n_activated_experts": h["num_experts_per_tok"], "n_expert_groups": h["n_group"],
        "n_limited_groups": h["topk_group"], "route_scale": h["routed_scaling_factor"],
        "score_func": h["scoring_func"], "q_lora_rank": h["q_lora_rank"], "kv_lora_rank": h["kv_lora_rank"],
        "qk_nope_head_dim": h["qk_nope_head_dim"], "qk_rope_head_dim": h["qk_rope_head_dim"],
        "v_head_dim": h["v_head_dim"], "dtype": "fp8", "scale_fmt": "ue8m0", "max_seq_len": 16384,
        "original_seq_len": rs["original_max_position_embeddings"], "rope_theta": h["rope_theta"],
        "rope_factor": rs["factor"], "beta_fast": rs["beta_fast"], "beta_slow": rs["beta_slow"],
        "mscale": rs["mscale_all_dim"],
    }  # fmt: skip
    b = json.loads((tmp_path / "b" / "model_args.json").read_text())
    assert "dtype" not in b and "scale_fmt" not in b and b["dim"] == h["hidden_size"]


def test_small_chunks_same_bytes(tiny_fp8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunked streaming (many chunks per tensor, split-1 gathers across chunks) gives the same files; reads stay small."""
    S.shard_checkpoint(tiny_fp8, tmp_path / "ref", mp=4, mtp="drop")
    from dsv3_tools.checkpoint import Checkpoint

    biggest = [0]
    orig = Checkpoint.read_bytes

    def spy(self, info, start=0, stop=None, out=None):
        biggest[0] = max(biggest[0], (info.nbytes if stop is None else stop) - start)
        return orig(self, info, start, stop, out)

    monkeypatch.setattr(Checkpoint, "read_bytes", spy)
    monkeypatch.setattr(S, "CHUNK", 4096)
    S.shard_checkpoint(tiny_fp8, tmp_path / "small", mp=4, mtp="drop")
    assert 0 < biggest[0] <= 4096
    for r in range(4):
        f = f"model{r}-mp4.safetensors"
        assert (tmp_path / "ref" / f).read_bytes() == (tmp_path / "small" / f).read_bytes(), f


# ---------------------------------------------------------------------- dry run, disk, refusal
def test_dry_run_and_disk_check(tiny_fp8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "out"
    plan = S.shard_checkpoint(tiny_fp8, dst, mp=2, dry_run=True, mtp="drop")
    assert not dst.exists()
    assert plan.fits and plan.valid_mp == [1, 2, 4] and [f.status for f in plan.files] == ["planned"] * 2
    real = S.shard_checkpoint(tiny_fp8, tmp_path / "real", mp=2, mtp="drop")
    assert [f.bytes for f in plan.files] == [(tmp_path / "real" / f.name).stat().st_size for f in real.files]
    assert plan.bytes_read == real.bytes_read and plan.bytes_written == real.bytes_written

    monkeypatch.setattr(O, "free_bytes", lambda p: 1000)
    assert not S.shard_checkpoint(tiny_fp8, dst, mp=2, dry_run=True, mtp="drop").fits
    with pytest.raises(OutputError, match="free space"):
        S.shard_checkpoint(tiny_fp8, dst, mp=2, mtp="drop")
    assert not dst.exists()


def test_cli_dry_run_json(tiny_fp8: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsv3_tools.cli import app

    res = CliRunner().invoke(
        app, ["shard", str(tiny_fp8), str(tmp_path / "o"), "--mp", "4", "--mtp", "drop", "--dry-run", "--json"]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["mp"] == 4 and len(d["files"]) == 4 and d["dry_run"] and not (tmp_path / "o").exists()


def test_refuses_other_job_and_source_as_dest(tiny_fp8: Path, tmp_path: Path) -> None:
    S.shard_checkpoint(tiny_fp8, tmp_path / "out", mp=2, mtp="drop")
    with pytest.raises(OutputError, match="different run"):
        S.shard_checkpoint(tiny_fp8, tmp_path / "out", mp=4, mtp="drop")
    with pytest.raises(OutputError, match="outside the input folder"):
        S.shard_checkpoint(tiny_fp8, tiny_fp8, mp=2, mtp="drop")
    r = S.shard_checkpoint(tiny_fp8, tmp_path / "out", mp=2, mtp="drop")  # same job again: everything kept
    assert [f.status for f in r.files] == ["kept", "kept"] and r.bytes_written == 0


# ---------------------------------------------------------------------- interruption
def _same_outputs(a: Path, b: Path) -> None:
    names_a = sorted(p.name for p in a.iterdir())
    assert names_a == sorted(p.name for p in b.iterdir())
    for n in names_a:
        if n == "dsv3-manifest.json":
            ma, mb = (json.loads((d / n).read_text()) for d in (a, b))
            assert ma["files"] == mb["files"] and ma["complete"] and mb["complete"]
        else:
            assert (a / n).read_bytes() == (b / n).read_bytes(), n


KILLER = """
import os, signal, sys
from dsv3_tools import shard, writer
src, dst, mode = sys.argv[1:4]
seen = [0]
def progress(n):
    seen[0] += n
    if mode == "data" and seen[0] > 3_000_000:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "rank":
    orig = writer.Manifest.record
    def record(self, rec, **info):
        orig(self, rec, **info)
        if rec.name.startswith("model"):
            os.kill(os.getpid(), signal.SIGKILL)
    writer.Manifest.record = record
shard.shard_checkpoint(src, dst, mp=2, progress=progress, mtp="drop")
"""


@pytest.mark.parametrize("mode", ["data", "rank"])
def test_resume_after_sigkill(tiny_fp8: Path, tmp_path: Path, mode: str) -> None:
    ref = tmp_path / "ref"
    S.shard_checkpoint(tiny_fp8, ref, mp=2, mtp="drop")
    dst = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILLER, str(tiny_fp8), str(dst), mode], capture_output=True, text=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    man = json.loads((dst / "dsv3-manifest.json").read_text())
    assert not man["complete"]
    if mode == "data":
        assert not (dst / "model0-mp2.safetensors").exists() and any(dst.glob(".*.partial"))
        kept_stat = None
    else:
        assert list(man["files"]) == ["model0-mp2.safetensors"]
        kept_stat = (dst / "model0-mp2.safetensors").stat()
    r = S.shard_checkpoint(tiny_fp8, dst, mp=2, mtp="drop")
    _same_outputs(ref, dst)
    assert not any(dst.glob(".*.partial"))
    if kept_stat is not None:
        st = (dst / "model0-mp2.safetensors").stat()
        assert (st.st_ino, st.st_mtime_ns) == (kept_stat.st_ino, kept_stat.st_mtime_ns)
        assert [f.status for f in r.files] == ["kept", "written"]


def test_ctrl_c_leaves_no_partials_and_resumes(tiny_bf16: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    S.shard_checkpoint(tiny_bf16, ref, mp=4, mtp="drop")
    dst = tmp_path / "out"
    seen = [0]

    def interrupt(n: int) -> None:
        seen[0] += n
        if seen[0] > 2_000_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        S.shard_checkpoint(tiny_bf16, dst, mp=4, progress=interrupt, mtp="drop")
    assert sorted(p.name for p in dst.iterdir()) == ["dsv3-manifest.json"]
    S.shard_checkpoint(tiny_bf16, dst, mp=4, mtp="drop")
    _same_outputs(ref, dst)


def test_inputs_untouched(tiny_fp8: Path, tmp_path: Path) -> None:
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tiny_fp8.iterdir()}
    S.shard_checkpoint(tiny_fp8, tmp_path / "o", mp=4, mtp="keep")
    assert before == {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in tiny_fp8.iterdir()}


def test_old_folder_names_are_still_read(tiny_fp8: Path, tmp_path: Path) -> None:
    """Folders written before config.json became the HF config (ModelArgs in config.json, HF config in
    hf_config.json) still open, validate and pass their structural checks."""
    from dsv3_tools.verify.structure import check_structure

    dst = tmp_path / "old"
    S.shard_checkpoint(tiny_fp8, dst, mp=2, mtp="drop")
    (dst / "config.json").rename(dst / "hf_config.json")
    (dst / "model_args.json").rename(dst / "config.json")
    ck = open_checkpoint(dst)
    assert ck.config is not None and ck.config.num_nextn_predict_layers == 0
    problems, _ = check_structure(ck)
    assert problems == [], problems
    args = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(args | {"dim": args["dim"] + 1}))  # the ModelArgs are still checked
    problems, _ = check_structure(open_checkpoint(dst))
    assert [(p["kind"], p["file"]) for p in problems] == [("config_args", "config.json")], problems
