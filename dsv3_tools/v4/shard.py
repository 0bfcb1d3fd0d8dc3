"""``shard`` on DeepSeek-V4: the official model-parallel layout (docs/format-v4.md 5), planned here and written by
the shard stage (``shard.run_shard``: streaming, bounded memory, resume).

``model{r}-mp{N}.safetensors`` holds the tensors the official ``convert.py`` writes for rank r, under the same names
as the Hugging Face folder (it renames nothing): ``embed``, ``head``, ``attn.wq_b``, ``attn.wo_a``, ``attn_sink``,
the indexer's ``wq_b`` and ``weights_proj`` split on dim 0, ``attn.wo_b`` on dim 1 (scales alongside), routed experts
whole (rank r owns ``[r*E/N, (r+1)*E/N)``), everything else replicated, shared experts included. Then as the
converter does per rank: ``wo_a`` dequantized to BF16 (``bf16(f32(w) * s)`` per 128x128 block) and its scale dropped;
FP4 experts relabelled as safetensors ``F4`` with their logical shape [out, in] (the same bytes; what safetensors
writes for torch ``float4_e2m1fn_x2``). Unlike V3's demo, V4's builds the MTP module, so it stays in the rank files
(``--mtp drop`` leaves it out and says ``n_mtp_layers: 0``). Beside them, as for V3: ``config.json`` (the HF config,
which the demo's ``AutoTokenizer`` call reads), ``model_args.json`` with the demo's ``ModelArgs`` (``v4/modelargs.py``;
its ``--config``), the tokenizer files, the manifest.

N must divide the experts and every split dim, keep FP8 splits on 128 blocks, and divide ``o_groups`` (the demo gives
each rank whole output groups, model.py:451; convert.py does not check it): V4-Flash takes 1, 2, 4, 8 and V4-Pro
1, 2, 4, 8, 16. The demo loads rank files with ``strict=False``, so ``verify`` checks each rank file's key set itself.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint
from ..shard import Item, Rule, ShardPlan, check_degree, degrees, finish_plan
from ..stfile import TensorInfo
from . import names as V
from .config import V4Config
from .modelargs import demo_model_args
from .validate import resolve_format


def rules(cfg: V4Config, tensors: list[tuple[str, tuple[int, ...], str]]) -> list[Rule]:
    """The constraints ``(name, shape, dtype)`` tensors put on N, deduplicated, in tensor order."""
    out: dict[tuple[str, int, int], Rule] = {}

    def add(r: Rule) -> None:
        out.setdefault((r.what, r.size, r.unit), r)

    for name, shape, dtype in tensors:
        n = V.parse(name)
        if n.split == V.EXPERT:
            add(Rule(name, "n_routed_experts", cfg.n_routed_experts, 1))
        elif isinstance(n.split, int):
            if n.row.name == "attn.wo_a.weight":
                add(Rule(name, "o_groups (the demo gives each rank whole output groups)", cfg.o_groups, 1))
            add(Rule(name, f"dim {n.split} of size", shape[n.split], V.BLOCK if dtype == "F8_E4M3" else 1))
    return list(out.values())


def valid_mp_degrees(cfg: V4Config, fmt: V.Format) -> list[int]:
    """Every model-parallel degree a V4 checkpoint of ``cfg`` stored in ``fmt`` can be sharded into."""
    return degrees(rules(cfg, [(s.name, s.shape, s.dtype) for s in V.expected_tensors(cfg, fmt).values()]))


def plan_v4_shard(ck: Checkpoint, dst: str | Path, mp: int, mtp: str) -> ShardPlan:
    """The plan of sharding the opened, validated V4 folder ``ck`` into ``mp`` ranks in ``dst``."""
    cfg = ck.config
    fmt = resolve_format(cfg, ck.tensors)
    order = {f: i for i, f in enumerate(sorted(ck.files))}
    infos = sorted(ck.tensors.values(), key=lambda i: (order[i.file], i.start))
    kept = [i for i in infos if mtp == "keep" or not V.is_mtp_name(i.name)]
    constraints = rules(cfg, [(i.name, i.shape, i.dtype) for i in kept])
    check_degree(constraints, mp)
    per = cfg.n_routed_experts // mp
    items = [it for it in (_item(ck, i, mp, per, fmt) for i in kept) if it is not None]
    args = demo_model_args(cfg, fmt, mtp=mtp == "keep")
    return finish_plan(ck, Path(dst), mp, mtp, fmt.dense, items, len(infos) - len(kept), degrees(constraints), args)


def _item(ck: Checkpoint, info: TensorInfo, mp: int, per: int, fmt: V.Format) -> Item | None:
    """Where one input tensor goes (None: nowhere, like wo_a's scale once wo_a is dequantized)."""
    n = V.parse(info.name)
    spec = V.mp_spec(V.Spec(info.name, info.shape, info.dtype), n, fmt, mp)
    if spec is None:
        return None
    ranks = (n.expert // per,) if n.split == V.EXPERT else tuple(range(mp))
    scale = ck.tensors[V.scale_name(info.name)] if spec.dtype == "BF16" and info.dtype == "F8_E4M3" else None
    return Item(info, info.name, n.split, ranks, spec.shape, spec.dtype, False, scale)
