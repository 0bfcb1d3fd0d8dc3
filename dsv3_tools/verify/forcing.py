"""Teacher forcing: each of the candidate's layers run on the reference's input of that layer, and its output
compared with the reference's output, so that a layer's error is measured alone rather than compounded through
every layer before it. The MTP module is run on the reference's final hidden states and judged by its logits.

Used as the model's ``teacher`` hook (``model.Teacher``): called while each layer's weights are loaded, so a
streamed run reads every weight once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .metrics import LayerStats, LogitStats, compare_logits, layer_stats, summarize
from .reference import Reference

if TYPE_CHECKING:
    from ..model import LayerFn


class Forcing:
    """Collects, per main layer, the teacher-forced ``LayerStats`` against ``ref`` (which must hold every layer's
    input), and with ``mtp`` the MTP module's teacher-forced logits against the reference's MTP logits."""

    def __init__(self, ref: Reference, layers: int, mtp: bool):
        if not ref.has_inputs:
            raise ValueError("teacher forcing needs a reference holding every layer's input")
        self.ref, self.n, self.mtp = ref, layers, mtp and ref.has_mtp
        self.layers: dict[int, LayerStats] = {}
        self.mtp_stats: LogitStats | None = None
        self.skipped: list[int] = []  # layers whose input the reference did not record (NaN rows)

    def __call__(self, layer: int, run: LayerFn) -> None:
        recs = self.ref.prompts
        if layer < self.n:
            x = [p.hidden[layer] for p in recs]
            if not all(bool(torch.isfinite(t).all()) for t in x):
                self.skipped.append(layer)
                return
            self.layers[layer] = layer_stats(layer, x, [p.hidden[layer + 1] for p in recs], run(x))
        elif self.mtp:
            out = run([p.hidden[self.n] for p in recs])
            self.mtp_stats = summarize([compare_logits(p.mtp, o) for p, o in zip(recs, out)])
