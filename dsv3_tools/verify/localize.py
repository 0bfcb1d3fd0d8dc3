"""Where a failing comparison goes wrong: the first layer failing on the reference's inputs (teacher-forced), or
without those the first diverging layer of the free run (from the hidden-state summaries), and against a reference
checkpoint the tensors that differ and the files holding them."""

from __future__ import annotations

import torch

from .. import names as N
from ..checkpoint import Checkpoint
from ..config import ModelConfig
from .metrics import Thresholds, hidden_errors
from .reference import PromptRecord
from .result import Divergence, LayerResult, TensorDiff
from .run import has_mtp_tensors


def localize(
    ref: list[PromptRecord], cand: list[PromptRecord], tol: float, cfg: ModelConfig, skip: frozenset = frozenset()
) -> Divergence:
    """The first hidden-state row (embedding, layer 0, 1, ...) whose error exceeds ``tol``; rows in ``skip`` were
    not recorded on one side (the embedding under torchrun)."""
    R = ref[0].hidden_norm.shape[0]
    worst = torch.full((R,), float("nan"), dtype=torch.float64)
    where = [(None, None)] * R
    for i, (r, c) in enumerate(zip(ref, cand)):
        e, pos = hidden_errors(r.hidden_norm, r.hidden_proj, c.hidden_norm, c.hidden_proj)
        for k in range(R):
            if k in skip:
                continue
            ek = float(e[k])
            if ek == ek and not (ek <= float(worst[k])):  # NaN-safe max
                worst[k] = ek
                where[k] = (i, int(pos[k]))
    errs = [float(x) for x in worst]

    def label(k: int) -> str:
        return "embedding (model.embed_tokens)" if k == 0 else f"layer {k - 1} (model.layers.{k - 1})"

    for k, e in enumerate(errs):
        if e == e and e > tol:
            return Divergence(k - 1, label(k), e, where[k][0], where[k][1], errs)
    last = "after the last layer (model.norm / lm_head): no hidden-state row exceeds the tolerance"
    return Divergence(None, last, max((e for e in errs if e == e), default=0.0), None, None, errs)


def localize_layers(layers: list[LayerResult], logits_fail: bool) -> Divergence:
    """The first main layer failing its teacher-forced check (the report lists every one); when none fails, after
    the last layer (final norm / head) if the main logits fail, else the MTP module if it fails alone (its forced
    run also goes through the final norm, so a final-norm fault fails it too: the main logits tell first)."""
    errs = [r.stats.rel_max if r.stats is not None else r.logits.kl_max for r in layers]
    for r in layers:
        if r.failures and r.stats is not None:
            return Divergence(r.layer, r.where, r.stats.rel_max, r.stats.prompt, r.stats.position, errs)
    last = "after the last layer (model.norm / lm_head): every layer passes on the reference's inputs"
    worst = max((e for e, r in zip(errs, layers) if e == e and r.stats is not None), default=0.0)
    if logits_fail:
        return Divergence(None, last, worst, None, None, errs)
    for r in layers:
        if r.failures:
            return Divergence(r.layer, r.where, r.logits.kl_max, None, None, errs)
    return Divergence(None, last, worst, None, None, errs)


def _effective(ck: Checkpoint, name: str) -> torch.Tensor:
    from ..kernels.weight_dequant import weight_dequant_ref

    t = ck.read(name)
    if ck.tensors[name].dtype == "F8_E4M3" and N.scale_name(name) in ck.tensors:
        return weight_dequant_ref(t, ck.read(N.scale_name(name)), ck.config.block_size).float()
    return t.float()


def compare_tensors(
    ck: Checkpoint, ref: Checkpoint, layers: list[int | None], th: Thresholds, *, budget: int = 1 << 30
) -> list[TensorDiff]:
    """Tensor-level differences with a reference checkpoint: names and shapes everywhere, values in ``layers``
    (any format, compared as effective weights) and elsewhere where both store the same bytes format, within
    ``budget`` bytes read. Sorted: structural differences first, then by relative error."""
    out: list[TensorDiff] = []
    same_fmt = (ck.config.is_fp8, ck.config.quant and ck.config.quant.scale_fmt) == (
        ref.config.is_fp8,
        ref.config.quant and ref.config.quant.scale_fmt,
    )
    mtp_c, mtp_r = has_mtp_tensors(ck), has_mtp_tensors(ref)

    def relevant(name: str, other_has: bool) -> bool:
        if N.is_scale(name) and ck.config.is_fp8 != ref.config.is_fp8:
            return False
        layer = N.parse_hf(name).layer
        return not (layer is not None and ck.config.is_mtp_layer(layer) and not other_has)

    for name in ref.tensors:
        if name not in ck.tensors and relevant(name, mtp_c):
            out.append(TensorDiff(name, "missing", "in the reference checkpoint, not in this one"))
    for name in ck.tensors:
        if name not in ref.tensors and relevant(name, mtp_r):
            out.append(TensorDiff(name, "extra", "in this checkpoint, not in the reference"))
    common = [n for n in ck.tensors if n in ref.tensors]
    for name in common:
        a, b = ck.full_shape(name), ref.full_shape(name)
        if a != b:
            out.append(TensorDiff(name, "shape", f"{list(a)} vs reference {list(b)}"))
    structural = {d.name for d in out}

    def layer_of(name: str) -> int | None:
        return N.parse_hf(name).layer

    focus = [n for n in common if layer_of(n) in layers and n not in structural]
    rest = [n for n in common if layer_of(n) not in layers and n not in structural]
    spent = 0
    values: list[TensorDiff] = []
    for name in focus + rest:
        in_focus = layer_of(name) in layers
        ia, ib = ck.tensors[name], ref.tensors[name]
        # A tensor without a scale on either side (norms, router, embedding, head) no conversion changes: its
        # bytes must match whatever the weights' format.
        plain = ia.dtype == ib.dtype and N.scale_name(name) not in ck.tensors and N.scale_name(name) not in ref.tensors
        exact_fmt = (same_fmt and ia.dtype == ib.dtype) or (plain and not N.is_scale(name))
        if not in_focus and (not exact_fmt or spent > budget):
            continue
        if N.is_scale(name):
            if exact_fmt and not torch.equal(ck.read(name), ref.read(name)):
                s, r = ck.read(name).double(), ref.read(name).double()
                bad = (s != r).nonzero()
                where = [int(x) for x in bad[0]]
                values.append(
                    TensorDiff(
                        name,
                        "value",
                        f"{len(bad)} scale block(s) differ, first at {where}",
                        float((s - r).norm() / r.norm().clamp_min(1e-30)),
                    )
                )
            spent += ia.nbytes * 2
            continue
        if exact_fmt and torch.equal(ck.read(name), ref.read(name)):
            spent += ia.nbytes * 2
            continue
        a, b = _effective(ck, name), _effective(ref, name)
        spent += ia.nbytes + ib.nbytes
        if torch.equal(a, b):
            continue
        rel = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
        if rel != rel or rel > th.weight_tol or (exact_fmt and (plain or th.weight_tol == 0.0)):
            idx = (a != b).nonzero()
            first = [int(x) for x in idx[0]] if len(idx) else []
            values.append(TensorDiff(name, "value", f"{len(idx)} of {a.numel()} values differ, first at {first}", rel))
    values.sort(key=lambda d: -(d.rel_err if d.rel_err == d.rel_err else float("inf")))
    return out + values


def files_of(ck: Checkpoint, diffs: list[TensorDiff]) -> dict[str, int]:
    """Which files of ``ck`` hold the differing tensors (in the MP layout, every rank file holding a piece)."""
    out: dict[str, int] = {}
    for d in diffs:
        if d.name not in ck.tensors:
            continue
        infos = [p.info for p in ck.mp_parts[d.name]] if ck.layout == "mp" else [ck.tensors[d.name]]
        for i in infos:
            out[i.file] = out.get(i.file, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def localize_nonfinite(records: list[PromptRecord]) -> Divergence:
    """Without a reference: the first hidden-state row that is not finite."""
    R = records[0].hidden_norm.shape[0]
    for k in range(R):
        for i, r in enumerate(records):
            row = r.hidden_norm[k]
            if bool((~torch.isfinite(row) & ~torch.isnan(row)).any()) or (k > 0 and bool(torch.isnan(row).any())):
                pos = int((~torch.isfinite(row)).nonzero()[0])
                where = "embedding (model.embed_tokens)" if k == 0 else f"layer {k - 1} (model.layers.{k - 1})"
                return Divergence(k - 1, where, float("inf"), i, pos)
    return Divergence(None, "after the last layer (model.norm / lm_head)", float("inf"))
