"""The Triton kernels for real, on a CUDA GPU, against their torch references (run on the H200; deselected on CI)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _first_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    idx = (a != b).nonzero()
    if not len(idx):
        return "none"
    i = tuple(idx[0].tolist())
    return f"{len(idx)} differ, first at {i}: {a[i].item()} vs {b[i].item()}"


@pytest.mark.parametrize("shape", [(18432, 7168), (576, 7168), (200, 300), (1, 129)])
def test_weight_dequant_bit_identical(shape: tuple[int, int]) -> None:
    from dsv3_tools.kernels.weight_dequant import weight_dequant, weight_dequant_ref
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    w = torch.randn(shape, device="cuda") * 0.05
    w[:128, :128] = 0  # an all-zero block
    q, s = weight_quant_ref(w)
    got, want = weight_dequant(q, s).view(torch.int16), weight_dequant_ref(q, s).view(torch.int16)
    assert torch.equal(got, want), _first_diff(got, want)


@pytest.mark.parametrize("fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(4096, 7168), (33, 300), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_bit_identical(fmt: str | None, shape: tuple[int, int], dtype: torch.dtype) -> None:
    from dsv3_tools.kernels.act_quant import act_quant, act_quant_ref

    x = (torch.randn(shape, device="cuda") * 7).to(dtype)
    x[0, : min(128, shape[1])] = 0
    y, s = act_quant(x, 128, fmt)
    yr, sr = act_quant_ref(x, 128, fmt)
    assert torch.equal(s, sr), _first_diff(s, sr)
    assert torch.equal(y.view(torch.uint8), yr.view(torch.uint8)), _first_diff(
        y.view(torch.uint8), yr.view(torch.uint8)
    )


@pytest.mark.parametrize(
    "mnk",
    [
        (4096, 7168, 2048),
        (4096, 2048, 7168),
        (16, 18432, 7168),
        (128, 7168, 2048),
        (37, 576, 7168),
        (5, 300, 200),
        (1100, 300, 4096),  # ragged M and N; 600-byte bf16 rows: no TMA store (f32 rows of 1200 bytes: TMA)
        (2049, 1000, 1536),
        (1040, 384, 1040),  # K a multiple of 16 but not of 128: the copy engine zero-fills the last K block
    ],
)
@pytest.mark.parametrize("schedule", ["pick", "pointer", "short_k", "long_k", "gluon", "split_ptr", "split_tma"])
def test_fp8_gemm_matches_reference(mnk: tuple[int, int, int], schedule: str) -> None:
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import LONG_K, SHORT_K, WS_128, GemmConfig, fp8_gemm, fp8_gemm_ref, pick_config
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    M, N, K = mnk
    a = torch.randn(M, K, device="cuda")
    w = torch.randn(N, K, device="cuda")
    q, ws = weight_quant_ref(w)
    aq, as_ = act_quant_ref(a)
    cfg = {
        "pick": pick_config(M, N, K),
        "pointer": GemmConfig(64, 128, 4, 4),
        "short_k": SHORT_K,
        "long_k": LONG_K,
        "split_ptr": GemmConfig(64, 128, 4, 4, split_k=3),
        "split_tma": GemmConfig(64, 128, 4, 4, tma=1, split_k=4),
    }
    cfg = cfg[schedule] if schedule != "gluon" else WS_128
    got = fp8_gemm(aq, as_, q, ws, torch.float32, config=cfg)
    want = fp8_gemm_ref(aq, as_, q, ws, torch.float32)
    err = ((got - want).norm() / want.norm()).item()
    # Hopper's FP8 tensor cores accumulate each 128-deep product with fewer than f32's mantissa bits (the
    # DeepSeek-V3 report measures about 14); the f32 promotion per 128-channel block bounds the error near 1e-4.
    assert err < 1e-3, f"{mnk}: relative error {err:.3e} vs the f32 reference"
    # Against the unquantized f32 product: the activation + weight quantization error only.
    full = ((fp8_gemm(aq, as_, q, ws, config=cfg).float() - a @ w.T).norm() / (a @ w.T).norm()).item()
    assert full < 4e-2, f"{mnk}: {full:.3e} vs the unquantized product"


@pytest.mark.parametrize("tma", [0, 1])
def test_fp8_gemm_split_k_is_deterministic(tma: int) -> None:
    """Split-K on the GPU, where a tile's programs really race: the last to arrive sums the partials in split order,
    so 30 calls give the same bits; every tile counter is back at zero after each call."""
    from dsv3_tools.kernels import fp8_gemm as mod
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import GemmConfig, fp8_gemm, fp8_gemm_ref
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    aq, as_ = act_quant_ref(torch.randn(200, 7168, device="cuda"))
    q, ws = weight_quant_ref(torch.randn(2048, 7168, device="cuda"))
    cfg = GemmConfig(64, 128, 4, 4, tma=tma, split_k=7)
    first = fp8_gemm(aq, as_, q, ws, torch.float32, config=cfg)
    for i in range(30):
        again = fp8_gemm(aq, as_, q, ws, torch.float32, config=cfg)
        assert torch.equal(again, first), f"call {i}: {(again != first).sum().item()} elements differ"
    torch.cuda.synchronize()
    assert mod._SPLIT and all(int(entry[1].abs().sum()) == 0 for entry in mod._SPLIT.values())
    want = fp8_gemm_ref(aq, as_, q, ws, torch.float32)
    err = ((first - want).norm() / want.norm()).item()
    assert err < 1e-3, f"relative error {err:.3e}"


@pytest.mark.parametrize(
    "cfg",
    [
        (64, 128, 4, 4, 0, 0, 0, 0, 8, 0, 0, 1, 1),  # pointer kernel, the next kernel may launch at once
        (64, 128, 4, 4, 0, 0, 0, 0, 8, 0, 0, 1, 2),  # ... after the K loop
        (64, 128, 4, 4, 0, 0, 0, 0, 8, 0, 0, 4, 1),  # split-K: the workspace and counters are shared by the calls
        (64, 128, 4, 3, 1, 0, 0, 0, 8, 0, 0, 1, 1),  # TMA kernel
        (64, 64, 4, 5, 1, 0, 0, 0, 8, 0, 0, 4, 2),  # TMA kernel, split-K
        (128, 64, 4, 6, 1, 1, 0, 0, 8, 0, 1, 1, 1),  # Gluon kernel
    ],
)
def test_fp8_gemm_dependent_launch_waits_for_the_previous_kernel(cfg: tuple) -> None:
    """With programmatic dependent launch a kernel starts while the previous one in the stream still runs: it must
    read nothing before that one has finished. Here each call's activation scales are the previous call's output
    (N = K / 128, f32), so every call reads what the call just before wrote; 6 chained calls, then each is redone
    from its settled inputs and must give the same bits (a read before the wait sees stale memory), and the chain
    is checked against fp8_gemm_ref."""
    from dsv3_tools.kernels import fp8_gemm_ws
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import GemmConfig, fp8_gemm, fp8_gemm_ref
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    cfg = GemmConfig(*cfg)
    if cfg.gluon and not fp8_gemm_ws.available(torch.device("cuda")):
        pytest.skip("no Hopper Gluon here")
    M, K = 256, 4096
    N = K // 128
    aq, as0 = act_quant_ref(torch.randn(M, K, device="cuda"))
    q, ws = weight_quant_ref(torch.randn(N, K, device="cuda") * 1e-3)
    scales, outs = [as0], []
    for _ in range(6):
        outs.append(fp8_gemm(aq, scales[-1], q, ws, torch.float32, config=cfg))
        scales.append(outs[-1])  # [M, N] = [M, KB]: the next call's activation scales
    torch.cuda.synchronize()
    for i, got in enumerate(outs):
        again = fp8_gemm(aq, scales[i], q, ws, torch.float32, config=cfg)
        torch.cuda.synchronize()
        assert torch.equal(got, again), f"call {i}: {_first_diff(got, again)}"
        want = fp8_gemm_ref(aq, scales[i], q, ws, torch.float32)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 1e-3 and want.norm() > 0, f"call {i}: relative error {err:.3e}"


def test_launches_take_the_short_path() -> None:
    """After a kernel's first call, later calls skip the JIT's argument binding (kernels/_launch.py): with a Triton
    whose internals moved, the kernels would still run, but at several times the host cost per call."""
    from dsv3_tools.kernels import _launch
    from dsv3_tools.kernels.act_quant import act_quant, act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import fp8_gemm
    from dsv3_tools.kernels.weight_dequant import weight_dequant, weight_dequant_ref
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    aq, as_ = act_quant_ref(torch.randn(16, 256, device="cuda"))
    q, ws = weight_quant_ref(torch.randn(384, 256, device="cuda"))
    first = fp8_gemm(aq, as_, q, ws, torch.float32)
    assert _launch.disabled_reason() is None and _launch._CACHE
    assert torch.equal(fp8_gemm(aq, as_, q, ws, torch.float32), first)
    x = torch.randn(40, 700, device="cuda")  # a shape of their own: the first call compiles, the next two do not
    want_q, want_s = act_quant_ref(x)
    for _ in range(3):
        got_q, got_s = act_quant(x)
        assert torch.equal(got_s, want_s) and torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
        got = weight_dequant(q[:, :200], ws[:, :2].contiguous())
        assert torch.equal(got.view(torch.int16), weight_dequant_ref(q[:, :200], ws[:, :2]).view(torch.int16))
    before = len(_launch._CACHE)
    act_quant(x)
    assert len(_launch._CACHE) == before  # the same specialization: no new compile


def test_act_quant_on_an_unaligned_view_after_an_aligned_call() -> None:
    """act_quant's planned launch keys on its operands' 16-byte alignment: an input view one element past an
    aligned base, of the same shape as an aligned call just made, gets a kernel compiled for it (the aligned one's
    vector loads would fault or read wrong data) and the reference's exact bits."""
    from dsv3_tools.kernels.act_quant import act_quant, act_quant_ref

    buf = torch.randn(64 * 1024 + 8, device="cuda").bfloat16()
    for x in (buf[: 64 * 1024].view(64, 1024), buf[1 : 64 * 1024 + 1].view(64, 1024)):
        assert (x.data_ptr() % 16 == 0) == (x.storage_offset() == 0)
        y, sc = act_quant(x)
        yr, sr = act_quant_ref(x)
        assert torch.equal(sc, sr) and torch.equal(y.view(torch.uint8), yr.view(torch.uint8))


@pytest.mark.parametrize("M", [128, 1024])
def test_fp8_gemm_on_unaligned_views(M: int) -> None:
    """Operands at addresses that are not 16-byte aligned (views into a larger buffer) take kernels compiled
    without the alignment assumption (no TMA, no Gluon); each launch is keyed on its tensors' alignment, so
    aligned, unaligned and aligned calls in a row each get their own variant. The same sums in the same order:
    equal to f32 rounding (another kernel may fuse a multiply-add differently), and the last call, aligned
    again, equal bit for bit to the first."""
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import fp8_gemm
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    N, K = 2048, 7168
    aq, as_ = act_quant_ref(torch.randn(M, K, device="cuda"))
    q, ws = weight_quant_ref(torch.randn(N, K, device="cuda"))
    buf = torch.empty(M * K + 1, dtype=aq.dtype, device="cuda")
    odd = buf[1:].view(M, K)  # one byte past an aligned base
    odd.copy_(aq)
    sbuf = torch.empty(M * as_.shape[1] + 1, device="cuda")
    odd_s = sbuf[1:].view(as_.shape)  # 4 bytes past
    odd_s.copy_(as_)
    first = fp8_gemm(aq, as_, q, ws, torch.float32)
    for i, (a, s) in enumerate(((odd, as_), (aq, odd_s), (odd, odd_s))):
        got = fp8_gemm(a, s, q, ws, torch.float32)
        err = ((got - first).norm() / first.norm()).item()
        assert err < 1e-6, f"unaligned case {i}: relative difference {err:.2e}"
    assert torch.equal(fp8_gemm(aq, as_, q, ws, torch.float32), first)


def test_fp8_gemm_rejects_operands_on_two_devices() -> None:
    """The launch passes bare addresses (kernels/_launch.py); a CPU weight with CUDA activations must be a clear
    error, not a fault."""
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import fp8_gemm
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    aq, a_s = act_quant_ref(torch.randn(16, 256, device="cuda"))
    q, w_s = weight_quant_ref(torch.randn(128, 256))
    with pytest.raises(ValueError, match="different devices"):
        fp8_gemm(aq, a_s, q, w_s.cuda())


def test_gluon_kernel_builds_on_hopper() -> None:
    """On a Hopper GPU the Gluon kernel must be available: fp8_gemm would otherwise fall back to its Triton
    schedules without a word, and the gluon rows above would test those instead."""
    from dsv3_tools.kernels import fp8_gemm_ws

    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev)[0] != 9:
        pytest.skip("not a Hopper GPU")
    assert fp8_gemm_ws.available(dev), fp8_gemm_ws.build_error()


def test_model_triton_engine_matches_torch(tmp_path, monkeypatch) -> None:
    """The whole tiny model on the GPU with the Triton kernels vs the torch references on the CPU."""
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.model import run_model
    from dsv3_tools.synth import synth

    synth(tmp_path / "ck", "tiny", dtype="fp8", seed=0, shards=2)
    ck = open_checkpoint(tmp_path / "ck")
    prompts = [[1, 5, 9, 200, 17], list(range(40, 75))]
    cpu = run_model(ck, prompts, device="cpu", engine="torch", gemm="bf16")
    gpu = run_model(ck, prompts, device="cuda", engine="triton", gemm="bf16")
    for i, (a, b) in enumerate(zip(gpu.logits, cpu.logits)):
        err = ((a - b).norm() / b.norm()).item()
        assert err < 1e-4, f"prompt {i}: gpu/cpu relative error {err:.3e}"  # TF32 is off by default for matmuls
    # The FP8 path: every act_quant / fp8_gemm call of the model, Triton against the torch reference on the same
    # inputs. (Whole-model outputs are not compared: the FP8 tensor cores' ~1e-4 GEMM error flips FP8 roundings of
    # the next activations, which moves a 5-token prompt's layer-0 output by ~2%; measured on the H200.)
    from dsv3_tools import model as M
    from dsv3_tools.kernels.act_quant import act_quant, act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref

    errors: list = []

    class Checked(M.Ops):
        def __init__(self, engine: str):
            super().__init__("torch")
            self.act_quant, self.fp8_gemm = self.check_act_quant, self.check_gemm

        @staticmethod
        def check_act_quant(x, block, fmt):
            y, s = act_quant(x, block, fmt)
            yr, sr = act_quant_ref(x, block, fmt)
            if not (torch.equal(s, sr) and torch.equal(y.view(torch.uint8), yr.view(torch.uint8))):
                errors.append(("act_quant", tuple(x.shape)))
            return yr, sr

        @staticmethod
        def check_gemm(a, a_s, b, b_s, out_dtype, block):
            want = fp8_gemm_ref(a, a_s, b, b_s, out_dtype, block)
            err = ((fp8_gemm(a, a_s, b, b_s, out_dtype, block) - want).norm() / want.norm()).item()
            if err > 1e-3:
                errors.append(("fp8_gemm", tuple(a.shape), tuple(b.shape), err))
            return want

    monkeypatch.setattr(M, "Ops", Checked)
    run_model(ck, prompts, device="cuda", engine="triton", gemm="fp8")
    assert not errors, errors[:5]


@pytest.mark.parametrize("M", [5, 18, 40])
@pytest.mark.parametrize("K", [160, 192, 256, 320, 512])
def test_fp8_gemm_short_k(M: int, K: int) -> None:
    """The tiny model's shapes: K of 2-4 blocks, ragged, with deep software pipelines."""
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    aq, as_ = act_quant_ref(torch.randn(M, K, device="cuda"))
    q, ws = weight_quant_ref(torch.randn(224, K, device="cuda"))
    want = fp8_gemm_ref(aq, as_, q, ws, torch.float32)
    got = fp8_gemm(aq, as_, q, ws, torch.float32)
    err = ((got - want).norm() / want.norm()).item()
    assert err < 1e-3, (
        f"M={M} K={K}: {err:.3e}; rows off: {((got - want).abs().amax(1) > 1e-2 * want.abs().amax()).nonzero().flatten().tolist()}"
    )


def _teacher_forced(model, prompt: list[int], tokens: list[int], graphs: bool = False) -> torch.Tensor:
    """The decode path's logits [len(tokens), vocab] (float32, CPU) for ``prompt`` continued by ``tokens``: the
    prefill's last position, then one step per token but the last."""
    from dsv3_tools.generate.graphs import GraphDecoder

    dev = model.env.device
    cache = model.new_cache(1, len(prompt) + len(tokens) + 1)
    g = GraphDecoder(model, cache) if graphs else None
    if g is not None:
        g.ensure(1)  # before the prefill: capturing writes cache rows
    out = [model.prefill([prompt], cache)[0].float().cpu()]
    for k, t in enumerate(tokens[:-1]):
        tok = torch.tensor([t], device=dev)
        pos = torch.tensor([len(prompt) + k], device=dev)
        step = g(tok, pos) if g is not None else model.decode(tok, pos, cache, kv_len=len(prompt) + k + 1)
        out.append(step[0].float().cpu())  # copied now: a graph's output tensor is overwritten by the next replay
    return torch.stack(out)


def test_generate_gpu_logits_follow_the_cpu(tmp_path) -> None:
    """Teacher-forced on the CPU's greedy tokens, the GPU's logits at every step (Triton engine, float32, eager and
    through the CUDA graph) agree with the CPU's within verify's ``float`` tier."""
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.generate.batch import Request
    from dsv3_tools.generate.chat import Tokenizer
    from dsv3_tools.generate.engine import Engine
    from dsv3_tools.generate.sampling import SamplingParams
    from dsv3_tools.model import load_model
    from dsv3_tools.synth import synth
    from dsv3_tools.verify.metrics import TIERS, compare_logits, summarize
    from dsv3_tools.verify.reference import Logits

    synth(tmp_path / "ck", "tiny", dtype="fp8", seed=0, shards=2)
    ck = open_checkpoint(tmp_path / "ck")
    cpu = load_model(ck, device="cpu", engine="torch")
    gpu = load_model(ck, device="cuda", engine="triton")
    prompts = [[5, 9, 200, 17, 3], list(range(60, 83))]
    engine = Engine(cpu, Tokenizer.load(tmp_path / "ck"), 2, 64, ignore_eos=True)
    greedy = SamplingParams(temperature=0.0)
    results = engine.run([Request(i, "", p, greedy, 24, (), 0) for i, p in enumerate(prompts)])
    for graphs in (False, True):
        metrics = []
        for r in results:
            want = _teacher_forced(cpu, r.prompt_ids, r.output_ids)
            assert [int(t) for t in want.argmax(-1)] == r.output_ids  # the CPU's own tokens, step by step
            got = _teacher_forced(gpu, r.prompt_ids, r.output_ids, graphs=graphs)
            metrics.append(compare_logits(Logits.from_full(want), got))
        stats = summarize(metrics)
        assert not stats.failures(TIERS["float"]), (graphs, stats)


@pytest.mark.parametrize("gemm", ["bf16", "fp8"])
def test_generate_cli_on_gpu(tmp_path, gemm: str) -> None:
    """The command end to end on the GPU: bfloat16 compute, Triton kernels, the decode step in a CUDA graph."""
    import json
    import subprocess
    import sys

    from dsv3_tools.synth import synth

    synth(tmp_path / "ck", "tiny", dtype="fp8", seed=0, shards=2)
    f = tmp_path / "p.txt"
    f.write_text("hello world\nthe quick brown fox\n深度求索\n")
    r = subprocess.run(
        [sys.executable, "-m", "dsv3_tools", "generate", str(tmp_path / "ck"), "--input-file", str(f), "--json",
         "--gemm", gemm, "--max-new-tokens", "16", "--seed", "0", "--max-batch-size", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [o["index"] for o in out] == [0, 1, 2] and all(o["output_ids"] for o in out)
    assert "cuda" in r.stderr and "bfloat16" in r.stderr


# ---------------------------------------------------------------------- fast decoding (generate, fast)
def test_moe_gemm_on_the_gpu() -> None:
    """The grouped expert kernel against its reference: BF16 rows, BF16 and FP8 (block-scaled) expert stacks,
    experts chosen by several tokens and by none, ragged N."""
    from dsv3_tools.kernels.moe_gemm import moe_gemm, moe_gemm_ref
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    g = torch.Generator().manual_seed(11)
    E, N, K, T, k = 16, 2000, 1024, 32, 8
    w32 = torch.randn(E, N, K, generator=g) / K**0.5
    quant = [weight_quant_ref(w32[e], (128, 128)) for e in range(E)]
    wq, s = torch.stack([q for q, _ in quant]).cuda(), torch.stack([sc for _, sc in quant]).cuda()
    x = torch.randn(T, K, generator=g).to(torch.bfloat16).cuda()
    idx = torch.stack([torch.randperm(E - 2, generator=g)[:k] for _ in range(T)]).cuda()
    rows, experts = x.repeat_interleave(k, 0), idx.reshape(-1)
    for w, sc in ((w32.to(torch.bfloat16).cuda(), None), (wq, s)):
        want = moe_gemm_ref(rows, w, sc, experts).float()
        got = moe_gemm(rows, w, sc, experts, max_per_expert=T).float()
        rel = float((got - want).norm() / want.norm())
        assert rel < 5e-3, (w.dtype, rel)  # bf16 outputs, f32 accumulation in another order


def _tiny_gpu_model(tmp_path, gemm: str = "bf16", profile: str = "random", invariant: bool | None = None):
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.model import load_model
    from dsv3_tools.synth import synth

    ck = tmp_path / f"ck-{profile}"
    if not ck.exists():
        synth(ck, "tiny", dtype="fp8", seed=0, shards=2, profile=profile)
    return load_model(open_checkpoint(ck), device="cuda", engine="triton", gemm=gemm, stream=False,
                      dtype=torch.bfloat16, batch_invariant=invariant)  # fmt: skip


@pytest.mark.parametrize("invariant", [False, True], ids=["cublas", "batch-invariant"])
def test_graph_step_is_bit_identical_to_the_eager_step(tmp_path, invariant: bool) -> None:
    """The CUDA graph of the decode step replays exactly the eager step's arithmetic: bit-identical logits."""
    from dsv3_tools.generate.graphs import GraphDecoder

    model = _tiny_gpu_model(tmp_path, invariant=invariant)
    prompts = [[5, 9, 200, 17, 3], list(range(60, 83))]
    tokens, positions = torch.tensor([7, 8], device="cuda"), torch.tensor([5, 23], device="cuda")
    eager_cache, graph_cache = model.new_cache(2, 64), model.new_cache(2, 64)
    graphs = GraphDecoder(model, graph_cache)
    graphs.ensure(2)  # (the capture writes rows at position 0: before the prefill, as the engine does)
    model.prefill(prompts, eager_cache)
    model.prefill(prompts, graph_cache)
    eager = model.decode(tokens, positions, eager_cache, kv_len=64, static=True)
    replay = graphs(tokens, positions)
    assert torch.equal(eager.view(torch.int32), replay.view(torch.int32))
    assert torch.equal(eager_cache.data, graph_cache.data)


@pytest.mark.parametrize("invariant", [False, True], ids=["cublas", "batch-invariant"])
def test_decode_step_never_synchronizes_with_the_host(tmp_path, invariant: bool) -> None:
    """torch's sync debug mode raises on any operation that waits for the device from the host."""
    model = _tiny_gpu_model(tmp_path, invariant=invariant)
    cache = model.new_cache(4, 64)
    model.prefill([[5, 9, 200], [1, 2], [3], [4, 5, 6, 7]], cache)
    tokens, positions = torch.tensor([7, 8, 9, 10], device="cuda"), torch.tensor([3, 2, 1, 4], device="cuda")
    model.decode(tokens, positions, cache, kv_len=64, static=True)  # warm-up: kernels compiled, caches made
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.decode(tokens, positions, cache, kv_len=64, static=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert model.layers[-1].grouped is not None  # the grouped expert kernel was the path taken


def test_fp8_gemm_decode_agrees_with_bf16_within_the_quantized_tier(tmp_path) -> None:
    """The FP8 GEMM path (act_quant + fp8_gemm, the demo's arithmetic) and the BF16 path, teacher-forced on the
    same tokens, on the well-conditioned model (the tier is calibrated there; the random profile's router turns
    rounding into other experts, docs/verify.md): step logits within verify's quantized tier."""
    from dsv3_tools.verify.metrics import TIERS, compare_logits, summarize
    from dsv3_tools.verify.reference import Logits

    prompts = [[5, 9, 200, 17, 3], list(range(60, 83))]
    follow = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24, 25, 26]]
    out = {}
    for gemm in ("bf16", "fp8"):
        model = _tiny_gpu_model(tmp_path, gemm, profile="trained")
        cache = model.new_cache(2, 64)
        model.prefill(prompts, cache)
        steps = []
        for i in range(len(follow[0])):
            tok = torch.tensor([f[i] for f in follow], device="cuda")
            pos = torch.tensor([len(p) + i for p in prompts], device="cuda")
            steps.append(model.decode(tok, pos, cache, kv_len=64, static=True).float().cpu())
        out[gemm] = torch.stack(steps, 1)  # [B, steps, V]
        del model
    metrics = [compare_logits(Logits.from_full(out["bf16"][b]), out["fp8"][b]) for b in range(2)]
    stats = summarize(metrics)
    assert not stats.failures(TIERS["quantized"]), stats


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_speculative_on_the_gpu_gives_plain_greedy_tokens(tmp_path, dtype: torch.dtype) -> None:
    """``--speculative mtp`` on CUDA (Triton engine) gives plain greedy decoding's tokens, in BF16 as in F32: plain
    decoding through its CUDA graph (one row per sequence, the whole cache length attended), speculative decoding
    eagerly (two rows per live sequence) and through its CUDA graphs (two rows per sequence); the batch-invariant
    decode kernels make the row counts irrelevant. Sequences end at different steps. The counts add up."""
    from dsv3_tools.checkpoint import open_checkpoint
    from dsv3_tools.generate.batch import Request
    from dsv3_tools.generate.chat import Tokenizer
    from dsv3_tools.generate.engine import Engine
    from dsv3_tools.generate.sampling import SamplingParams
    from dsv3_tools.model import load_model
    from dsv3_tools.synth import synth

    synth(tmp_path / "ck", "tiny", dtype="fp8", seed=0, shards=2)
    ck, tok = open_checkpoint(tmp_path / "ck"), Tokenizer.load(tmp_path / "ck")
    prompts = [[5, 9, 200, 17, 3], list(range(60, 83)), [11]]
    greedy = SamplingParams(temperature=0.0)
    outs = {}
    for spec, graph in ((False, True), (True, False), (True, True)):
        model = load_model(ck, device="cuda", engine="triton", dtype=dtype, batch_invariant=True)
        eng = Engine(model, tok, 3, 64, ignore_eos=True, speculative=spec, cuda_graph=graph)
        outs[spec, graph] = eng.run([Request(i, "", p, greedy, n, (), 0) for i, (p, n) in
                                     enumerate(zip(prompts, (40, 17, 29)))])  # fmt: skip
    for mode in ((True, False), (True, True)):
        for a, b in zip(outs[False, True], outs[mode]):
            assert a.output_ids == b.output_ids, (mode, a.index, a.output_ids, b.output_ids)
            assert len(b.output_ids) == 1 + b.speculative["drafted"] + b.speculative["accepted"]


def test_rowwise_kernels_agree_with_torch_and_do_not_depend_on_the_row_count() -> None:
    """kernels/rowwise.py at V3 sizes: each result within rounding of its torch form, and the first M rows of a
    64-row call bit-identical to a call with those M rows only (M = 1, 2, 3, 16, 17, 33)."""
    from dsv3_tools.kernels import rowwise as rw
    from dsv3_tools.model import rms_norm

    g = torch.Generator().manual_seed(3)

    def rnd(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).cuda()

    def check(name, f, ref, full_in, tol):
        full = f(*full_in)
        want = ref(*full_in)
        rel = float((full.float() - want.float()).norm() / want.float().norm())
        assert rel < tol, (name, rel)
        for M in (1, 2, 3, 16, 17, 33):
            part = f(*[t[:M] if i == 0 else t for i, t in enumerate(full_in)])
            assert torch.equal(part, full[:M]), (name, M, _first_diff(part, full[:M]))

    for N, K in ((24576, 1536), (576, 7168), (7168, 16384), (129280, 7168), (2048, 7168)):
        check(f"matmul {N}x{K}", rw.matmul, lambda x, w: x @ w.T, (rnd(64, K), rnd(N, K) / K**0.5), 1e-2)
    check("router f32", rw.matmul, lambda x, w: x @ w.T, (rnd(64, 7168, dtype=torch.float32),
          rnd(256, 7168, dtype=torch.float32)), 1e-5)  # fmt: skip
    w = rnd(7168)
    check("rms_norm", lambda x: rw.rms_norm(x, w.float(), 1e-6), lambda x: rms_norm(x, w.float(), 1e-6),
          (rnd(64, 7168),), 1e-2)  # fmt: skip
    y, wc = rnd(64, 8, 7168), torch.rand(64, 8, generator=g).cuda()
    check("choice_sum", lambda y: rw.choice_sum(y, wc[: y.shape[0]]),
          lambda y: (y.float() * wc[: y.shape[0], :, None]).sum(1), (y,), 1e-2)  # fmt: skip
    # per-head products of the absorbed attention: strided views, batched over 128 heads
    q, wk = rnd(64, 128, 192), rnd(128, 128, 512) / 128**0.5

    def q_lat(q):
        out = torch.empty((q.shape[0], 128, 512), dtype=q.dtype, device="cuda")
        rw.matmul(q[..., :128].transpose(0, 1), wk.transpose(1, 2), out=out.transpose(0, 1))
        return out

    check("per-head matmul", q_lat, lambda q: torch.einsum("bhd,hdc->bhc", q[..., :128].float(), wk.float()),
          (q,), 1e-2)  # fmt: skip
    cache = rnd(64, 600, 576)
    pos = torch.randint(0, 600, (64,), generator=g).cuda()
    slots = torch.randperm(64, generator=g).cuda()

    def mla(ql, qp):
        return rw.mla_decode(ql, qp, cache, slots[: ql.shape[0]], pos[: ql.shape[0]], 0.07)

    def mla_ref(ql, qp):
        out = []
        for b in range(ql.shape[0]):
            c = cache[slots[b], : int(pos[b]) + 1].float()
            s = (ql[b].float() @ c[:, :512].T + qp[b].float() @ c[:, 512:].T) * 0.07
            out.append(s.softmax(-1) @ c[:, :512])
        return torch.stack(out)

    check("mla_decode", mla, mla_ref, (rnd(64, 128, 512), rnd(64, 128, 64)), 1e-2)


def test_decode_rows_do_not_depend_on_the_batch(tmp_path) -> None:
    """A decode step's logits for a sequence are bit-identical whether it runs alone, in a batch, through the CUDA
    graph's static form (whole cache attended) or as the second row of its own sequence (speculative decoding's
    verify step): BF16, FP8 and BF16 GEMM paths."""
    for gemm in ("bf16", "fp8"):
        model = _tiny_gpu_model(tmp_path, gemm, invariant=True)
        prompts = [[5, 9, 200, 17, 3], list(range(60, 83)), [11, 12]]
        cache = model.new_cache(3, 64)
        model.prefill(prompts, cache)
        tokens, positions = torch.tensor([7, 8, 9], device="cuda"), torch.tensor([5, 23, 2], device="cuda")
        batch = model.decode(tokens, positions, cache, kv_len=24)
        static = model.decode(tokens, positions, cache, static=True)
        assert torch.equal(batch, static), (gemm, _first_diff(batch, static))
        for i in range(3):
            alone = model.decode(tokens[i : i + 1], positions[i : i + 1], cache, slots=torch.tensor([i]).cuda())
            assert torch.equal(alone[0], batch[i]), (gemm, i, _first_diff(alone[0], batch[i]))
        # the next position of sequence 1 alone, then both rows of sequence 1 in one step
        nxt = model.decode(torch.tensor([4], device="cuda"), positions[1:2] + 1, cache, slots=torch.tensor([1]).cuda())
        two = model.decode(torch.tensor([8, 4], device="cuda"), torch.tensor([23, 24], device="cuda"), cache,
                           slots=torch.tensor([1, 1]).cuda())  # fmt: skip
        assert torch.equal(two[0], batch[1]), (gemm, _first_diff(two[0], batch[1]))
        assert torch.equal(two[1], nxt[0]), (gemm, _first_diff(two[1], nxt[0]))
        del model
