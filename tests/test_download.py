"""``download`` against a loopback Hub (tests/hub_server.py): never the network, HF_HOME always a temp dir.

What a transfer moved is read from the server's own counters (bytes served per file, Range headers), and what
arrived is compared byte for byte with the files the server was given.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import HubServer, read_folder
from huggingface_hub import constants as hf_constants

from dsv3_tools import download as D
from dsv3_tools.errors import DownloadError, OutputError

REPO = "org/tiny"
GATED = "org/gated"
SHARD1 = "model-00001-of-000004.safetensors"
SHARD2 = "model-00002-of-000004.safetensors"
SHARD3 = "model-00003-of-000004.safetensors"
INDEX = "model.safetensors.index.json"
TOKEN = "hf_test_token"
ROOT = Path(__file__).resolve().parent.parent
# The CLI in a child process, with huggingface_hub's 10 MiB read chunk lowered so that the few-MB test shards reach
# the disk in pieces (a real 4 GB shard does so at the default size).
CHILD = (
    "import sys, huggingface_hub.constants as c; c.DOWNLOAD_CHUNK_SIZE = 1 << 16; "
    "from dsv3_tools.cli import main; sys.argv = ['dsv3-tools', *sys.argv[1:]]; main()"
)


@pytest.fixture(scope="module")
def v1_files(tiny_fp8: Path) -> dict[str, bytes]:
    return read_folder(tiny_fp8)


@pytest.fixture(scope="module")
def main_files(v1_files: dict[str, bytes]) -> dict[str, bytes]:
    files = dict(v1_files)
    files["README.md"] = b"# tiny, revised on main\n"
    return files


@pytest.fixture(scope="module")
def server(v1_files, main_files):
    with HubServer() as hub:
        hub.commits = hub.add_repo(REPO, {"main": main_files, "v1": v1_files})
        hub.add_repo(GATED, {"main": v1_files}, gated=True)
        yield hub


@pytest.fixture
def hub(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """The shared server with switches off and counters at zero; HF_HOME and HF_ENDPOINT for child processes."""
    st = server.state
    st.throttle_bps = None
    st.cut_after.clear()
    st.corrupt.clear()
    st.reset_counters()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return server


def fetch(hub: HubServer, tmp_path: Path, repo: str = REPO, **kw) -> D.DownloadReport:
    """In-process download from the loopback Hub (endpoint/cache passed explicitly: huggingface_hub reads the
    environment once, at import)."""
    kw.setdefault("token", False)
    return D.download(repo, endpoint=hub.endpoint, cache_dir=tmp_path / "hf-home" / "hub", **kw)


def assert_same_files(folder: Path, expected: dict[str, bytes]) -> None:
    got = {n: (folder / n).read_bytes() for n in expected if (folder / n).is_file()}
    missing = sorted(set(expected) - set(got))
    assert not missing, f"missing in {folder}: {missing}"
    differ = sorted(n for n in expected if got[n] != expected[n])
    assert not differ, f"bytes differ from the Hub's in {folder}: {differ}"


def child(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, "download", *args],
        cwd=ROOT,
        env=dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def run_cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, "download", *args],
        cwd=ROOT,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- transfer -------------------------------------------------------------------------------------------------------


def test_full_download_to_local_dir(hub, tmp_path, main_files):
    out = tmp_path / "out"
    r = fetch(hub, tmp_path, local_dir=out)
    assert r.ok, r.problems
    assert r.commit == hub.commits["main"]
    assert_same_files(out, main_files)
    assert {f.state for f in r.files} == {"fetched"}
    assert r.transferred_bytes == sum(map(len, main_files.values())) == hub.state.total_served()
    # The library's own bookkeeping says every file is current: hf_hub_download returns it without a transfer.
    from huggingface_hub import hf_hub_download

    hub.state.reset_counters()
    p = hf_hub_download(REPO, SHARD1, revision=hub.commits["main"], local_dir=out, endpoint=hub.endpoint, token=False)
    assert Path(p) == out / SHARD1 and hub.state.total_served() == 0

    # A second run transfers nothing.
    hub.state.reset_counters()
    r2 = fetch(hub, tmp_path, local_dir=out)
    assert r2.ok and {f.state for f in r2.files} == {"present"}
    assert hub.state.total_served() == 0


def test_full_download_to_cache(hub, tmp_path, main_files):
    r = fetch(hub, tmp_path)
    assert r.ok, r.problems
    snap = Path(r.destination)
    assert snap == tmp_path / "hf-home/hub/models--org--tiny/snapshots" / hub.commits["main"]
    assert_same_files(snap, main_files)
    assert (snap.parent.parent / "refs" / "main").read_text() == hub.commits["main"]
    # The snapshot is what huggingface_hub itself resolves offline.
    from huggingface_hub import snapshot_download

    hub.state.reset_counters()
    p = snapshot_download(REPO, cache_dir=tmp_path / "hf-home/hub", local_files_only=True)
    assert Path(p) == snap and hub.state.requests() == 0


def test_include_exclude(hub, tmp_path, main_files):
    out = tmp_path / "out"
    r = fetch(hub, tmp_path, local_dir=out, include=["*.json"], exclude=["tokenizer*"])
    want = {n for n in main_files if n.endswith(".json") and not n.startswith("tokenizer")}
    assert r.ok, r.problems
    assert {f.name for f in r.files} == want
    assert set(hub.state.served) == want
    assert sorted(p.name for p in out.iterdir() if p.name != ".cache") == sorted(want)

    # Some shards but not all: the index names files that are not there, and the report says which.
    r = fetch(hub, tmp_path, local_dir=tmp_path / "out2", include=[SHARD1, INDEX])
    missing = sorted(p["file"] for p in r.problems if p["kind"] == "missing_file")
    assert missing == [f"model-0000{i}-of-000004.safetensors" for i in (2, 3, 4)], r.problems

    # in the CLI's own words: the options as typed, no internal "None" for the option not given
    with pytest.raises(DownloadError, match=r"no file of org/tiny \(11 files\) is selected by --include '\*\.bin'$"):
        fetch(hub, tmp_path, local_dir=tmp_path / "out3", include=["*.bin"])


def test_revision(hub, tmp_path, v1_files, main_files):
    r = fetch(hub, tmp_path, local_dir=tmp_path / "v1", revision="v1")
    assert r.ok and r.commit == hub.commits["v1"]
    assert_same_files(tmp_path / "v1", v1_files)
    r = fetch(hub, tmp_path, local_dir=tmp_path / "by-commit", revision=hub.commits["v1"], include=["README.md"])
    assert (tmp_path / "by-commit/README.md").read_bytes() == v1_files["README.md"] != main_files["README.md"]
    with pytest.raises(DownloadError, match="revision 'nope' not found in org/tiny"):
        fetch(hub, tmp_path, local_dir=tmp_path / "x", revision="nope")


def test_dry_run_writes_nothing(hub, tmp_path, main_files):
    out = tmp_path / "out"
    r = fetch(hub, tmp_path, local_dir=out, dry_run=True)
    assert r.dry_run and not out.exists()
    assert r.need_bytes == r.total_bytes == sum(map(len, main_files.values()))
    assert r.free_bytes > 0 and {f.state for f in r.files} == {"planned"}
    by_name = {f.name: f for f in r.files}
    assert by_name[SHARD1].sha256 is not None and by_name["config.json"].sha256 is None  # LFS vs git files
    assert hub.state.total_served() == 0


def test_refuses_when_space_is_short(hub, tmp_path, monkeypatch, main_files):
    total = sum(map(len, main_files.values()))
    monkeypatch.setattr(D, "free_bytes", lambda _p: total + D.SPACE_MARGIN_MIN - 1)
    out = tmp_path / "out"
    # one unit system in every message: human-readable bytes (the plan's table uses the same)
    with pytest.raises(OutputError, match=r"not enough space at .*: \d+\.\d\d MB to download \+ 1\.07 GB margin"):
        fetch(hub, tmp_path, local_dir=out)
    assert not out.exists() and hub.state.total_served() == 0
    plan = fetch(hub, tmp_path, local_dir=out, dry_run=True)  # the plan still shows the figures
    assert plan.free_bytes == total + D.SPACE_MARGIN_MIN - 1 and plan.margin_bytes == D.SPACE_MARGIN_MIN
    assert not plan.fits and plan.need_bytes == total
    r = fetch(hub, tmp_path, local_dir=out, force=True)
    assert r.ok and hub.state.total_served() == total


def test_cut_connection_resumes_within_the_run(hub, tmp_path, monkeypatch, main_files):
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    cut = 1_000_000
    hub.state.cut_after[SHARD2] = cut
    r = fetch(hub, tmp_path, local_dir=tmp_path / "out", include=[SHARD2])
    assert r.ok, r.problems
    assert_same_files(tmp_path / "out", {SHARD2: main_files[SHARD2]})
    gets = [g for g in hub.state.gets if g.path == SHARD2]
    assert [g.range is None for g in gets] == [True, False], gets
    start = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert cut - (1 << 16) < start <= cut  # what reached the file before the cut is kept
    assert gets[1].sent == len(main_files[SHARD2]) - start


# --- resume after a kill ---------------------------------------------------------------------------------------------


def _partials(folder: Path) -> dict[Path, int]:
    sizes = {}
    for p in folder.rglob("*.incomplete"):
        try:
            sizes[p] = p.stat().st_size
        except FileNotFoundError:  # completed and moved into place meanwhile
            pass
    return sizes


def _wait_for_partial(proc: subprocess.Popen, folder: Path, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"child ended early: {proc.communicate()}"
        if any(n >= at_least for n in _partials(folder).values()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no partial file of {at_least} bytes under {folder}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_resume_after_sigkill(hub, tmp_path, main_files, seed):
    out = tmp_path / "out"
    hub.state.throttle_bps = 1_500_000  # per response: a shard takes about 2 s
    proc = child([REPO, "--local-dir", str(out), "--json"])
    _wait_for_partial(proc, out, random.Random(seed).randint(50_000, 2_000_000))  # a seeded point in a shard
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    # What the killed run left: complete files (recorded) and partial ones.
    hub.state.throttle_bps = None
    hub.state.reset_counters()
    r = fetch(hub, tmp_path, local_dir=out)
    assert r.ok, r.problems
    assert_same_files(out, main_files)
    states = {f.name: f for f in r.files}
    resumed = [f for f in r.files if f.state == "resumed"]
    assert resumed, "the kill left no partial file to resume"
    for f in r.files:
        served = hub.state.served.get(f.name, 0)
        gets = [g.range for g in hub.state.gets if g.path == f.name]
        if f.state == "present":
            assert served == 0 and gets == [], f"{f.name}: complete before, fetched again ({served} bytes)"
        elif f.state == "resumed" and f.resumed_from == f.size:  # all bytes were in, the kill came before the move
            assert served == 0 and gets == [], f"{f.name}: {gets}"
        elif f.state == "resumed":
            assert gets == [f"bytes={f.resumed_from}-"], f"{f.name}: {gets}"
            assert served == f.size - f.resumed_from, f"{f.name}: served {served}, kept {f.resumed_from}"
        else:
            assert f.state == "fetched" and served == f.size and gets == [None], f"{f.name}: {f.state} {gets}"
    assert hub.state.total_served() == sum(f.size - f.resumed_from for f in r.files if f.state != "present")
    assert states[SHARD1].state in ("resumed", "fetched", "present")
    assert not _partials(out)


def test_ctrl_c_keeps_partials_and_resumes_in_cache(hub, tmp_path, main_files):
    hub.state.throttle_bps = 1_500_000
    proc = child([REPO, "--include", "*.safetensors"])
    blobs = tmp_path / "hf-home/hub/models--org--tiny/blobs"
    _wait_for_partial(proc, tmp_path / "hf-home", 300_000)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    kept = {p.name.removesuffix(".incomplete"): n for p, n in _partials(blobs).items()}
    assert kept and max(kept.values()) >= 300_000

    hub.state.throttle_bps = None
    hub.state.reset_counters()
    r = fetch(hub, tmp_path, include=["*.safetensors"])
    assert r.ok, r.problems
    for f in r.files:
        if f.sha256 in kept:
            assert f.state == "resumed" and f.resumed_from == kept[f.sha256]
            assert hub.state.served[f.name] == f.size - kept[f.sha256]
    assert_same_files(Path(r.destination), {n: b for n, b in main_files.items() if n.endswith(".safetensors")})


# --- integrity -------------------------------------------------------------------------------------------------------


def test_corrupt_transfer_is_named_and_fetched_again(hub, tmp_path, main_files):
    out = tmp_path / "out"
    hub.state.corrupt[SHARD2] = 123_457
    r = fetch(hub, tmp_path, local_dir=out)
    assert not r.ok
    assert [(p["kind"], p["file"]) for p in r.problems] == [("bad", SHARD2)], r.problems
    assert "sha256" in r.problems[0]["message"]
    assert not (out / SHARD2).exists(), "unverified bytes were moved into place"
    assert not _partials(out), "bad bytes kept for a resume"

    # --repair while the Hub still serves bad bytes: two attempts, still named.
    r = fetch(hub, tmp_path, local_dir=out, repair=True)
    assert [p["file"] for p in r.problems] == [SHARD2]
    assert len([g for g in hub.state.gets if g.path == SHARD2]) == 1 + 2

    # The next run, once the Hub serves good bytes, fetches only that file.
    hub.state.corrupt.clear()
    hub.state.reset_counters()
    r = fetch(hub, tmp_path, local_dir=out)
    assert r.ok, r.problems
    assert set(hub.state.served) == {SHARD2}
    assert_same_files(out, main_files)


def test_hashes_while_writing_and_after_a_rewind(hub, tmp_path, monkeypatch, main_files):
    """A fetched file's sha256 / blob id is computed as it is written (no second read of the file); when the server
    ignores a resume's Range header, http_get rewinds the file and the finished file is hashed instead."""
    rehashed: list[str] = []
    real_digest = D._file_digest
    monkeypatch.setattr(D, "_file_digest", lambda path, f: rehashed.append(Path(path).name) or real_digest(path, f))
    out = tmp_path / "out"
    r = fetch(hub, tmp_path, local_dir=out)
    assert r.ok, r.problems
    assert rehashed == [], f"re-read to verify: {rehashed}"
    assert_same_files(out, main_files)

    out2 = tmp_path / "out2"
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)  # so that bytes before the cut are kept
    hub.state.reset_counters()
    hub.state.cut_after[SHARD2] = 100_000  # the connection drops once; http_get resumes within the run
    hub.state.ignore_range = True  # ... and this server answers the Range request with the whole file
    r = fetch(hub, tmp_path, local_dir=out2)
    assert r.ok, r.problems
    assert any(g.path == SHARD2 and g.range for g in hub.state.gets), "no resume was attempted"
    assert len(rehashed) == 1, rehashed  # the rewound file only (its partial), hashed once it was complete
    assert_same_files(out2, main_files)


def test_repair_rehashes_files_already_present(hub, tmp_path, main_files):
    out = tmp_path / "out"
    assert fetch(hub, tmp_path, local_dir=out).ok
    # Bit rot: same size, same mtime, so only a re-hash can see it.
    p = out / SHARD3
    st = p.stat()
    with open(p, "r+b") as fh:
        fh.seek(2_000_000)
        b = fh.read(1)
        fh.seek(2_000_000)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    hub.state.reset_counters()
    assert fetch(hub, tmp_path, local_dir=out).ok and hub.state.total_served() == 0  # cheap run: trusts metadata
    r = fetch(hub, tmp_path, local_dir=out, repair=True)
    assert r.ok, r.problems
    assert {f.name: f.state for f in r.files}[SHARD3] == "fetched"
    assert set(hub.state.served) == {SHARD3}
    assert_same_files(out, main_files)


def test_truncated_local_file_is_fetched_again(hub, tmp_path, main_files):
    out = tmp_path / "out"
    assert fetch(hub, tmp_path, local_dir=out).ok
    with open(out / SHARD1, "r+b") as fh:  # the classic HeaderTooLarge shard
        fh.truncate(1000)
    hub.state.reset_counters()
    r = fetch(hub, tmp_path, local_dir=out)
    assert r.ok and set(hub.state.served) == {SHARD1}
    assert_same_files(out, main_files)


def test_cli_exit_code_1_names_the_bad_file(hub, tmp_path):
    hub.state.corrupt[SHARD1] = 10
    p = run_cli([REPO, "--local-dir", str(tmp_path / "out"), "--json"])
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    assert not rep["ok"] and [q["file"] for q in rep["problems"]] == [SHARD1]


# --- offline, access -------------------------------------------------------------------------------------------------


def test_offline_uses_the_cache_without_requests(hub, tmp_path, main_files):
    assert fetch(hub, tmp_path).ok
    assert fetch(hub, tmp_path, local_dir=tmp_path / "out").ok
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    hub.state.reset_counters()
    p = run_cli([REPO, "--json"], env)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["offline"] and rep["ok"] and rep["commit"] == hub.commits["main"]
    assert sorted(f["name"] for f in rep["files"] if f["state"] == "present") == sorted(main_files)
    r = fetch(hub, tmp_path, local_dir=tmp_path / "out", offline=True)  # same path, in-process (no torch import)
    assert r.offline and r.ok and r.destination == str(tmp_path / "out")
    assert sorted(f.name for f in r.files if f.state == "present") == sorted(main_files)
    assert hub.state.requests() == 0

    p = run_cli([REPO, "--revision", "v1"], env)  # never downloaded
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "offline (HF_HUB_OFFLINE=1) and no complete copy of org/tiny@v1" in p.stderr
    assert hub.state.requests() == 0


def test_offline_repair_checks_hashes_recorded_at_download(hub, tmp_path, main_files):
    """Offline, a same-size corruption passes the size and header checks; --repair re-hashes against the sha256 /
    blob id the download recorded (a cache blob's name, a local folder's metadata) and names the file."""
    out = tmp_path / "out"
    assert fetch(hub, tmp_path).ok and fetch(hub, tmp_path, local_dir=out).ok
    cached = fetch(hub, tmp_path, offline=True)
    for folder in (out, Path(cached.destination)):
        for name in (SHARD2, "config.json"):  # an LFS file (sha256) and a plain one (git blob id)
            p = Path(os.path.realpath(folder / name))
            data = bytearray(p.read_bytes())
            data[-1] ^= 0xFF
            p.write_bytes(bytes(data))
    hub.state.reset_counters()
    for local_dir in (out, None):
        r = fetch(hub, tmp_path, local_dir=local_dir, offline=True)
        assert r.ok, r.problems  # sizes and headers still agree
        r = fetch(hub, tmp_path, local_dir=local_dir, offline=True, repair=True)
        bad = sorted((p["file"], p["message"].split()[0]) for p in r.problems)
        assert bad == [("config.json", "git"), (SHARD2, "sha256")], (local_dir, r.problems)
        assert sum(f.state == "present" for f in r.files) == len(main_files) - 2
    assert hub.state.requests() == 0


def test_gated_and_missing_repos(hub, tmp_path, v1_files):
    with pytest.raises(
        DownloadError, match=r"org/gated is gated: accept its terms at http://127\.0\.0\.1:\d+/org/gated"
    ):
        fetch(hub, tmp_path, repo=GATED, local_dir=tmp_path / "g")
    with pytest.raises(DownloadError, match="gated"):
        fetch(hub, tmp_path, repo=GATED, local_dir=tmp_path / "g", token="not-granted")
    with pytest.raises(DownloadError, match="repository org/missing not found at http://127"):
        fetch(hub, tmp_path, repo="org/missing")
    assert hub.state.total_served() == 0
    r = fetch(hub, tmp_path, repo=GATED, local_dir=tmp_path / "g", token=TOKEN)
    assert r.ok
    assert_same_files(tmp_path / "g", v1_files)


def test_cli_one_line_errors_and_hf_token(hub, tmp_path):
    for repo, needle in ((GATED, "org/gated is gated"), ("org/missing", "repository org/missing not found")):
        p = run_cli([repo, "--local-dir", str(tmp_path / "x")])
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and needle in p.stderr, p.stderr
    p = run_cli([GATED, "--local-dir", str(tmp_path / "g"), "--include", "*.json"], dict(os.environ, HF_TOKEN=TOKEN))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "g" / "config.json").is_file()


def test_unreachable_endpoint_and_unsafe_names(hub, tmp_path, v1_files):
    with pytest.raises(DownloadError, match=r"cannot reach http://127\.0\.0\.1:9 .*HF_HUB_OFFLINE=1"):
        D.download(REPO, endpoint="http://127.0.0.1:9", token=False, cache_dir=tmp_path / "c", local_dir=tmp_path / "o")
    hub.add_repo("org/evil", {"main": {"../escape.json": b"{}", "config.json": b"{}"}})
    with pytest.raises(DownloadError, match=r"org/evil lists an unsafe file name '\.\./escape\.json'"):
        fetch(hub, tmp_path, repo="org/evil", local_dir=tmp_path / "evil")
    assert not (tmp_path / "escape.json").exists()


def test_wrong_index_total_size_is_a_warning(hub, tmp_path, v1_files):
    """An index whose total_size is not the tensors' bytes (file sizes, a hand edit) changes no tensor: the download
    is intact (exit 0) and says so in a warning."""
    files = dict(v1_files)
    index = json.loads(files[INDEX])
    right = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = right + 12345
    files[INDEX] = json.dumps(index).encode()
    hub.add_repo("org/odd-total", {"main": files})
    r = fetch(hub, tmp_path, repo="org/odd-total", local_dir=tmp_path / "out")
    assert r.ok and not r.problems, r.problems
    assert len(r.warnings) == 1 and str(right + 12345) in r.warnings[0] and str(right) in r.warnings[0], r.warnings
    assert fetch(hub, tmp_path, local_dir=tmp_path / "good").warnings == []
