"""Tensor parallelism for the model, with the official demo's semantics, over ``torch.distributed``.

Rank r of N holds: column-parallel slices (dim 0) of ``q_proj``/``q_b_proj``, ``kv_b_proj`` (its heads),
``gate_proj``/``up_proj`` of dense and shared MLPs, the embedding and the head (vocab rows); row-parallel slices
(dim 1) of ``o_proj`` and ``down_proj``, whose partial outputs are summed by an all-reduce; routed experts
``[r * E/N, (r+1) * E/N)`` whole, whose weighted outputs are summed by the same all-reduce as the shared expert.
The embedding is looked up in the local vocab slice (zero elsewhere) and all-reduced; head logits are gathered.
The split dims come from the name table (``names.TABLE``), as in ``shard``.

Only activations travel (float32 or bf16), so gloo's lack of FP8 support never matters: each rank reads its own
weights from its own ``model{r}-mp{N}.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ShardingError
from .runtime import dist_info


@dataclass(frozen=True)
class Group:
    """This process's place in the tensor-parallel group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (a no-op on one rank)."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dim, in rank order (the vocab-split head)."""
        if not self.active:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)


def current_group() -> Group:
    """The initialized default process group, if any (``torchrun`` + ``runtime.init_distributed``)."""
    return Group(*dist_info())


def check_degree(cfg, group: Group) -> None:
    """The model's dims must divide over the group: heads, experts, MLP widths, vocab."""
    w = group.world
    dims = {
        "num_attention_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size * n_shared_experts": cfg.moe_intermediate_size * max(cfg.n_shared_experts, 1),
        "vocab_size": cfg.vocab_size,
    }
    bad = [f"{k} = {v}" for k, v in dims.items() if v % w]
    if bad:
        raise ShardingError(f"cannot run tensor-parallel over {w} ranks: {', '.join(bad)} not divisible by {w}")


def local_slice(n: int, group: Group) -> tuple[int, int]:
    """Rows [lo, hi) of a dim of size ``n`` split evenly over the group."""
    per = n // group.world
    return group.rank * per, (group.rank + 1) * per
