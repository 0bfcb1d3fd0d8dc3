"""Reliability as a user meets it: bad input, a full disk, a read-only destination, two runs at once, and kills at
random points. Every case runs the real CLI in a child process; what it checks is what docs/reliability.md lists.

For each bad input: the exit code (2 for input, 1 for a failed check), exactly one line on stderr naming the file or
tensor and what to do, no traceback, the source byte-identical afterwards, and nothing in the destination that looks
complete (no manifest marked complete, no config.json beside weights).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dsv3_tools", *args],
        capture_output=True,
        text=True,
        env=env or dict(os.environ),
        timeout=timeout,
    )


def digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    return lines[0]


def looks_complete(dst: Path) -> bool:
    if not dst.is_dir():
        return False
    man = dst / "dsv3-manifest.json"
    if man.is_file() and json.loads(man.read_text()).get("complete"):
        return True
    return (dst / "config.json").is_file() and any(dst.glob("*.safetensors"))


# ---------------------------------------------------------------------- the bad-input matrix
def _truncated(tiny: Path, tmp: Path) -> Path:
    src = tmp / "trunc"
    shutil.copytree(tiny, src)
    f = sorted(src.glob("model-*.safetensors"))[1]
    f.write_bytes(f.read_bytes()[:-1000])
    return src


def _no_scale(tiny: Path, tmp: Path) -> Path:
    from safetensors.torch import load_file, save_file

    src = tmp / "noscale"
    shutil.copytree(tiny, src)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    f = src / idx["weight_map"].pop(name)
    t = load_file(f)
    del t[name]
    save_file(t, f, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return src


def _bad_config(tiny: Path, tmp: Path) -> Path:
    src = tmp / "badcfg"
    shutil.copytree(tiny, src)
    (src / "config.json").write_text("{not json")
    return src


def _file(tmp: Path) -> Path:
    f = tmp / "a-file"
    f.write_text("x")
    return f


def _foreign(tmp: Path) -> Path:
    d = tmp / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes\n")
    return d


# (name, build(tiny, tmp) -> (args, source folder to keep unchanged, destination), exit code, words in the line)
Case = tuple[str, Callable[[Path, Path], tuple[list[str], Path | None, Path | None]], int, tuple[str, ...]]
CASES: list[Case] = [
    ("cast: no such input", lambda t, d: (["cast", "fp8-bf16", str(d / "nope"), str(d / "o")], None, d / "o"), 2,
     ("nope", "no such folder")),
    ("cast: input is a file", lambda t, d: (["cast", "fp8-bf16", str(_file(d)), str(d / "o")], None, d / "o"), 2,
     ("a-file", "expected a checkpoint folder")),
    ("cast: truncated shard", lambda t, d: (["cast", "fp8-bf16", str(s := _truncated(t, d)), str(d / "o")], s, d / "o"),
     2, ("model-00002", "truncated")),
    ("cast: missing scale", lambda t, d: (["cast", "fp8-bf16", str(s := _no_scale(t, d)), str(d / "o")], s, d / "o"), 2,
     ("model.layers.1.self_attn.o_proj.weight", "weight_scale_inv")),
    ("cast: bad config.json", lambda t, d: (["cast", "fp8-bf16", str(s := _bad_config(t, d)), str(d / "o")], s, d / "o"),
     2, ("config.json", "not valid JSON")),
    ("cast: output inside the input", lambda t, d: (["cast", "fp8-bf16", str(t), str(t / "out")], t, t / "out"), 2,
     ("outside the input",)),
    ("cast: output is a file", lambda t, d: (["cast", "fp8-bf16", str(t), str(_file(d))], t, None), 2,
     ("a-file", "not a folder")),
    ("cast: output not empty, not ours", lambda t, d: (["cast", "fp8-bf16", str(t), str(_foreign(d))], t, None), 2,
     ("mine", "not empty")),
    ("cast: --workers 0", lambda t, d: (["cast", "fp8-bf16", str(t), str(d / "o"), "--workers", "0"], t, d / "o"), 2,
     ("--workers",)),
    ("cast: --device npu", lambda t, d: (["cast", "fp8-bf16", str(t), str(d / "o"), "--device", "npu"], t, d / "o"), 2,
     ("--device",)),
    ("cast bf16-fp8: an FP8 input", lambda t, d: (["cast", "bf16-fp8", str(t), str(d / "o")], t, d / "o"), 2,
     ("already an FP8 checkpoint",)),
    ("shard: --mp 3", lambda t, d: (["shard", str(t), str(d / "o"), "--mp", "3"], t, d / "o"), 2,
     ("--mp 3", "degrees that work")),
    ("shard: --mp 0", lambda t, d: (["shard", str(t), str(d / "o"), "--mp", "0"], t, d / "o"), 2, ("--mp",)),
    ("shard: --mtp sometimes", lambda t, d: (["shard", str(t), str(d / "o"), "--mp", "2", "--mtp", "sometimes"], t,
                                             d / "o"), 2, ("--mtp",)),
    ("verify: no such reference", lambda t, d: (["verify", str(t), "--reference", str(d / "r.safetensors")], t, None),
     2, ("r.safetensors",)),
    ("verify: --save-reference in a missing folder",
     lambda t, d: (["verify", str(t), "--save-reference", str(d / "nodir" / "x.safetensors")], t, d / "nodir"), 2,
     ("nodir", "no such folder")),
    ("verify: bad --tokens", lambda t, d: (["verify", str(t), "--tokens", str(_file(d))], t, None), 2, ("a-file",)),
    ("verify: --tier loose", lambda t, d: (["verify", str(t), "--tier", "loose"], t, None), 2, ("--tier",)),
    ("inspect: no such folder", lambda t, d: (["inspect", str(d / "nope")], None, None), 2, ("nope", "no such folder")),
    ("inspect: an empty folder", lambda t, d: (["inspect", str(_foreign(d).parent / "empty")], None, None), 2,
     ("empty",)),
    ("download: invalid repo id", lambda t, d: (["download", "not a repo id!!", "--dry-run"], None, None), 2,
     ("not a valid repository id",)),
    ("synth: output not empty", lambda t, d: (["synth", str(_foreign(d))], None, None), 2, ("mine", "not empty")),
    ("synth: output is a file", lambda t, d: (["synth", str(_file(d))], None, None), 2, ("a-file", "not a folder")),
    ("synth: unknown config", lambda t, d: (["synth", str(d / "o"), "--config", "gpt-5"], None, d / "o"), 2,
     ("gpt-5",)),
    ("synth: --layers 0", lambda t, d: (["synth", str(d / "o"), "--layers", "0"], None, d / "o"), 2, ("--layers",)),
    ("demo: a folder it did not make", lambda t, d: (["demo", "--workdir", str(_foreign(d))], None, None), 2,
     ("mine", "not made by dsv3-tools demo")),
    ("demo: --workdir is a file", lambda t, d: (["demo", "--workdir", str(_file(d))], None, None), 2,
     ("a-file", "not a folder")),
    ("generate: no such checkpoint", lambda t, d: (["generate", str(d / "nope"), "-p", "hi"], None, None), 2,
     ("nope", "no such folder")),
    ("generate: empty input file", lambda t, d: (["generate", str(t), "-i", str(_empty(d))], t, None), 2,
     ("empty.txt",)),
]  # fmt: skip


def _empty(tmp: Path) -> Path:
    f = tmp / "empty.txt"
    f.write_text("")
    return f


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case: Case, tiny_fp8: Path, tmp_path: Path) -> None:
    name, build, code, words = case
    if name.startswith("inspect: an empty"):
        (tmp_path / "empty").mkdir()
    before_tiny = digest(tiny_fp8)
    args, src, dst = build(tiny_fp8, tmp_path)
    before = digest(src) if src is not None else {}
    r = cli(*args, env=dict(os.environ, HF_HUB_OFFLINE="0"))
    assert r.returncode == code, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    line = one_line(r.stderr)
    for w in words:
        assert w in line, (w, line)
    if src is not None:
        assert digest(src) == before, "the source changed"
    assert digest(tiny_fp8) == before_tiny
    if dst is not None:
        assert not looks_complete(dst), sorted(p.name for p in dst.iterdir())


def test_demo_never_deletes_what_it_did_not_make(tmp_path: Path) -> None:
    mine = _foreign(tmp_path)
    r = cli("demo", "--workdir", str(mine))
    assert r.returncode == 2 and (mine / "notes.txt").read_text() == "my notes\n", r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{x}"],
        ["cast", "fp8-bf16", "{x}", "{out}"],
        ["shard", "{x}", "{out}", "--mp", "2"],
        ["verify", "{x}", "--reference", "{x}/r.safetensors"],
        ["generate", "{x}", "--prompt", "hi"],
    ],
    ids=lambda a: a[0],
)
def test_a_bad_path_answers_before_torch_is_imported(args: list[str], tmp_path: Path) -> None:
    """Every command that reads a checkpoint answers a missing one without importing torch (seconds of start-up)."""
    argv = [a.format(x=tmp_path / "missing", out=tmp_path / "out") for a in args]
    code = (
        "import sys\n"
        "from dsv3_tools.cli import main\n"
        f"sys.argv = ['dsv3-tools', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(code)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "missing" in line and "torch was imported" not in r.stderr, r.stderr


def test_offline_without_a_copy_speaks_the_cli_language(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    r = cli("download", "org/not-here", env=env)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "offline" in line and "local_files_only" not in line, line


def test_unexpected_errors_are_one_line_with_a_debug_hint(tiny_fp8: Path, tmp_path: Path) -> None:
    """A bug (here: a kernel made to fail) prints one line and exit 1; DSV3_DEBUG=1 shows the traceback."""
    code = (
        "import sys; import dsv3_tools.cast as C\n"
        "def boom(*a, **k): raise ZeroDivisionError('planted')\n"
        "C._dequant = boom\n"
        "from dsv3_tools.cli import main; sys.argv = ['dsv3-tools', *sys.argv[1:]]; main()\n"
    )
    args = ["cast", "fp8-bf16", str(tiny_fp8), str(tmp_path / "o"), "--device", "cpu", "--json"]  # --json: no bar
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    line = one_line(r.stderr)
    assert r.returncode == 1 and "ZeroDivisionError: planted" in line and "DSV3_DEBUG=1" in line, r.stderr
    r = subprocess.run(
        [sys.executable, "-c", code, *args[:3], str(tmp_path / "o2"), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=dict(os.environ, DSV3_DEBUG="1"),
    )
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr


# ---------------------------------------------------------------------- read-only and full file systems
def _mount_tmpfs(where: Path, size: str, ro: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0
    )


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path: Path):
    where = tmp_path / "ro"
    if not _mount_tmpfs(where, "1m", ro=True):
        pytest.skip("needs root to mount a read-only tmpfs")
    yield where
    _umount(where)


@pytest.mark.parametrize("cmd", ["cast", "shard", "verify", "download", "synth"])
def test_read_only_destination_is_refused_before_any_work(cmd: str, readonly_dir: Path, tiny_fp8: Path) -> None:
    dst = readonly_dir / "out"
    args = {
        "cast": ["cast", "fp8-bf16", str(tiny_fp8), str(dst)],
        "shard": ["shard", str(tiny_fp8), str(dst), "--mp", "2"],
        "verify": ["verify", str(tiny_fp8), "--save-reference", str(readonly_dir / "ref.safetensors")],
        "download": ["download", "org/some-repo", "--local-dir", str(dst)],
        "synth": ["synth", str(dst)],
    }[cmd]
    t = time.monotonic()
    r = cli(*args)
    line = one_line(r.stderr)
    assert r.returncode == 2 and "read-only file system" in line, line
    if cmd == "verify":
        assert "model:" not in r.stderr and time.monotonic() - t < 20  # refused before the model ran


FILLER = """
import os, sys
from dsv3_tools import output
fill, keep = sys.argv[1], int(sys.argv[2])
orig = output.Output.__init__
def init(self, plan):
    orig(self, plan)  # the destination passed its free-space check: now something else takes the space
    st = os.statvfs(fill)
    with open(os.path.join(fill, "filler"), "wb") as f:
        f.write(b"x" * max(0, st.f_bavail * st.f_frsize - keep))
output.Output.__init__ = init
from dsv3_tools.cli import main
sys.argv = ["dsv3-tools", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("stage", ["cast", "shard"])
def test_disk_full_during_a_write(stage: str, tiny_fp8: Path, tmp_path: Path) -> None:
    """The disk fills up mid-run (another writer takes the space after the free-space check): one line, exit 2, the
    partial output not marked complete; once space is freed, the same command completes byte-identical."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "64m"):
        pytest.skip("needs root to mount a size-limited tmpfs")
    try:
        args = {
            "cast": ["cast", "fp8-bf16", str(tiny_fp8), str(mnt / "out"), "--device", "cpu", "--json"],
            "shard": ["shard", str(tiny_fp8), str(mnt / "out"), "--mp", "2", "--json"],
        }[stage]
        ref = tmp_path / "ref"
        ref_args = [*args[: 2 if stage == "shard" else 3], str(ref), *args[(3 if stage == "shard" else 4) :]]
        assert cli(*ref_args).returncode == 0
        r = subprocess.run(
            [sys.executable, "-c", FILLER, str(mnt), str(4 << 20), *args], capture_output=True, text=True
        )
        line = one_line(r.stderr)
        assert r.returncode == 2 and "no space left" in line and "run the same command again" in line, line
        assert not looks_complete(mnt / "out") and not list((mnt / "out").glob(".*.partial"))
        (mnt / "filler").unlink()
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        skip = {"dsv3-manifest.json"}
        assert {k: v for k, v in digest(mnt / "out").items() if k not in skip} == {
            k: v for k, v in digest(ref).items() if k not in skip
        }
    finally:
        _umount(mnt)


# ---------------------------------------------------------------------- two runs at once
SLOW = """
import sys, time
from dsv3_tools import writer
orig = writer.SafetensorsWriter.write_part
def slow(self, name, data):
    time.sleep(0.05)
    orig(self, name, data)
writer.SafetensorsWriter.write_part = slow
from dsv3_tools.cli import main
sys.argv = ["dsv3-tools", *sys.argv[1:]]
main()
"""


def test_a_second_run_into_the_same_destination_refuses(tiny_fp8: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    args = ["cast", "fp8-bf16", str(tiny_fp8), str(dst), "--device", "cpu"]
    first = subprocess.Popen([sys.executable, "-c", SLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (dst / ".dsv3-lock").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    second = cli(*args)
    line = one_line(second.stderr)
    assert second.returncode == 2 and f"pid {first.pid}" in line, line
    assert first.wait(timeout=300) == 0, first.stderr.read()
    ref = tmp_path / "ref"
    assert cli("cast", "fp8-bf16", str(tiny_fp8), str(ref), "--device", "cpu").returncode == 0
    skip = {"dsv3-manifest.json"}
    assert {k: v for k, v in digest(dst).items() if k not in skip} == {
        k: v for k, v in digest(ref).items() if k not in skip
    }
    assert not (dst / ".dsv3-lock").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tiny_fp8: Path, tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    (dst / ".dsv3-lock").write_text(f"{gone.pid} 1 {os.uname().nodename}\n")
    r = cli("shard", str(tiny_fp8), str(dst), "--mp", "2")
    assert r.returncode == 0, r.stderr
    assert json.loads((dst / "dsv3-manifest.json").read_text())["complete"] and not (dst / ".dsv3-lock").exists()


# ---------------------------------------------------------------------- kills at random points
KILL_AT = """
import os, signal, sys
from dsv3_tools import writer
sig, at = getattr(signal, "SIG" + sys.argv[1]), int(sys.argv[2])
n = [0]
orig = writer.SafetensorsWriter.write_part
def part(self, name, data):
    orig(self, name, data)
    n[0] += 1
    if n[0] == at:
        os.kill(os.getpid(), sig)
writer.SafetensorsWriter.write_part = part
from dsv3_tools.cli import main
sys.argv = ["dsv3-tools", *sys.argv[3:]]
main()
"""
STAGES = {
    "cast": lambda src, dst: ["cast", "fp8-bf16", str(src), str(dst), "--device", "cpu", "--json"],
    "shard": lambda src, dst: ["shard", str(src), str(dst), "--mp", "2", "--json"],
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_at_random_points_then_resume(stage: str, tiny_fp8: Path, tmp_path: Path) -> None:
    """SIGKILL at three seeded random points and SIGINT at one: each re-run completes, byte-identical to a clean run;
    SIGINT exits 130 with the resume hint (true for this stage)."""
    ref = tmp_path / "ref"
    assert cli(*STAGES[stage](tiny_fp8, ref)).returncode == 0
    rng = random.Random(20261206)
    skip = {"dsv3-manifest.json"}
    want = {k: v for k, v in digest(ref).items() if k not in skip}
    interrupted = 0
    for i, sig in enumerate(["KILL", "KILL", "KILL", "INT"]):
        dst = tmp_path / f"run{i}"
        at = rng.randint(1, 40)
        r = subprocess.run([sys.executable, "-c", KILL_AT, sig, str(at), *STAGES[stage](tiny_fp8, dst)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode == 0:
            continue  # the run finished before the chosen point: nothing to resume
        if sig == "KILL":
            assert r.returncode == -signal.SIGKILL, (at, r.returncode, r.stderr)
        else:
            line = one_line(r.stderr)
            assert r.returncode == 130 and "run the same command again to resume" in line, line
        assert not looks_complete(dst), at
        interrupted += 1
        r = cli(*STAGES[stage](tiny_fp8, dst))
        assert r.returncode == 0, (at, r.stderr)
        assert {k: v for k, v in digest(dst).items() if k not in skip} == want, (stage, sig, at)
    assert interrupted == 4  # every chosen point fell inside the run
