"""``download`` on a DeepSeek-V4 repository (the tiny V4 checkpoint in the released layout: I8 experts, F8_E8M0
scales, I64 routing tables, the index listing every weight and its ``.scale``) served by the loopback Hub
(tests/hub_server.py): intact, it arrives byte for byte and inspects clean, and verify --checksums re-hashes it
against the Hub's sha256; a corrupt shard, a shard the index names but the repo lacks, are named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hub_server import HubServer, read_folder

from dsv3_tools import download as D
from dsv3_tools.inspect import inspect_checkpoint
from dsv3_tools.verify import verify_checkpoint

REPO = "deepseek-ai/tiny-v4"
BROKEN = "deepseek-ai/tiny-v4-missing-shard"
SHARD3 = "model-00003-of-00007.safetensors"


@pytest.fixture(scope="module")
def files(tiny_v4: Path) -> dict[str, bytes]:
    return read_folder(tiny_v4)


@pytest.fixture(scope="module")
def server(files: dict[str, bytes]):
    with HubServer() as hub:
        hub.add_repo(REPO, {"main": files})
        hub.add_repo(BROKEN, {"main": {k: v for k, v in files.items() if k != SHARD3}})
        yield hub


@pytest.fixture(autouse=True)
def _hf_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def fetch(hub: HubServer, tmp_path: Path, repo: str, **kw) -> D.DownloadReport:
    return D.download(repo, endpoint=hub.endpoint, cache_dir=tmp_path / "hf-home" / "hub", token=False, **kw)


def test_v4_repo_downloads_intact(server: HubServer, tmp_path: Path, files: dict[str, bytes]) -> None:
    server.state.corrupt.clear()
    out = tmp_path / "out"
    r = fetch(server, tmp_path, REPO, local_dir=out)
    assert r.ok, r.problems
    assert all((out / n).read_bytes() == b for n, b in files.items())
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "layers.1.ffn.experts.0.w1.scale" in index and "layers.0.attn.wo_a.scale" in index
    assert inspect_checkpoint(out).ok
    v = verify_checkpoint(out, checksums=True)
    assert v.verdict == "pass" and v.checksums["files_checked"] == 7 and v.checksums["mismatches"] == 0


def test_v4_corrupt_and_missing_shards_are_named(server: HubServer, tmp_path: Path) -> None:
    server.state.corrupt[SHARD3] = 1000
    try:
        r = fetch(server, tmp_path, REPO, local_dir=tmp_path / "a")
    finally:
        server.state.corrupt.clear()
    assert not r.ok and [(p["kind"], p["file"]) for p in r.problems] == [("bad", SHARD3)], r.problems
    r = fetch(server, tmp_path, BROKEN, local_dir=tmp_path / "b")
    assert not r.ok and [(p["kind"], p["file"]) for p in r.problems] == [("missing_file", SHARD3)], r.problems
