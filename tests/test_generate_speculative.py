"""``generate --speculative mtp``: greedy decoding with the MTP module's drafts gives plain greedy's tokens.

The random-weight tiny model's MTP module drafts almost nothing right, so the accept path is driven by an oracle
drafter too: the real MTP module runs (its cache rows are written as always) but its answer is replaced by the
token plain greedy decoding produced at that position (or a wrong one, on a fixed pattern). Checks: the drafter's
logits against the MTP module of the full forward pass (``Model.forward(mtp=True)``: the same input mixing,
``model.mtp_input``, but full causal attention over the whole sequence instead of the cache, its positions and its
slots), and the tokens against plain greedy decoding, which ``test_generate.py`` checks against full forward
passes and transformers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_generate import PROMPTS

from dsv3_tools.checkpoint import open_checkpoint
from dsv3_tools.generate.batch import Request
from dsv3_tools.generate.chat import Tokenizer
from dsv3_tools.generate.engine import Engine
from dsv3_tools.generate.sampling import SamplingParams
from dsv3_tools.model import load_model

GREEDY = SamplingParams(temperature=0.0)
PENALIZED = SamplingParams(temperature=0.0, repetition_penalty=1.3)
pytestmark = pytest.mark.usefixtures("one_thread")


def _reqs(params: SamplingParams = GREEDY, max_new: int = 14) -> list[Request]:
    return [Request(i, f"p{i}", p, params, max_new, (), 100 + i) for i, p in enumerate(PROMPTS)]


def _engine(path: Path, speculative: bool, batch: int = 4) -> Engine:
    return Engine(load_model(open_checkpoint(path)), Tokenizer.load(path), batch, 96, ignore_eos=True,
                  speculative=speculative)  # fmt: skip


@pytest.fixture(scope="module")
def plain(tiny_fp8: Path) -> dict:
    eng = _engine(tiny_fp8, False)
    return {p: [r.output_ids for r in eng.run(_reqs(p))] for p in (GREEDY, PENALIZED)}


def _counts_add_up(r) -> None:
    """Every step emits its token plus one more per accepted draft; the prefill emits the first."""
    assert len(r.output_ids) == 1 + r.speculative["drafted"] + r.speculative["accepted"], r.speculative


@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "repetition-penalty"])
def test_speculative_equals_plain_greedy(params: SamplingParams, tiny_fp8: Path, plain: dict) -> None:
    """Prompts of different lengths in one batch; the MTP module's own drafts (random weights: nearly all wrong)."""
    results = _engine(tiny_fp8, True).run(_reqs(params))
    for r, want in zip(results, plain[params]):
        assert r.output_ids == want, (r.index, r.output_ids, want)
        _counts_add_up(r)


class Oracle:
    """The real drafter (its cache rows written as always), answering with plain greedy's token at the drafted
    position when ``right(k)`` for the k-th output token, else with another token."""

    def __init__(self, real, prompts: list[list[int]], outputs: list[list[int]], right):
        self.real, self.layer = real, real.layer
        self.prompts, self.outputs, self.right = prompts, outputs, right
        self.rows: list[tuple[int, int, torch.Tensor]] = []  # (slot, position, the real drafter's logits)

    def _answer(self, slot: int, position: int, vocab: int) -> torch.Tensor:
        k = position + 2 - len(self.prompts[slot])  # the drafted token's index in the output
        want = self.outputs[slot][k] if 0 <= k < len(self.outputs[slot]) else 0  # (0: a capture's rows)
        tok = want if self.right(k) else (want + 1) % vocab
        return torch.nn.functional.one_hot(torch.tensor(tok), vocab).float()

    def prefill(self, h, next_tokens, lens, cache):
        out = self.real.prefill(h, next_tokens, lens, cache)
        self.rows.extend((i, T - 1, out[i]) for i, T in enumerate(lens))
        return torch.stack([self._answer(i, T - 1, out.shape[-1]) for i, T in enumerate(lens)])

    def decode(self, h, next_tokens, positions, slots, cache, kv_len, static=False):
        out = self.real.decode(h, next_tokens, positions, slots, cache, kv_len, static)
        self.rows.extend((int(s), int(p), row) for s, p, row in zip(slots, positions, out))
        return torch.stack([self._answer(int(s), int(p), out.shape[-1]) for s, p in zip(slots, positions)])


@pytest.mark.parametrize("pattern", ["all", "every-third-wrong", "alternate"])
def test_accepted_drafts_give_two_tokens_a_step_and_the_same_text(pattern: str, tiny_fp8: Path, plain: dict) -> None:
    right = {"all": lambda k: True, "every-third-wrong": lambda k: k % 3 != 0, "alternate": lambda k: k % 2 == 0}
    eng = _engine(tiny_fp8, True)
    oracle = Oracle(eng.model.drafter, PROMPTS, plain[GREEDY], right[pattern])
    eng.model.drafter = oracle
    results = eng.run(_reqs())
    for r, want in zip(results, plain[GREEDY]):
        assert r.output_ids == want, (pattern, r.index)
        _counts_add_up(r)
        assert r.speculative["accepted"] > 0
        if pattern == "all":  # every step gives two tokens (the last one may end the sequence after one)
            assert r.speculative["drafted"] == (len(want) - 1 + 1) // 2, r.speculative
    # The MTP module's rows, two of one sequence in a step after an accepted draft, still compute its function.
    _check_rows(eng, results, oracle.rows)


def _check_rows(eng: Engine, results: list, rows: list) -> None:
    """Each MTP row's logits against ``forward(mtp=True)``'s MTP logits at that position of the final sequence
    (float32: equal up to the rounding of the reassociated attention); one row per position, each once, from each
    prompt's last position on."""
    full = eng.model.forward([r.prompt_ids + r.output_ids for r in results], mtp=True).mtp_logits
    for r in results:  # (the step that ends a sequence runs no MTP row: its draft would not be used)
        got = sorted(p for s, p, _ in rows if s == r.index)
        first, end = len(r.prompt_ids) - 1, len(r.prompt_ids) + len(r.output_ids) - 2
        assert got == list(range(first, first + len(got))) and first + len(got) >= end - 1, (r.index, got)
    for slot, pos, row in rows:
        want = full[slot][pos]  # position j: from h_j and token j + 1
        err = float((row - want).abs().max() / want.abs().max())
        assert err < 1e-4, (slot, pos, err)


def test_drafter_is_the_mtp_module_of_the_forward_pass(tiny_fp8: Path) -> None:
    """The MTP module's own drafts (one row per sequence per step): every row against the forward pass's."""
    eng = _engine(tiny_fp8, True)
    real, seen = eng.model.drafter, []

    class Spy:
        layer = real.layer

        def prefill(self, h, next_tokens, lens, cache):
            out = real.prefill(h, next_tokens, lens, cache)
            seen.extend((i, T - 1, out[i]) for i, T in enumerate(lens))
            return out

        def decode(self, h, next_tokens, positions, slots, cache, kv_len):
            out = real.decode(h, next_tokens, positions, slots, cache, kv_len)
            seen.extend((int(s), int(p), row) for s, p, row in zip(slots, positions, out))
            return out

    eng.model.drafter = Spy()
    _check_rows(eng, eng.run(_reqs()), seen)


class EagerGraph:
    """Stands in for a CUDA graph (there is no GPU here): ``replay`` runs the captured step again and writes its
    results into the tensors the capture returned, as a replay does; records each replay's row count."""

    rows: list[int] = []

    def __init__(self, fn):
        self.fn = fn
        self.out = fn()

    def replay(self) -> None:
        new = self.fn()
        with torch.inference_mode():  # (the step's outputs are inference tensors)
            for old, fresh in zip(*(o if isinstance(o, tuple) else (o,) for o in (self.out, new))):
                old.copy_(fresh)
                EagerGraph.rows.append(fresh.shape[0])


def _eager_capture(fn, dev, pool, warmup):
    g = EagerGraph(fn)
    return g, g.out


@pytest.mark.parametrize("pattern", ["own-drafts", "all", "alternate"])
def test_graphed_steps_give_plain_greedy_tokens(
    pattern: str, tiny_fp8: Path, plain: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SpeculativeGraphs`` (the steps' CUDA graphs: fixed rows, finished sequences still fed, the inputs copied in
    and the outputs overwritten at each replay), its graphs replayed eagerly here, gives plain greedy's tokens;
    sequences end at different steps (different lengths, drafts accepted on a pattern)."""
    from dsv3_tools.generate import graphs

    monkeypatch.setattr(graphs, "_capture", _eager_capture)
    monkeypatch.setattr(EagerGraph, "rows", [])
    lengths = [14, 5, 9, 12]
    eng = _engine(tiny_fp8, True)
    if pattern != "own-drafts":
        right = {"all": lambda k: True, "alternate": lambda k: k % 2 == 0}[pattern]
        eng.model.drafter = Oracle(eng.model.drafter, PROMPTS, plain[GREEDY], right)
    sg = graphs.SpeculativeGraphs.__new__(graphs.SpeculativeGraphs)  # (its constructor wants a CUDA cache)
    sg.model, sg.cache, sg.warmup, sg.captured, sg.pool = eng.model, eng.cache, 0, {}, None
    eng.spec_graphs = sg
    reqs = [Request(i, f"p{i}", p, GREEDY, n, (), 100 + i) for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
    for r, want, n in zip(eng.run(reqs), plain[GREEDY], lengths):
        assert r.output_ids == want[:n], (pattern, r.index, r.output_ids, want[:n])
        _counts_add_up(r)
        assert pattern == "own-drafts" or r.speculative["accepted"] > 0
    assert EagerGraph.rows and set(EagerGraph.rows) == {2 * len(PROMPTS)}, EagerGraph.rows


def test_bad_input_is_one_line(tiny_fp8: Path, tmp_path: Path) -> None:
    """No MTP module, sampling, an unknown kind, torchrun: exit 2 and one line, before any weight is read."""
    import subprocess
    import sys

    from dsv3_tools.synth import synth

    no_mtp = tmp_path / "no-mtp"
    synth(no_mtp, "tiny", mtp=0)
    ck = str(tiny_fp8)
    cases = [
        ([str(no_mtp), "-p", "x", "--temperature", "0"], "does not have"),
        ([ck, "-p", "x", "--temperature", "0.7"], "decodes greedily"),
        ([ck, "-p", "x", "--speculative", "medusa", "--temperature", "0"], "--speculative must be mtp"),
    ]
    for args, message in cases:
        flag = [] if "--speculative" in args else ["--speculative", "mtp"]
        r = subprocess.run([sys.executable, "-m", "dsv3_tools", "generate", *args, *flag], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("memory plan")]
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], (args, r.stderr)
