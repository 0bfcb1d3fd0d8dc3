"""The FP8 kernels: torch references against arithmetic written here, and the Triton kernels against the references.

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1`` (set by conftest), whose known faults shape the
comparisons: f32 -> bf16 stores truncate instead of rounding to nearest even, and f32 -> fp8 casts lose the carry
on a few percent of values. So the kernels are compared exactly where the interpreter is exact (f32 outputs, the
scales) and to one unit in the last place where it is not; tests/test_gpu.py checks bit identity on a GPU.
Shapes stay small: the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3_tools.kernels.act_quant import act_quant, act_quant_ref
from dsv3_tools.kernels.fp8_gemm import GemmConfig, fp8_gemm, fp8_gemm_ref
from dsv3_tools.kernels.weight_dequant import weight_dequant, weight_dequant_ref
from dsv3_tools.kernels.weight_quant import weight_quant_ref

INTERPRETED = not torch.cuda.is_available()
# These tests hand CPU tensors to the Triton kernels, which only the interpreter runs; on a GPU machine
# tests/test_gpu.py checks the kernels instead (bit-exactly).
interpreted = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs the interpreter (no CUDA)")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _where(mask: torch.Tensor) -> str:
    idx = mask.nonzero()
    return "none" if not len(idx) else f"{len(idx)} elements, first at {tuple(idx[0].tolist())}"


# ---------------------------------------------------------------------- act_quant
def _act_quant_by_hand(x: torch.Tensor, block: int, ue8m0: bool) -> tuple[list[list[float]], torch.Tensor]:
    """Scales from Python floats, per row and group, and the f32 quotients x / s before the fp8 rounding."""
    M, K = x.shape
    scales, q = [], torch.empty(M, K)
    for i in range(M):
        row = []
        for g in range(0, K, block):
            grp = x[i, g : g + block].float()
            amax = max(float(grp.abs().max()), 1e-4)
            s = float(torch.tensor(amax, dtype=torch.float32) / torch.tensor(448.0))  # one f32 rounding
            if ue8m0:
                s = 2.0 ** math.ceil(math.log2(s))
            row.append(s)
            q[i, g : g + block] = grp / torch.tensor(s, dtype=torch.float32)
        scales.append(row)
    return scales, q


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_act_quant_ref_by_hand(fmt: str | None) -> None:
    x = torch.randn(5, 300, generator=_gen(0)) * 3
    x[1, 128:256] = 0  # an all-zero group takes the 1e-4 floor
    y, s = act_quant_ref(x, 128, fmt)
    scales, q = _act_quant_by_hand(x, 128, fmt == "ue8m0")
    assert s.shape == (5, 3) and s.dtype == torch.float32
    assert s.tolist() == scales
    assert s[1, 1].item() == pytest.approx(1e-4 / 448 if fmt is None else 2.0**-22, rel=1e-6)
    assert torch.equal(y.float(), q.to(torch.float8_e4m3fn).float())
    assert y[1, 128:256].float().abs().max() == 0
    assert y.float().abs().max() <= 448


@interpreted
@pytest.mark.parametrize("fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(9, 300), (3, 128), (2, 3, 64)])
def test_act_quant_triton_vs_ref(fmt: str | None, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=_gen(1)) * 5
    x.view(-1, shape[-1])[0, : min(128, shape[-1])] = 0
    y, s = act_quant(x, 128, fmt)
    yr, sr = act_quant_ref(x, 128, fmt)
    assert y.shape == yr.shape and s.shape == sr.shape
    assert torch.equal(s, sr), f"scales differ at {_where(s != sr)}"
    diff = (y.float() - yr.float()).abs()
    # The interpreter's lost carry: a quotient that rounds up to a power of two keeps its exponent, so the value
    # comes out halved (or 0 for the smallest subnormal, 2**-9). Every difference must be exactly that.
    r, g = yr.float(), y.float()
    pow2 = r.abs() == torch.exp2(torch.log2(r.abs().clamp(min=2.0**-9)).round())
    carry = pow2 & ((g == r / 2) | ((r.abs() == 2.0**-9) & (g == 0)))
    bad = (diff > 0) & ~carry
    assert not bad.any(), f"differences other than the interpreter's lost carry at {_where(bad)}"
    assert (diff > 0).float().mean() < 0.06


# ---------------------------------------------------------------------- weight_dequant
@interpreted
@pytest.mark.parametrize("shape", [(200, 300), (130, 129), (64, 64)])
def test_weight_dequant_triton(shape: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=_gen(2)) * 0.05
    w[:128, :128] = 0  # an all-zero block
    q, s = weight_quant_ref(w)
    full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    exact = q.float() * full
    got32 = weight_dequant(q, s, out_dtype=torch.float32)
    assert torch.equal(got32, exact), f"f32 products differ at {_where(got32 != exact)}"
    ref = weight_dequant_ref(q, s)
    assert torch.equal(ref, exact.to(torch.bfloat16))
    got = weight_dequant(q, s)
    assert got.dtype == torch.bfloat16 and got.shape == shape
    # The interpreter's truncating bf16 stores: at most one bf16 step from the rounded value.
    step = torch.exp2(torch.floor(torch.log2(ref.float().abs().clamp(min=1e-30))) - 7)
    bad = (got.float() - ref.float()).abs() > step
    assert not bad.any(), f"more than one bf16 step apart at {_where(bad)}"


def test_weight_dequant_rejects_bad_scale_shape() -> None:
    q = torch.zeros(200, 300).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale shape"):
        weight_dequant(q, torch.ones(1, 3))


# ---------------------------------------------------------------------- fp8_gemm
def _gemm_by_blocks(a, a_s, b, b_s) -> torch.Tensor:
    """f64, one K block at a time: sum_k (A_k @ B_k.T) * a_s[:, k] * b_s[n // 128, k]."""
    M, K = a.shape
    N = b.shape[0]
    out = torch.zeros(M, N, dtype=torch.float64)
    row_scale = b_s.double().repeat_interleave(128, 0)[:N]
    for k in range(0, K, 128):
        kb = k // 128
        part = a[:, k : k + 128].double() @ b[:, k : k + 128].double().T
        out += part * a_s[:, kb, None].double() * row_scale[None, :, kb]
    return out


@interpreted
@pytest.mark.parametrize("mnk", [(21, 200, 300), (3, 129, 256), (16, 64, 128)])
def test_fp8_gemm_ref_and_triton(mnk: tuple[int, int, int]) -> None:
    M, N, K = mnk
    a = torch.randn(M, K, generator=_gen(3))
    a[0, :128] = 0  # an all-zero activation group
    w = torch.randn(N, K, generator=_gen(4))
    aq, a_s = act_quant_ref(a)
    q, w_s = weight_quant_ref(w)
    want = _gemm_by_blocks(aq, a_s, q, w_s)
    ref = fp8_gemm_ref(aq, a_s, q, w_s, torch.float32)
    got = fp8_gemm(aq, a_s, q, w_s, torch.float32)
    for name, t in (("reference", ref), ("triton", got)):
        assert t.shape == (M, N)
        err = ((t.double() - want).norm() / want.norm()).item()
        assert err < 1e-6, f"{name} {mnk}: relative error {err:.2e}"
    if K > 128:
        assert got[0].abs().max() > 0  # a zero group does not zero the rest of the row


def test_fp8_gemm_batched_shape_and_bf16_output() -> None:
    a = torch.randn(2, 5, 256, generator=_gen(5))
    q, w_s = weight_quant_ref(torch.randn(130, 256, generator=_gen(6)))
    aq, a_s = act_quant_ref(a)
    out = fp8_gemm_ref(aq, a_s, q, w_s)
    assert out.shape == (2, 5, 130) and out.dtype == torch.bfloat16
    flat = fp8_gemm_ref(aq.reshape(10, 256), a_s.reshape(10, 2), q, w_s)
    assert torch.equal(out.reshape(10, 130), flat)


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
def test_fp8_path_error_is_activation_quantization_level(fmt: str | None) -> None:
    """Quantized activations and weights vs the f32 product on random normal data: a few percent, no more."""
    a = torch.randn(64, 1024, generator=_gen(7))
    w = torch.randn(512, 1024, generator=_gen(8))
    q, w_s = weight_quant_ref(w, scale_fmt=fmt)
    out = fp8_gemm_ref(*act_quant_ref(a, 128, fmt), q, w_s, torch.float32)
    exact = a @ w.T
    err = ((out - exact).norm() / exact.norm()).item()
    assert 1e-2 < err < 6e-2, err


@interpreted
@pytest.mark.parametrize(
    "cfg",
    [
        GemmConfig(16, 64, 4, 3, tma=1),
        GemmConfig(16, 64, 4, 3, tma=1, persistent=1, maxnreg=168),
        GemmConfig(16, 64, 4, 3, tma=1, persistent=2, prefetch=1, group_m=2),
        GemmConfig(16, 64, 4, 3, tma=1, tma_store=1),
        GemmConfig(16, 128, 4, 3, tma=1, persistent=1, prefetch=1, tma_store=1, group_m=16),
        GemmConfig(16, 256, 4, 3, tma=1, prefetch=1),  # a tile wider than a weight block: per-column scales
        GemmConfig(16, 256, 4, 3),  # the pointer kernel, likewise
        GemmConfig(16, 64, 4, 3, split_k=2),  # split-K: 3 K blocks in shares of 1 and 2
        GemmConfig(16, 64, 4, 3, split_k=3),
        GemmConfig(16, 256, 4, 3, split_k=2),
        GemmConfig(16, 64, 4, 3, tma=1, tma_store=1, split_k=2),  # no TMA store with split-K: the partials
        GemmConfig(16, 128, 4, 3, tma=1, persistent=1, prefetch=1, split_k=3),
        GemmConfig(16, 64, 4, 3, split_k=8),  # more splits than K blocks: one per block
    ],
)
def test_fp8_gemm_tma_kernel_interpreted(cfg: GemmConfig) -> None:
    """The TMA kernel (used on the GPU from M = 1024) and its variants, on ragged M, N and K: with a persistent
    grid of 2 or 4 programs (the interpreter's "GPU" has 2 SMs) each program loops over several of the tiles;
    with split-K each tile's partial sums meet in the workspace."""
    M, N, K = 24, 200, 320
    aq, a_s = act_quant_ref(torch.randn(M, K, generator=_gen(9)))
    q, w_s = weight_quant_ref(torch.randn(N, K, generator=_gen(10)))
    want = _gemm_by_blocks(aq, a_s, q, w_s)
    got = fp8_gemm(aq, a_s, q, w_s, torch.float32, config=cfg)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-6, f"{cfg}: relative error {err:.2e}"


@interpreted
def test_fp8_gemm_tma_schedule_on_rows_the_copy_engine_cannot_take() -> None:
    """Activations as a column slice of a wider tensor whose row stride (264 bytes) is not a multiple of 16: a TMA
    schedule falls back to the pointer kernel instead of failing on the tensor descriptor."""
    M, N, K = 24, 200, 256
    wide, a_s = act_quant_ref(torch.randn(M, K + 8, generator=_gen(17))[:, :K].contiguous())
    aq = torch.zeros(M, K + 8, dtype=wide.dtype)
    aq[:, :K] = wide
    view = aq[:, :K]  # unit stride along K, row stride K + 8
    q, w_s = weight_quant_ref(torch.randn(N, K, generator=_gen(18)))
    got = fp8_gemm(view, a_s, q, w_s, torch.float32, config=GemmConfig(16, 64, 4, 3, tma=1, split_k=2))
    want = _gemm_by_blocks(wide, a_s, q, w_s)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-6, f"relative error {err:.2e}"


@interpreted
def test_fp8_gemm_split_k_is_deterministic_and_leaves_counters_zero() -> None:
    """Split-K sums its partials in split order whichever program finishes last: two runs agree bit for bit, and
    every tile counter is back at zero for the next call (a counter left elsewhere would make the next call's
    programs mistake which of them arrives last: a tile summed before its partials are written, or never)."""
    from dsv3_tools.kernels import fp8_gemm as mod

    M, N, K = 40, 200, 640
    aq, a_s = act_quant_ref(torch.randn(M, K, generator=_gen(13)))
    q, w_s = weight_quant_ref(torch.randn(N, K, generator=_gen(14)))
    cfg = GemmConfig(16, 64, 4, 3, split_k=3)
    first = fp8_gemm(aq, a_s, q, w_s, torch.float32, config=cfg)
    counters = [entry[1] for (dev, _), entry in mod._SPLIT.items() if dev == aq.device]
    assert counters and all(int(t.abs().sum()) == 0 for t in counters)
    assert torch.equal(first, fp8_gemm(aq, a_s, q, w_s, torch.float32, config=cfg))
    want = _gemm_by_blocks(aq, a_s, q, w_s)
    err = ((first.double() - want).norm() / want.norm()).item()
    assert err < 1e-6, f"relative error {err:.2e}"


@interpreted
@pytest.mark.parametrize("K", [320, 4096])
def test_fp8_gemm_gluon_schedule_falls_back_to_triton(K: int) -> None:
    """``WS_128`` (pick_config's choice from M = 1024) runs the Hopper Gluon kernel only where it can; anywhere
    else (here: the interpreter) fp8_gemm falls back to a Triton schedule: the result must equal that schedule's
    bit for bit and the exact block-by-block product to f32 rounding. (SHORT_K and LONG_K compute the same sums,
    so this does not tell which of the two ran.)"""
    from dsv3_tools.kernels.fp8_gemm import LONG_K, SHORT_K, WS_128, pick_config

    assert pick_config(1024, 7168, K) == WS_128
    M, N = 24, 200
    aq, a_s = act_quant_ref(torch.randn(M, K, generator=_gen(11)))
    q, w_s = weight_quant_ref(torch.randn(N, K, generator=_gen(12)))
    got = fp8_gemm(aq, a_s, q, w_s, torch.float32, config=WS_128)
    same = fp8_gemm(aq, a_s, q, w_s, torch.float32, config=LONG_K if K >= 4096 else SHORT_K)
    assert torch.equal(got, same)
    want = _gemm_by_blocks(aq, a_s, q, w_s)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-6, f"relative error {err:.2e}"


_PDL_PTX_CHECK = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsv3_tools.kernels import fp8_gemm as mod

fn_ptr, fn_tma = mod._build()
memory = re.compile(r"^\s*(@%p\d+\s+)?(ld|st|atom|red|cp\.async|prefetch)\.(?!param|shared|local|const)")
out = {}
for kind, split, pdl in [("ptr", 1, 2), ("ptr", 2, 1), ("tma", 1, 1), ("tma", 2, 2)]:
    fn = fn_tma if kind == "tma" else fn_ptr
    ptrs = dict(ws_ptr="*fp32", cnt_ptr="*i32", a_s_ptr="*fp32", b_s_ptr="*fp32")
    if kind == "ptr":
        sig = dict(a_ptr="*fp8e4nv", b_ptr="*fp8e4nv", c_ptr="*bf16", **ptrs)
        sig.update({n: "i32" for n in ("M", "N", "K", "stride_am", "stride_bn", "stride_cm", "KB")})
        const = dict(SB_N=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, EVEN_K=True, ROW_SCALE=True)
    else:
        sig = dict(a_desc="tensordesc<fp8e4nv[64, 128]>", b_desc="tensordesc<fp8e4nv[128, 128]>", c="*bf16", **ptrs)
        sig.update({n: "i32" for n in ("M", "N", "stride_cm", "KB", "num_programs")})
        const = dict(SB_N=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, ROW_SCALE=True, PREFETCH=False,
                     TMA_STORE=False)
    const.update(SPLIT_K=split, PDL=pdl)
    sig.update({n: "constexpr" for n in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    src = ASTSource(fn, sig, {(fn.arg_names.index(n),): v for n, v in const.items()}, attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3)).asm["ptx"]
    body = ptx[ptx.index(".entry"):].splitlines()
    wait = [i for i, line in enumerate(body) if "griddepcontrol.wait" in line]
    early = [] if not wait else [
        line.strip() for line in body[: wait[0]] if memory.match(line) or re.match(r"^\$L__BB\w*:", line.strip())
    ]
    later = 0 if not wait else sum(1 for line in body[wait[0]:] if memory.match(line))
    out[f"{kind} split {split} pdl {pdl}"] = dict(wait=len(wait), early=early[:3], later=later)
print(json.dumps(out))
"""


def test_dependent_launch_waits_before_any_global_access() -> None:
    """With programmatic dependent launch (GemmConfig.pdl) a kernel may start before the previous one has finished:
    no global load, store or atomic may come before its ``griddepcontrol.wait``. The kernels are compiled for Hopper
    (sm_90) without a GPU (in a subprocess: this one runs Triton's interpreter); in the PTX the wait must sit in the
    entry block (before any label) ahead of every global memory access, so that it runs first on every path.
    (tests/test_gpu.py checks the same on a GPU by chaining calls that read each other's output.)"""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PDL_PTX_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for variant, r in json.loads(run.stdout.splitlines()[-1]).items():
        assert r["wait"] == 1, f"{variant}: {r['wait']} griddepcontrol.wait instructions"
        assert not r["early"], f"{variant}: before griddepcontrol.wait: {r['early']}"
        assert r["later"] > 0, f"{variant}: no global access found at all (the pattern is stale)"


@pytest.mark.parametrize("scale_kind", ["f32", "pow2", "v3.1"])
def test_requantizing_with_the_original_scales_gives_the_original_bytes(scale_kind: str) -> None:
    """Every E4M3 byte (NaN excepted: no quantizer makes one), dequantized with any scale, re-quantized with that scale
    as ``prev``: the same bytes and the same scale come back (ragged edges, subnormals, +-0 and +-448 included);
    a tile whose values are changed gets weight_quant_ref's fresh scale instead."""
    g = torch.Generator().manual_seed(3)
    rows, cols = 300, 420  # 3 x 4 blocks, ragged on both edges
    raw = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8)
    raw[(raw & 0x7F) == 0x7F] = 0x00
    raw[0, :256] = torch.arange(256, dtype=torch.uint8)
    raw[0, 127], raw[0, 255] = 0x7E, 0xFE  # +-448 in place of the NaNs
    q0 = raw.view(torch.float8_e4m3fn)
    s0 = torch.exp2(torch.randint(-20, 5, (3, 4), generator=g).float())
    if scale_kind == "f32":
        s0 = s0 * (1 + torch.rand((3, 4), generator=g))
    elif scale_kind == "v3.1":
        s0 = s0 * 1.3228756555322954
    x = weight_dequant_ref(q0, s0, (128, 128))
    q, s = weight_quant_ref(x, (128, 128), "ue8m0" if scale_kind == "pow2" else None, prev=s0)
    assert torch.equal(s, s0)
    diff = (q.view(torch.uint8) != raw).nonzero()
    assert not len(diff), f"{len(diff)} bytes differ, first at {diff[0].tolist()}"
    x2 = x.clone()
    x2[200:250, 0:10] *= 3  # tile (1, 0) changed
    q2, s2 = weight_quant_ref(x2, (128, 128), None, prev=s0)
    fresh_q, fresh_s = weight_quant_ref(x2, (128, 128), None)
    assert s2[1, 0] == fresh_s[1, 0] and torch.equal(s2[0], s0[0]) and torch.equal(s2[2], s0[2])
    assert torch.equal(q2.view(torch.uint8)[128:256, :128], fresh_q.view(torch.uint8)[128:256, :128])


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter check; tests/test_gpu.py runs it on CUDA")
def test_moe_gemm_matches_the_reference_under_the_interpreter() -> None:
    """Each (token, expert) pair's row times its expert's weight, routing on the device: ragged N and K, experts
    chosen by several tokens, experts chosen by none; BF16 weights (f32 rows: exact to f32 rounding) and FP8 weights
    with block scales (the interpreter truncates f32 -> bf16 in the in-tile dequantization: loose)."""
    from dsv3_tools.kernels.moe_gemm import moe_gemm, moe_gemm_ref

    g = torch.Generator().manual_seed(4)
    E, N, K, T, k = 6, 200, 320, 5, 3
    w32 = torch.randn(E, N, K, generator=g) / K**0.5
    quant = [weight_quant_ref(w32[e], (128, 128)) for e in range(E)]
    wq, s = torch.stack([q for q, _ in quant]), torch.stack([sc for _, sc in quant])
    x = torch.randn(T, K, generator=g)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # expert E-1: chosen by none
    rows, experts = x.repeat_interleave(k, 0), idx.reshape(-1)
    for w, sc, tol in ((w32.to(torch.bfloat16), None, 1e-6), (wq, s, 2e-2)):
        want = moe_gemm_ref(rows, w, sc, experts)
        got = moe_gemm(rows, w, sc, experts, max_per_expert=T)
        rel = (got - want).norm() / want.norm()
        assert rel < tol, (w.dtype, float(rel))


@pytest.mark.skipif(not INTERPRETED, reason="the interpreter check")
def test_grouped_experts_decode_the_same_as_every_expert(tiny_fp8) -> None:
    """The decode step's MoE through moe_gemm (stacked experts, chosen ones read once) equals running every local
    expert with zero weights where not chosen; the stacks are the experts' only copy."""
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.model import load_model

    model = load_model(open_checkpoint(tiny_fp8), engine="torch", stream=False, dtype=torch.float32)
    model.env.grouped_moe = True
    model.new_cache(2, 16)  # prepares the decode weights: stacks the experts
    layer = next(lay for lay in model.layers if lay.moe)
    w13, w2 = layer.grouped
    gate0 = next(iter(layer.experts.values()))[0]
    assert gate0.w.data_ptr() == w13[0].data_ptr()  # a view of the stack, not a copy
    x = torch.randn(3, model.env.cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    grouped = layer.moe_ffn(x, static=True)
    layer.grouped = None
    every = layer.moe_ffn(x, static=True)
    assert float((grouped - every).norm() / every.norm()) < 1e-5


# ---------------------------------------------------------------------- the batch-invariant decode kernels
def _rows_invariant(f, args: tuple, what: str, counts=(1, 2, 3, 17)) -> torch.Tensor:
    """``f(*args)`` with all rows, and the first M rows of it bit-identical to ``f`` on those M rows alone (the
    first argument's leading dim is the rows)."""
    full = f(*args)
    for M in counts:
        part = f(args[0][:M], *args[1:])
        assert torch.equal(part, full[:M]), (
            f"{what}: {M} rows alone differ from the batch's: {_where(part != full[:M])}"
        )
    return full


@interpreted
def test_rowwise_matmul_values_and_row_invariance() -> None:
    """``rowwise.matmul`` against float64 products (F32 operands: the interpreter's dot is exact to F32 rounding),
    2-D and per-head batched with transposed strided views (the absorbed attention's), ragged shapes; a row's
    result does not depend on the row count."""
    from dsv3_tools.kernels.rowwise import matmul

    g = _gen(21)
    x, w = torch.randn(40, 300, generator=g), torch.randn(70, 300, generator=g)
    got = _rows_invariant(matmul, (x, w), "2-D")
    assert torch.allclose(got.double(), x.double() @ w.double().T, rtol=0, atol=1e-4), float(
        (got.double() - x.double() @ w.double().T).abs().max()
    )
    q, wk = torch.randn(40, 6, 48, generator=g), torch.randn(6, 24, 80, generator=g)  # [B, h, d], [h, d, c]

    def per_head(q: torch.Tensor) -> torch.Tensor:
        out = torch.empty(q.shape[0], 6, 80)
        matmul(q[..., :24].transpose(0, 1), wk.transpose(1, 2), out=out.transpose(0, 1))
        return out

    got = _rows_invariant(per_head, (q,), "per head")
    want = torch.einsum("bhd,hdc->bhc", q[..., :24].double(), wk.double())
    assert torch.allclose(got.double(), want, rtol=0, atol=1e-4), float((got.double() - want).abs().max())
    with pytest.raises(ValueError, match="one dtype"):
        matmul(x, w.double())


@interpreted
def test_rowwise_rms_norm_and_choice_sum() -> None:
    """The row RMSNorm against the model's torch form (F32: to rounding), the experts' weighted sum against the
    same sum written out in choice order (bit-identical: the same F32 operations in the same order); both
    row-invariant."""
    from dsv3_tools.kernels.rowwise import choice_sum, rms_norm
    from dsv3_tools.model import rms_norm as rms_norm_torch

    g = _gen(22)
    x, w = torch.randn(30, 320, generator=g) * 3, torch.rand(320, generator=g) + 0.5
    got = _rows_invariant(lambda x: rms_norm(x, w, 1e-6), (x,), "rms_norm")
    assert torch.allclose(got, rms_norm_torch(x, w, 1e-6), rtol=2e-6, atol=0)
    y, wc = torch.randn(30, 3, 320, generator=g), torch.rand(30, 3, generator=g)
    got = _rows_invariant(lambda y: choice_sum(y, wc[: y.shape[0]]), (y,), "choice_sum")
    want = torch.zeros(30, 320)
    for j in range(3):
        want += y[:, j] * wc[:, j, None]
    assert torch.equal(got, want), _where(got != want)


@interpreted
def test_rowwise_mla_decode_attends_to_its_own_positions_only() -> None:
    """MLA decode attention against the softmax written out per row (float64), with ragged latent and rope widths
    (160 and 24: masked tiles), rows in any slots, at positions on both sides of a 32-position block; positions
    after a row's own are filled with NaN and never read; row-invariant."""
    from dsv3_tools.kernels.rowwise import mla_decode

    g = _gen(23)
    B, H, C, R, S = 20, 5, 160, 24, 70
    ql, qp = torch.randn(B, H, C, generator=g), torch.randn(B, H, R, generator=g)
    cache = torch.randn(B + 2, S, C + R, generator=g)
    slots = torch.randperm(B + 2, generator=g)[:B]
    pos = torch.tensor([0, 31, 32, 33, 63, 64, 69] + torch.randint(0, S, (B - 7,), generator=g).tolist())
    for b in range(B):
        cache[slots[b], pos[b] + 1 :] = float("nan")
    got = _rows_invariant(
        lambda ql: mla_decode(ql, qp[: ql.shape[0]], cache, slots[: ql.shape[0]], pos[: ql.shape[0]], 0.1),
        (ql,), "mla_decode",
    )  # fmt: skip
    for b in range(B):
        c = cache[slots[b], : pos[b] + 1].double()
        s = (ql[b].double() @ c[:, :C].T + qp[b].double() @ c[:, C:].T) * 0.1
        want = s.softmax(-1) @ c[:, :C]
        assert torch.allclose(got[b].double(), want, rtol=0, atol=1e-5), (b, float((got[b] - want).abs().max()))


@interpreted
def test_moe_gemm_invariant_tiles_over_many_rows_of_one_expert() -> None:
    """``moe_gemm(invariant=True)``: 16-row tiles, an expert chosen by up to 40 tokens (three row tiles): each pair's
    row against the reference (F32 rows: exact to F32 rounding), and the first tokens' pairs bit-identical to a call
    with those tokens only."""
    from dsv3_tools.kernels.moe_gemm import moe_gemm, moe_gemm_ref

    g = _gen(24)
    E, N, K, T, k = 3, 70, 150, 40, 2
    w = torch.randn(E, N, K, generator=g).to(torch.bfloat16)
    x = torch.randn(T, K, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    rows, experts = x.repeat_interleave(k, 0), idx.reshape(-1)
    full = moe_gemm(rows, w, None, experts, max_per_expert=T, invariant=True)
    want = moe_gemm_ref(rows, w, None, experts)
    assert torch.allclose(full, want, rtol=0, atol=1e-4), float((full - want).abs().max())
    for t in (1, 7, 17):
        part = moe_gemm(rows[: t * k], w, None, experts[: t * k], max_per_expert=t, invariant=True)
        assert torch.equal(part, full[: t * k]), (t, _where(part != full[: t * k]))


@interpreted
def test_decode_rows_do_not_depend_on_the_batch_under_the_interpreter(tiny_fp8) -> None:
    """The whole decode step on the Triton engine (tiny model, F32): a sequence's logits are bit-identical alone
    and in a batch, and as the second row of its own sequence (speculative decoding's verify step) and alone at
    that position; and it agrees with the step on the kernels used before to F32 rounding. tests/test_gpu.py checks
    the same in BF16 on a GPU."""
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.model import load_model

    model = load_model(open_checkpoint(tiny_fp8), engine="triton", stream=False, dtype=torch.float32,
                       batch_invariant=True)  # fmt: skip
    assert model.env.invariant_decode
    cache = model.new_cache(3, 40)
    model.prefill([[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10]], cache)
    batch = model.decode(torch.tensor([20, 21, 22]), torch.tensor([5, 3, 8]), cache, kv_len=9)
    alone = model.decode(torch.tensor([21]), torch.tensor([3]), cache, slots=torch.tensor([1]))
    assert torch.equal(alone[0], batch[1]), _where(alone[0] != batch[1])
    nxt = model.decode(torch.tensor([30]), torch.tensor([4]), cache, slots=torch.tensor([1]))
    two = model.decode(torch.tensor([21, 30]), torch.tensor([3, 4]), cache, slots=torch.tensor([1, 1]))
    assert torch.equal(two[0], batch[1]) and torch.equal(two[1], nxt[0]), (_where(two[0] != batch[1]),
                                                                           _where(two[1] != nxt[0]))  # fmt: skip
    # and the same step on the kernels before batch invariance (cuBLAS-style GEMMs, torch reductions, einsum
    # attention over the attended length) agrees to F32 rounding
    model.env.invariant_decode = False
    before = model.decode(torch.tensor([20, 21, 22]), torch.tensor([5, 3, 8]), cache, kv_len=9)
    rel = float((batch - before).norm() / before.norm())
    assert rel < 1e-5, rel


@interpreted
def test_decode_is_batch_invariant_by_default_on_the_triton_engine_only(tiny_fp8) -> None:
    """The default (run on the H100 before it was turned on, docs/benchmarks.md): the Triton engine decodes on the
    batch-invariant kernels unless told not to; the torch engine never does, and refuses to be asked."""
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.errors import ConfigError
    from dsv3_tools.model import load_model

    ck = open_checkpoint(tiny_fp8)
    assert load_model(ck, engine="triton", stream=False).env.invariant_decode
    assert not load_model(ck, engine="triton", stream=False, batch_invariant=False).env.invariant_decode
    assert not load_model(ck, engine="torch", stream=False).env.invariant_decode
    with pytest.raises(ConfigError, match="batch-invariant"):
        load_model(ck, engine="torch", stream=False, batch_invariant=True)


_ROWWISE_COMPILE = r"""
import json
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from dsv3_tools.kernels import rowwise

k = rowwise._build()
out = {}


def compile_for_hopper(name, fn, sig, const, warps, stages):
    sig = dict(sig, **{n: "constexpr" for n in const})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    src = ASTSource(fn, sig, {(fn.arg_names.index(n),): v for n, v in const.items()}, attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    out[name] = dict(shared=c.metadata.shared, cubin=len(c.asm["cubin"]))


def i32(*names):
    return {n: "i32" for n in names}


strides = ("sxg", "sxm", "sxk", "swg", "swn", "swk", "syg", "sym", "syn")
for dt, bn in (("bf16", 64), ("bf16", 32), ("bf16", 16), ("fp32", 16)):
    _, bk, warps, stages = rowwise.tiles(256, 7168, torch.float32 if dt == "fp32" else torch.bfloat16, torch.device("cpu"))
    sig = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", y_ptr=f"*{dt}", **i32("M", "N", "K", *strides))
    const = dict(BM=rowwise.BM, BN=bn, BK=bk, DOT=tl.bfloat16 if dt == "bf16" else tl.float32)
    compile_for_hopper(f"matmul {dt} BN {bn}", k["matmul"], sig, const, warps, stages)
compile_for_hopper("rms_norm 7168", k["rms"], dict(x_ptr="*bf16", w_ptr="*fp32", y_ptr="*bf16", **i32("H", "sx", "sy"),
                   eps="fp32"), dict(BLOCK=8192), 8, 3)
sig = dict(ql_ptr="*bf16", qp_ptr="*bf16", c_ptr="*bf16", o_ptr="*bf16", slot_ptr="*i64", pos_ptr="*i64",
           **i32("NH", "C", "R", "sqlb", "sqlh", "sqpb", "sqph", "scs", "scp", "sob", "soh"), scale="fp32")
compile_for_hopper("mla_decode V3", k["mla"], sig, dict(BH=16, BS=32, CP=512, RP=64, DOT=tl.bfloat16), 4, 2)
compile_for_hopper("choice_sum", k["choice"], dict(y_ptr="*bf16", w_ptr="*fp32", o_ptr="*bf16", **i32("K", "H")),
                   dict(BLOCK=1024), 4, 3)
print(json.dumps(out))
"""


def test_rowwise_kernels_compile_for_hopper() -> None:
    """The batch-invariant decode kernels with their GPU operand types (BF16 tensor-core products, which the
    interpreter does not run) and V3's decode tile sizes compile for Hopper (sm_90) down to a cubin without a GPU,
    each within one SM's shared memory (227 KB on H100 and H200)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _ROWWISE_COMPILE], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    assert len(out) == 7, out
    for name, r in out.items():
        assert r["cubin"] > 0 and r["shared"] <= 227 * 1024, (name, r)
