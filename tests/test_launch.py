"""kernels/_launch.py, the short launch path, on a stand-in for Triton's JIT (the real path runs on the GPU only:
tests/test_gpu.py checks it is in use there and that every kernel result matches its reference through it).

The stand-in records what reaches the JIT (which compiles) and what reaches the compiled kernel's launcher, so these
tests check the path's logic: which calls may skip the JIT, under which key, with which arguments."""

from __future__ import annotations

import pytest
import torch

from dsv3_tools.kernels import _launch


class Compiled:
    def __init__(self, log: list) -> None:
        self.log, self.function, self.packed_metadata = log, "fn-handle", "meta"

    def run(self, gx, gy, gz, stream, function, packed, meta, enter, exit_, *args) -> None:
        self.log.append(("run", (gx, gy, gz), stream, args))


class Jit:
    """``fn[grid](*args, **kw)`` as Triton's JIT: "compiles" (logs) and returns the compiled kernel."""

    def __init__(self) -> None:
        self.log: list = []

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.log.append(("jit", grid, args, kw))
            return Compiled(self.log)

        return call


class Hooks:
    def __init__(self, calls: list) -> None:
        self.calls = calls


class Knobs:
    def __init__(self, hooked: bool = False) -> None:
        self.launch_enter_hook = Hooks([print] if hooked else [])
        self.launch_exit_hook = Hooks([])


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> dict:
    def spec(backend, a, is_const, specialize, align):  # Triton's per-argument specialization, reduced
        if isinstance(a, torch.Tensor):
            return (str(a.dtype), "D" if a.data_ptr() % 16 == 0 else None)
        return ("i32", "D" if a % 16 == 0 else None)

    state = dict(specialize=spec, backend=None, get_device=lambda: 0, get_stream=lambda d: 7)
    state["knobs"] = Knobs()
    monkeypatch.setattr(_launch, "_STATE", state)
    monkeypatch.setattr(_launch, "_CACHE", {})
    return state


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    buf = torch.zeros(64, dtype=torch.uint8)
    return buf[:32], buf[1:33]  # the second one byte past an aligned base (torch's CPU allocations are aligned)


def test_second_call_skips_the_jit_and_keeps_argument_order(fake_triton: dict) -> None:
    fn, (t, _) = Jit(), _views()
    for _ in range(3):
        _launch.launch(fn, (5,), (t, 32, 3), {"BLOCK": 64, "FLAG": True}, num_warps=4)
    assert [e[0] for e in fn.log] == ["jit", "run", "run"]
    assert fn.log[0][2:] == ((t, 32, 3), {"BLOCK": 64, "FLAG": True, "num_warps": 4})
    # the compiled kernel takes every parameter by position, the constexprs after the runtime ones
    assert fn.log[1] == ("run", (5, 1, 1), 7, (t, 32, 3, 64, True))


def test_a_new_specialization_goes_back_to_the_jit(fake_triton: dict) -> None:
    fn, (t, odd) = Jit(), _views()
    calls = [(t, 32), (t, 33), (odd, 32), (t, 32), (t, 48)]  # 33: not divisible by 16; odd: not aligned
    for args in calls:
        _launch.launch(fn, (1,), args, {"B": 1})
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit", "run", "run"]  # 48 specializes like 32
    _launch.launch(fn, (1,), (t, 32), {"B": 2})  # another constexpr value
    _launch.launch(fn, (1,), (t, 32), {"B": 1}, num_warps=8)  # another option
    assert [e[0] for e in fn.log[-2:]] == ["jit", "jit"]


def test_static_key_passes_the_callers_addresses(fake_triton: dict) -> None:
    fn, (t, odd) = Jit(), _views()
    calls = [((t, 9), ("plan", 1)), ((t, 9), ("plan", 1)), ((odd, 9), ("plan", 0)), ((odd, 9), ("plan", 0))]
    for args, static in calls:  # the caller's key fixes the alignment: here ("plan", 0) for the unaligned view
        _launch.launch(fn, (2,), args, {"B": 1}, static, (args[0].data_ptr(), 9))
    assert [e[0] for e in fn.log] == ["jit", "run", "jit", "run"]
    assert fn.log[0][2] == (t, 9)  # the JIT gets the tensor (it specializes on its dtype)
    assert fn.log[1][3] == (t.data_ptr(), 9, 1)  # the launcher gets the address
    assert fn.log[3][3] == (odd.data_ptr(), 9, 1)


def test_hooks_or_an_unavailable_path_take_the_jit_every_time(fake_triton: dict, monkeypatch) -> None:
    fn, (t, _) = Jit(), _views()
    fake_triton["knobs"] = Knobs(hooked=True)  # a profiler's launch hook must see every launch
    for _ in range(2):
        _launch.launch(fn, (1,), (t,), {})
    monkeypatch.setattr(_launch, "_STATE", {"off": "no Triton internals"})
    _launch.launch(fn, (1,), (t,), {}, static="plan")
    assert [e[0] for e in fn.log] == ["jit", "jit", "jit"]
    assert _launch.disabled_reason() == "no Triton internals"


def test_interpreter_disables_the_short_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_launch, "_STATE", {})
    fn = Jit()
    _launch.launch(fn, (1,), (3,), {})
    assert fn.log[0][0] == "jit" and "TRITON_INTERPRET" in _launch.disabled_reason()


def test_signature_check_catches_a_wrong_order() -> None:
    class Fn:
        arg_names = ["x", "n", "BLOCK", "FLAG"]

    _launch.check_signature(Fn(), (1, 2), {"BLOCK": 64, "FLAG": True})
    for args, const in [((1, 2), {"FLAG": True, "BLOCK": 64}), ((1,), {"BLOCK": 64, "FLAG": True}), ((1, 2), {})]:
        with pytest.raises(TypeError, match="do not match"):
            _launch.check_signature(Fn(), args, const)


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs fp8_gemm on CPU tensors under the interpreter")
@pytest.mark.parametrize("tma", [0, 1])
@pytest.mark.parametrize("split", [1, 2])
def test_fp8_gemm_calls_match_its_kernels_signatures(monkeypatch: pytest.MonkeyPatch, tma: int, split: int) -> None:
    """Every launch fp8_gemm makes passes its kernel's parameters in the kernel's order (the short path on the GPU
    passes them by position). Under the interpreter the launches fall back to the JIT, so they are recorded here and
    checked against the real Triton kernels' parameter lists."""
    from dsv3_tools.kernels.act_quant import act_quant_ref
    from dsv3_tools.kernels.fp8_gemm import GemmConfig, fp8_gemm
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    seen = []
    real = _launch.launch

    def record(fn, grid, args, constexprs, static=None, addresses=None, **options):
        seen.append(fn)
        _launch.check_signature(fn, args, constexprs)
        # the addresses the short path would pass: each tensor's data_ptr() in its place, everything else as is
        assert addresses is not None and len(addresses) == len(args)
        for i, (a, x) in enumerate(zip(args, addresses)):
            assert x == a.data_ptr() if isinstance(a, torch.Tensor) else x is a, f"argument {i}: {x!r} for {a!r}"
        return real(fn, grid, args, constexprs, static, addresses, **options)

    monkeypatch.setattr(_launch, "launch", record)
    aq, a_s = act_quant_ref(torch.randn(16, 256))
    q, w_s = weight_quant_ref(torch.randn(128, 256))
    fp8_gemm(aq, a_s, q, w_s, torch.float32, config=GemmConfig(16, 64, 4, 3, tma=tma, tma_store=tma, split_k=split))
    assert len(seen) == 1 and seen[0].arg_names  # a real kernel, with its parameter list


def test_descriptors_are_built_once_per_geometry_and_hold_no_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    import gc
    import weakref

    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(_launch, "_DESCRIPTORS", {})
    t = torch.zeros(64, 256, dtype=torch.float8_e4m3fn)
    alive = weakref.ref(t)
    ptr = t.data_ptr()
    d = _launch.descriptor(TensorDescriptor, ptr, t.dtype, (64, 256), (256, 1), (32, 128))
    assert d is _launch.descriptor(TensorDescriptor, ptr, t.dtype, (64, 256), (256, 1), (32, 128))
    assert (d.base.data_ptr(), d.shape, d.strides, d.block_shape) == (ptr, [64, 256], [256, 1], [32, 128])
    others = [
        _launch.descriptor(TensorDescriptor, ptr + 256, t.dtype, (64, 256), (256, 1), (32, 128)),
        _launch.descriptor(TensorDescriptor, ptr, t.dtype, (32, 256), (256, 1), (32, 128)),
        _launch.descriptor(TensorDescriptor, ptr, t.dtype, (64, 256), (256, 1), (64, 128)),
        _launch.descriptor(TensorDescriptor, ptr, torch.bfloat16, (64, 128), (128, 1), (32, 64)),
    ]
    assert all(o is not d for o in others) and len({id(o) for o in others}) == 4
    del t
    gc.collect()
    assert alive() is None  # the cache holds addresses, not tensors
    with pytest.raises(AssertionError):  # Triton's own checks still run on the address: 16-byte alignment
        _launch.descriptor(TensorDescriptor, ptr + 1, torch.float8_e4m3fn, (64, 256), (256, 1), (32, 128))


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the kernels on CPU tensors under the interpreter")
def test_act_quant_and_weight_dequant_calls_match_their_kernels_signatures(monkeypatch: pytest.MonkeyPatch) -> None:
    """As for fp8_gemm: the launches of act_quant and weight_dequant pass their kernels' parameters in order."""
    from dsv3_tools.kernels.act_quant import act_quant
    from dsv3_tools.kernels.weight_dequant import weight_dequant
    from dsv3_tools.kernels.weight_quant import weight_quant_ref

    seen = []
    real = _launch.launch

    def record(fn, grid, args, constexprs, static=None, addresses=None, **options):
        seen.append(fn)
        _launch.check_signature(fn, args, constexprs)
        return real(fn, grid, args, constexprs, static, addresses, **options)

    monkeypatch.setattr(_launch, "launch", record)
    act_quant(torch.randn(3, 256))
    q, s = weight_quant_ref(torch.randn(130, 200))
    weight_dequant(q, s, out_dtype=torch.float32)
    assert len(seen) == 2 and all(fn.arg_names for fn in seen)
