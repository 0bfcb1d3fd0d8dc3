"""The decoding step captured in a CUDA graph, once per batch size.

A step of a large MoE model at small batch is dominated by kernel launches (hundreds per layer); replaying a
captured graph launches them all at once. The step is capturable because ``Model.decode(..., static=True)`` has
fixed shapes for a batch size (it attends over the whole cache length, masked, or on the batch-invariant kernels
over each row's own positions) and never reads the device from the host (the chosen experts through the grouped
kernel, or every expert on every row; the rope tables and the cache rows are indexed on the device). Tokens and
positions are copied into the graph's own input tensors before each replay.

Capturing runs the step, which writes cache rows at position 0 of the first slots; the engine therefore captures a
batch size before it prefills a batch of that size (``ensure``), never in the middle of one. Exercised by
``tests/test_gpu.py`` on a CUDA machine.

``SpeculativeGraphs`` captures speculative decoding's two steps the same way, with two rows per sequence in each:
the verify step (the main model on each sequence's last token and its draft: logits and final hidden states) and
the draft step (the MTP module on those rows). With the batch-invariant decode kernels a row's result is the same
as in the eager step of any row count, so the captured steps give the eager steps' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import KVCache, Model


def _capture(fn, dev: torch.device, pool, warmup: int) -> tuple[torch.cuda.CUDAGraph, object]:
    """``fn()`` run ``warmup`` times on a side stream (compiles, lazy allocations), then captured; (graph, outputs)."""
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):  # warm-up (lazy initializations, autotuning) outside the capture
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor


class GraphDecoder:
    """``decode(tokens, positions)`` through one CUDA graph per batch size, sharing one memory pool."""

    def __init__(self, model: Model, cache: KVCache, warmup: int = 2):
        if cache.data.device.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.graphs: dict[int, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def ensure(self, batch: int) -> None:
        if batch not in self.graphs:
            self.graphs[batch] = self._capture(batch)

    def _capture(self, batch: int) -> _Captured:
        dev = self.cache.data.device
        tokens = torch.zeros(batch, dtype=torch.long, device=dev)
        positions = torch.zeros(batch, dtype=torch.long, device=dev)

        def step() -> torch.Tensor:
            return self.model.decode(tokens, positions, self.cache, kv_len=self.cache.max_len, static=True)

        graph, logits = _capture(step, dev, self.pool, self.warmup)
        return _Captured(graph, tokens, positions, logits)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The step's logits: the graph's own output tensor, overwritten by the next replay (copy it to keep it)."""
        g = self.graphs.get(tokens.shape[0])
        if g is None:
            raise RuntimeError(f"no CUDA graph captured for batch size {tokens.shape[0]} (call ensure first)")
        g.tokens.copy_(tokens)
        g.positions.copy_(positions)
        g.graph.replay()
        return g.logits


@dataclass
class _SpecCaptured:
    """The input tensors both graphs read (copied into before each replay) and each graph with its outputs."""

    tokens: torch.Tensor  # [2n] verify: each sequence's last token and its draft
    positions: torch.Tensor  # [2n] both steps
    slots: torch.Tensor  # [2n] 0, 0, 1, 1, ...
    hidden: torch.Tensor  # [2n, H] draft: the verify step's final hidden states
    next: torch.Tensor  # [2n] draft: the token after each row
    verify: tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]] | None = None
    draft: tuple[torch.cuda.CUDAGraph, torch.Tensor] | None = None


class SpeculativeGraphs:
    """Speculative decoding's verify and draft steps for ``n`` sequences, two rows each (sequence i in rows 2i and
    2i + 1, cache slot i), each through its own CUDA graph; one memory pool. The outputs are the graphs' own
    tensors, overwritten by the next replay of the same graph."""

    def __init__(self, model: Model, cache: KVCache, warmup: int = 2):
        if cache.data.device.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device")
        if model.drafter is None:
            raise ValueError("speculative graphs need the drafter loaded (Model.load_drafter)")
        self.model, self.cache, self.warmup = model, cache, warmup
        self.captured: dict[int, _SpecCaptured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def ensure(self, n: int) -> None:
        """Capture both steps for ``n`` sequences (before a prefill: capturing writes cache rows at position 0)."""
        if n in self.captured:
            return
        model, cache, dev = self.model, self.cache, self.cache.data.device
        env, drafter = model.env, model.drafter
        assert drafter is not None
        ids = torch.zeros(2 * n, dtype=torch.long, device=dev)
        c = _SpecCaptured(
            ids, ids.clone(), torch.arange(n, device=dev).repeat_interleave(2),
            torch.zeros(2 * n, env.cfg.hidden_size, dtype=env.dtype, device=dev), ids.clone(),
        )  # fmt: skip

        def verify():
            return model.decode(c.tokens, c.positions, cache, static=True, slots=c.slots, hidden=True)

        def draft():
            return drafter.decode(c.hidden, c.next, c.positions, c.slots, cache, cache.max_len, True)

        c.verify = _capture(verify, dev, self.pool, self.warmup)
        c.draft = _capture(draft, dev, self.pool, self.warmup)
        self.captured[n] = c

    def _get(self, rows: int) -> _SpecCaptured:
        c = self.captured.get(rows // 2)
        if c is None or rows % 2:
            raise RuntimeError(f"no speculative CUDA graphs captured for {rows} rows (call ensure first)")
        return c

    def verify(self, tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [2n, vocab], final hidden states [2n, H]) of the rows ``tokens`` at ``positions``."""
        c = self._get(tokens.shape[0])
        c.tokens.copy_(tokens)
        c.positions.copy_(positions)
        graph, out = c.verify
        graph.replay()
        return out

    def draft(self, hidden: torch.Tensor, next_tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The MTP module's logits [2n, vocab] for rows (h_j, t_{j+1}) at positions j."""
        c = self._get(hidden.shape[0])
        c.hidden.copy_(hidden)
        c.next.copy_(next_tokens)
        c.positions.copy_(positions)
        graph, out = c.draft
        graph.replay()
        return out
