"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p, then a draw.

The steps run in that order, each on the distribution the previous one left (renormalized), as transformers'
logits processors do. Temperature 0 is greedy (the argmax after the repetition penalty). Every sequence has its own
``torch.Generator`` seeded from the request, so a sequence's text does not depend on which other sequences share
its batch, and a fixed seed gives the same text again. Draws are made on the CPU in float64, so they do not depend
on the device either. Only rank 0 samples; the tokens are broadcast (``engine.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from ..errors import Dsv3Error


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens (defaults: plain sampling at temperature 1, nothing filtered)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def check(self, where: str = "") -> SamplingParams:
        """Raise a one-line ``Dsv3Error`` for a value outside its range; return self."""
        at = f"{where}: " if where else ""
        t, p, k, m, r = self.temperature, self.top_p, self.top_k, self.min_p, self.repetition_penalty
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise Dsv3Error(f"{at}temperature must be >= 0 (0 = greedy), got {t!r}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise Dsv3Error(f"{at}top-p must be in (0, 1], got {p!r}")
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise Dsv3Error(f"{at}top-k must be an integer >= 0 (0 = off), got {k!r}")
        if not (isinstance(m, (int, float)) and 0 <= m <= 1):
            raise Dsv3Error(f"{at}min-p must be in [0, 1], got {m!r}")
        if not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0):
            raise Dsv3Error(f"{at}repetition penalty must be > 0 (1 = off), got {r!r}")
        return self

    def override(self, **changes: float | int | None) -> SamplingParams:
        """A copy with the given fields changed (``None`` values ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Tokens already in the sequence (``seen``: ids) get their logit divided by ``penalty`` when positive and
    multiplied by it when negative (the CTRL rule transformers uses); a new tensor."""
    import torch

    out = logits.clone()
    if penalty == 1 or seen.numel() == 0:
        return out
    ids = seen.unique()
    v = out[ids]
    out[ids] = torch.where(v > 0, v / penalty, v * penalty)
    return out


def top_k_keep(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Tokens to keep: the ``k`` largest logits and any tied with the k-th (all when ``k`` is 0 or >= vocab)."""
    import torch

    if k <= 0 or k >= logits.shape[-1]:
        return torch.ones_like(logits, dtype=torch.bool)
    return logits >= logits.topk(k).values[-1]


def top_p_keep(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Tokens to keep: the most probable ones, in order, until their total reaches ``p`` (the token that crosses
    ``p`` is kept: a token is dropped when the mass of the tokens before it is already >= ``p``)."""
    import torch

    if p >= 1:
        return torch.ones_like(probs, dtype=torch.bool)
    sp, order = probs.sort(descending=True)
    before = sp.cumsum(-1) - sp
    keep_sorted = before < p
    keep_sorted[0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def min_p_keep(probs: torch.Tensor, m: float) -> torch.Tensor:
    """Tokens to keep: probability >= ``m`` times the largest probability."""
    import torch

    if m <= 0:
        return torch.ones_like(probs, dtype=torch.bool)
    return probs >= m * probs.max()


def distribution(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """The final sampling distribution [vocab] (float64) of one sequence's logits [vocab]; a one-hot argmax when
    greedy."""
    import torch

    x = logits.double()
    if seen is not None:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if params.greedy:
        return torch.zeros_like(x).scatter_(0, x.argmax().view(1), 1.0)
    x = x / params.temperature
    x = x.masked_fill(~top_k_keep(x, params.top_k), -math.inf)
    x = x.masked_fill(~top_p_keep(x.softmax(-1), params.top_p), -math.inf)
    x = x.masked_fill(~min_p_keep(x.softmax(-1), params.min_p), -math.inf)
    return x.softmax(-1)


def make_generator(seed: int) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(seed)


def next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seen: list[torch.Tensor],
    generators: list[torch.Generator],
) -> list[int]:
    """The next token of each row of ``logits`` [B, vocab] (any device): its own parameters, history (for the
    repetition penalty) and generator."""
    import torch

    if all(p.greedy and p.repetition_penalty == 1 for p in params):  # the argmax where the logits are: B ints come
        return logits.detach().argmax(-1).tolist()  # back, not B x vocab float64 (f32 -> f64 is exact: same choice)
    out = []
    rows = logits.detach().to("cpu", torch.float64)
    for row, p, s, g in zip(rows, params, seen, generators):
        if p.greedy and p.repetition_penalty == 1:
            out.append(int(row.argmax()))
            continue
        probs = distribution(row, p, s)
        out.append(int(probs.argmax()) if p.greedy else int(torch.multinomial(probs, 1, generator=g)))
    return out
