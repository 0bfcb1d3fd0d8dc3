"""The decoding step captured in a CUDA graph, once per batch size.

A step of a large MoE model at small batch is dominated by kernel launches (hundreds per layer); replaying a
captured graph launches them all at once. The step is capturable because ``Model.decode(..., static=True)`` has
fixed shapes for a batch size (it attends over the whole cache length, masked) and never reads the device from the
host (every expert runs with a zero weight where it was not chosen, the rope tables and the cache rows are indexed
on the device). Tokens and positions are copied into the graph's own input tensors before each replay.

Capturing runs the step, which writes cache rows at position 0 of the first slots; the engine therefore captures a
batch size before it prefills a batch of that size (``ensure``), never in the middle of one. Exercised by
``tests/test_gpu.py`` on a CUDA machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import KVCache, Model


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

        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up (lazy initializations, autotuning) outside the capture
            for _ in range(self.warmup):
                step()
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = step()
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
