"""Tensor parallel: MP-2 shards under ``torchrun --nproc-per-node 2`` (gloo, CPU) against one process on MP-1.

Run by pytest, this file launches itself under torchrun; each rank runs ``run_model`` on the MP-2 folder and
saves its logits and the files it opened. Every rank must return the full logits, read only its own rank file,
and agree with the single-process run to float32 rounding (the all-reduce sums in another order). The same group
then runs on the HF folder, each rank slicing the whole tensors: the same pieces, so the same logits, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

PROMPTS = [[5, 9, 200, 17, 3], list(range(60, 83)), [11]]


def make_mp(src: Path, dst: Path, world: int, mtp: str = "drop") -> None:
    """An MP-``world`` copy of ``src``: the shard stage when present, else a plain re-layout by the name table."""
    try:
        from dsv3_tools.shard import shard_checkpoint
    except ImportError:
        shard_checkpoint = None
    if shard_checkpoint is not None:
        shard_checkpoint(src, dst, mp=world, mtp=mtp)
        return
    from safetensors.torch import save_file

    from dsv3_tools import names as N
    from dsv3_tools.checkpoint import open_checkpoint

    ck = open_checkpoint(src)
    cfg = ck.config
    dst.mkdir(parents=True)
    for r in range(world):
        out = {}
        for name in ck.tensors:
            n = N.parse_hf(name)
            if n.layer is not None and cfg.is_mtp_layer(n.layer) and mtp == "drop":
                continue
            t = ck.read(name)
            if n.split == N.EXPERT:
                if n.expert not in N.local_experts(cfg, r, world):
                    continue
            elif isinstance(n.split, int):
                t = t.chunk(world, dim=n.split)[r]
            out[n.mp] = t.contiguous()
        save_file(out, str(dst / f"model{r}-mp{world}.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "hf_config.json")


def _worker(ckpt: str, hf: str, out: str, mtp: bool) -> None:
    import torch.distributed as dist

    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.model import run_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    ck = open_checkpoint(ckpt)
    hidden = {}
    res = run_model(ck, PROMPTS, mtp=mtp, on_layer=lambda L, h: hidden.setdefault(L, h))
    torch.save({"logits": res.logits, "mtp": res.mtp_logits, "hidden": hidden}, f"{out}/rank{rank}.pt")
    Path(f"{out}/rank{rank}.files.json").write_text(json.dumps(sorted(ck._fds)))
    # The same group on the HF folder: each rank slices its pieces out of the whole tensors.
    res = run_model(open_checkpoint(hf), PROMPTS)
    torch.save({"logits": res.logits}, f"{out}/hf-rank{rank}.pt")
    dist.destroy_process_group()


def _torchrun(ckpt: Path, hf: Path, out: Path, mtp: bool) -> None:
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           __file__, str(ckpt), str(hf), str(out), "1" if mtp else "0"]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_mp2_torchrun_matches_mp1(tiny_fp8: Path, tmp_path: Path) -> None:
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.model import run_model

    make_mp(tiny_fp8, tmp_path / "mp2", 2, mtp="keep")
    _torchrun(tmp_path / "mp2", tiny_fp8, tmp_path / "out", mtp=True)
    hidden1 = {}
    one = run_model(open_checkpoint(tiny_fp8), PROMPTS, mtp=True, on_layer=lambda L, h: hidden1.setdefault(L, h))
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2)]
    for r, got in enumerate(ranks):
        files = json.loads((tmp_path / "out" / f"rank{r}.files.json").read_text())
        # its own rank file, and its piece of the MTP module (kept beside the rank files)
        assert files == [f"model{r}-mp2.safetensors", f"mtp{r}-mp2.safetensors"], f"rank {r} opened {files}"
        for i, (a, b) in enumerate(zip(got["logits"], one.logits)):
            assert a.shape == b.shape
            assert _rel(a, b) < 1e-5, f"rank {r} prompt {i}: {_rel(a, b):.2e}"
        for i, (a, b) in enumerate(zip(got["mtp"], one.mtp_logits)):
            assert a.shape == b.shape and (not b.numel() or _rel(a, b) < 1e-5), f"rank {r} MTP prompt {i}"
        for L, hs in got["hidden"].items():
            for i, (a, b) in enumerate(zip(hs, hidden1[L])):
                assert _rel(a, b) < 1e-5, f"rank {r} layer {L} prompt {i}"
    for a, b in zip(ranks[0]["logits"], ranks[1]["logits"]):
        assert torch.equal(a, b)  # gathered: the same tensor on every rank
    for r in range(2):
        got = torch.load(tmp_path / "out" / f"hf-rank{r}.pt")
        for i, (a, b) in enumerate(zip(got["logits"], ranks[r]["logits"])):
            assert torch.equal(a, b), f"rank {r} prompt {i}: HF folder sliced vs MP-2 shards"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1")
