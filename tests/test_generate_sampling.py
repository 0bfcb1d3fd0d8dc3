"""Sampling: the masks of top-k, top-p and min-p and the repetition penalty on hand-made logits (expected values
worked out by hand in the comments), greedy, and draws that a seed reproduces."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3_tools.errors import Dsv3Error
from dsv3_tools.generate.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    distribution,
    make_generator,
    min_p_keep,
    next_tokens,
    top_k_keep,
    top_p_keep,
)

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (in a shuffled order), as logits.
PROBS = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15], dtype=torch.float64)
LOGITS = PROBS.log()


def _ids(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().flatten().tolist()


def test_top_k_mask() -> None:
    assert _ids(top_k_keep(LOGITS, 1)) == [1]
    assert _ids(top_k_keep(LOGITS, 2)) == [1, 3]
    assert _ids(top_k_keep(LOGITS, 3)) == [1, 3, 4]
    assert _ids(top_k_keep(LOGITS, 0)) == [0, 1, 2, 3, 4]  # off
    assert _ids(top_k_keep(LOGITS, 9)) == [0, 1, 2, 3, 4]
    tied = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0])
    assert _ids(top_k_keep(tied, 2)) == [1, 2, 3]  # the tie at the k-th value is kept


def test_top_p_mask() -> None:
    # Sorted: 0.4 (mass before 0), 0.3 (0.4), 0.15 (0.7), 0.1 (0.85), 0.05 (0.95).
    assert _ids(top_p_keep(PROBS, 0.3)) == [1]  # the first token alone crosses 0.3
    assert _ids(top_p_keep(PROBS, 0.5)) == [1, 3]
    assert _ids(top_p_keep(PROBS, 0.75)) == [1, 3, 4]
    assert _ids(top_p_keep(PROBS, 0.9)) == [0, 1, 3, 4]
    assert _ids(top_p_keep(PROBS, 1.0)) == [0, 1, 2, 3, 4]
    assert _ids(top_p_keep(PROBS, 1e-9)) == [1]  # never empty


def test_min_p_mask() -> None:
    assert _ids(min_p_keep(PROBS, 0.5)) == [1, 3]  # >= 0.2
    assert _ids(min_p_keep(PROBS, 0.2)) == [0, 1, 3, 4]  # >= 0.08
    assert _ids(min_p_keep(PROBS, 0.0)) == [0, 1, 2, 3, 4]
    assert _ids(min_p_keep(PROBS, 1.0)) == [1]


def test_repetition_penalty() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 3.0]  # positive halved, negative doubled, unseen kept
    assert logits.tolist() == [2.0, -1.0, 0.5, 3.0]  # not modified in place


def test_distribution_chains_the_filters() -> None:
    p = SamplingParams(temperature=1.0, top_k=3, top_p=0.8)
    d = distribution(LOGITS, p)
    # top-k 3 keeps 0.4, 0.3, 0.15 (renormalized: 0.4/0.85, 0.3/0.85, 0.15/0.85); top-p 0.8 then keeps the first two
    # (mass before the third is 0.7/0.85 = 0.82 >= 0.8).
    assert _ids(d > 0) == [1, 3]
    assert d[1].item() == pytest.approx(0.4 / 0.7) and d[3].item() == pytest.approx(0.3 / 0.7)
    # Temperature 0.5 squares the probabilities before filtering: 0.16, 0.09, 0.0225, 0.01, 0.0025 (sum 0.285).
    d = distribution(LOGITS, SamplingParams(temperature=0.5))
    assert d[1].item() == pytest.approx(0.16 / 0.285)
    # Greedy: one-hot on the argmax, after the repetition penalty (0.4 -> log(0.4) * 2 < log(0.3)).
    g = distribution(LOGITS, SamplingParams(temperature=0.0, repetition_penalty=2.0), torch.tensor([1]))
    assert _ids(g > 0) == [3] and g.sum().item() == 1.0


def test_fixed_seed_reproduces_the_draws() -> None:
    torch.manual_seed(123)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=20, min_p=0.01)] * 3

    def draw(seed: int) -> list[list[int]]:
        gens = [make_generator(seed + i) for i in range(3)]
        return [next_tokens(logits, params, [None] * 3, gens) for _ in range(20)]

    a, b, c = draw(7), draw(7), draw(8)
    assert a == b
    assert a != c
    # Draws follow the distribution: the empirical frequencies over many draws match it.
    d = distribution(logits[0], params[0])
    g = make_generator(0)
    counts = torch.bincount(
        torch.tensor([next_tokens(logits[:1], params[:1], [None], [g])[0] for _ in range(4000)]), minlength=50
    ).double()
    assert ((counts / 4000 - d).abs().max()) < 0.03
    assert counts[d == 0].sum() == 0  # filtered tokens are never drawn


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, -1.0, 2.0]])
    assert next_tokens(logits, [SamplingParams(temperature=0)] * 2, [None, None], [None, None]) == [1, 0]


def test_greedy_choice_is_the_first_maximum_in_all_batches() -> None:
    """Ties and near-ties (one f32 ulp apart): the first largest logit, in an all-greedy batch (chosen where the
    logits are) and in one with a sampled row (every row on the host in float64); reference: plain Python."""
    big = 30.0
    near = float(torch.nextafter(torch.tensor(big), torch.tensor(0.0)))
    logits = torch.tensor(
        [[big, 1.0, big, 0.0], [near, big, big, near], [0.0, near, 2.0, big], [-1.0, -2.0, -1.0, -3.0]]
    )
    rows = logits.tolist()
    want = [max(range(4), key=lambda j, r=r: (r[j], -j)) for r in rows]
    assert want == [0, 1, 3, 0]
    greedy = SamplingParams(temperature=0)
    assert next_tokens(logits, [greedy] * 4, [None] * 4, [None] * 4) == want
    mixed = next_tokens(
        logits, [greedy] * 3 + [SamplingParams(temperature=1.0)], [None] * 4, [None] * 3 + [make_generator(0)]
    )
    assert mixed[:3] == want[:3]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("top_p", 0.0, "top-p must be in \\(0, 1\\]"),
        ("top_p", 1.5, "top-p must be in \\(0, 1\\]"),
        ("temperature", -0.1, "temperature must be >= 0"),
        ("temperature", math.inf, "temperature must be >= 0"),
        ("top_k", -1, "top-k must be an integer >= 0"),
        ("min_p", 1.1, "min-p must be in \\[0, 1\\]"),
        ("repetition_penalty", 0.0, "repetition penalty must be > 0"),
    ],
)
def test_out_of_range_parameters(field: str, value: float, message: str) -> None:
    with pytest.raises(Dsv3Error, match=message):
        SamplingParams().override(**{field: value}).check()
