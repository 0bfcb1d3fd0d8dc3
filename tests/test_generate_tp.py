"""generate under ``torchrun --nproc-per-node 2`` (gloo, CPU) on MP-2 shards equals one process on the HF folder,
token for token, sampling included: rank 0 reads the input, samples and prints; rank 1 runs the model on the tokens
rank 0 broadcasts (its all-reduced activations differ from one process's by float rounding only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_model_tp import make_mp

LINES = [
    {"prompt": "hello world"},
    {"prompt": "the quick brown fox jumps over the lazy dog", "temperature": 0},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]},
]


def _run(cmd: list[str]) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def test_mp2_torchrun_equals_one_process(tiny_fp8: Path, tmp_path: Path) -> None:
    make_mp(tiny_fp8, tmp_path / "mp2", 2)
    assert (tmp_path / "mp2" / "tokenizer_config.json").is_file()  # shard copies the tokenizer files
    f = tmp_path / "prompts.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in LINES))
    args = ["--input-file", str(f), "--json", "--seed", "5", "--temperature", "0.8", "--top-p", "0.9",
            "--max-new-tokens", "10", "--max-seq-len", "128", "--device", "cpu"]  # fmt: skip
    tp = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "dsv3_tools", "generate", str(tmp_path / "mp2"), *args])  # fmt: skip
    one = _run([sys.executable, "-m", "dsv3_tools", "generate", str(tiny_fp8), *args])
    assert len(tp) == len(one) == 3  # rank 0 alone printed
    for a, b in zip(tp, one):
        assert a["index"] == b["index"] and a["prompt_ids"] == b["prompt_ids"]
        assert a["output_ids"] == b["output_ids"], f"request {a['index']}"
        assert a["text"] == b["text"] and a["finish_reason"] == b["finish_reason"]
