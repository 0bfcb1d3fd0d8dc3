"""A short launch path for the project's Triton and Gluon kernels: the compiled variant is looked up by the same
specialization the JIT computes, and launched directly.

``kernel[grid](...)`` costs tens of microseconds of host time per call on these Xeon VMs (binding the arguments,
building the cache key as a string, checking the kernel's globals, fetching device and stream). For a GEMM whose
kernel takes 8 us (M = 128) that host time, not the GPU, bounds the call rate. Here the first call of each variant
goes through the JIT (which compiles it) and records the compiled kernel under a key made of Triton's own
per-argument specialization (``native_specialize_impl``: the dtype and 16-byte alignment of each pointer, the
integer width and divisibility by 16 of each integer, equality to 1, a descriptor's block and layout), the
constexprs and the compile options. Later calls with the same key launch that kernel at once.

A caller that plans its launches (fp8_gemm) passes its own key (``static``) and the tensors' addresses, so that
nothing is specialized per call; TMA descriptors are built once per address and geometry (``descriptor``).

Falls back to the JIT's own path wherever this one cannot be exact: under the interpreter, when a launch hook is
installed (profilers), or on a Triton without these internals; ``disabled_reason()`` says which.
"""

from __future__ import annotations

import os
from typing import Any

_CACHE: dict = {}  # key -> compiled kernel
_STATE: dict = {}  # "specialize", "backend", ...: resolved once; "off": why the fast path is unavailable


def disabled_reason() -> str | None:
    """Why launches take the JIT's path (None while the short path is in use, or before the first launch)."""
    return _STATE.get("off")


def _hooked(hook: Any) -> bool:
    # Triton 3.5+ keeps hooks as chains (an empty chain calls nothing); older releases as a callable or None.
    return hook is not None and bool(getattr(hook, "calls", True))


def _resolve() -> bool:
    if "off" in _STATE:
        return False
    if "specialize" in _STATE:
        return True
    try:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("TRITON_INTERPRET=1: the interpreter runs kernels itself")
        import torch
        from triton import knobs
        from triton._C.libtriton import native_specialize_impl
        from triton.compiler.compiler import make_backend
        from triton.runtime import driver

        _STATE["specialize"] = native_specialize_impl
        _STATE["backend"] = make_backend(driver.active.get_current_target())
        # Device and stream as the JIT gets them (torch's current ones), without its Python wrappers.
        _STATE["get_device"] = torch._C._cuda_getDevice
        _STATE["get_stream"] = torch._C._cuda_getCurrentRawStream
        _STATE["knobs"] = knobs.runtime
    except Exception as e:  # interpreter, or a Triton whose internals differ: the JIT path every time
        _STATE["off"] = f"{type(e).__name__}: {e}"
        return False
    return True


class Address:
    """What a tensor descriptor reads from its base tensor (its address and dtype), without holding the tensor."""

    __slots__ = ("ptr", "dtype")

    def __init__(self, ptr: int, dtype: Any) -> None:
        self.ptr, self.dtype = ptr, dtype

    def data_ptr(self) -> int:
        return self.ptr


_DESCRIPTORS: dict = {}


def descriptor(make: Any, ptr: int, dtype: Any, shape: tuple, strides: tuple, block: tuple, *extra: Any) -> Any:
    """``make(base, shape, strides, block, *extra)`` (a TensorDescriptor class: Triton's or Gluon's) over the
    tensor at ``ptr``, built once per address, dtype, shape, strides and block: a descriptor costs several
    microseconds of Python to build and check, and the weights' ones are the same at every call. The base is an
    ``Address``, so a cached descriptor keeps no tensor alive (the layer-by-layer model frees each layer's weights);
    a new tensor at a recycled address with the same geometry gets the same, still exact, descriptor. ``extra``
    (a layout) is keyed by identity: it must live as long as the process (hashing a layout costs microseconds)."""
    key = (make, ptr, dtype, shape, strides, block, *map(id, extra))
    d = _DESCRIPTORS.get(key)
    if d is None:
        if len(_DESCRIPTORS) > 4096:
            _DESCRIPTORS.clear()
        d = _DESCRIPTORS[key] = make(Address(ptr, dtype), list(shape), list(strides), list(block), *extra)
    return d


def check_signature(fn: Any, args: tuple, constexprs: dict) -> None:
    """The compiled kernel takes its parameters by position: ``args`` then ``constexprs`` must be exactly the
    kernel's parameters, in order (a JIT call by keyword would hide a wrong order until the second call)."""
    names = getattr(fn, "arg_names", None)
    if names is not None and (len(names) != len(args) + len(constexprs) or list(constexprs) != names[len(args) :]):
        raise TypeError(f"{len(args)} arguments then constexprs {list(constexprs)} do not match the parameters {names}")


def launch(
    fn: Any,
    grid: tuple[int, ...],
    args: tuple,
    constexprs: dict,
    static: Any = None,
    addresses: tuple | None = None,
    **options: Any,
) -> None:
    """``fn[grid](*args, **constexprs, **options)``, with the JIT's binding skipped after the first call of each
    specialization. ``args`` are the kernel's runtime parameters in order, ``constexprs`` the rest, also in order
    (the compiled kernel takes every parameter by position).

    ``static`` (with ``addresses``): a hashable value from the caller that fixes everything the specialization
    depends on (the constexprs and options, every integer argument, each tensor's dtype and 16-byte alignment, each
    descriptor's block) and guarantees that every tensor is in this GPU's memory; ``addresses`` is ``args`` with
    each tensor replaced by its ``data_ptr()``, which the caller has read anyway to key its alignment. The launcher
    then gets the bare addresses, which skips its own ``data_ptr()`` call and pointer query per tensor (the check
    that would catch a CPU tensor: hence the guarantee)."""
    st = _STATE
    if not _resolve() or _hooked(st["knobs"].launch_enter_hook) or _hooked(st["knobs"].launch_exit_hook):
        fn[grid](*args, **constexprs, **options)
        return
    device = st["get_device"]()
    if static is None:
        spec, backend = st["specialize"], st["backend"]
        key = (id(fn), device, tuple(constexprs.values()), tuple(options.items()),
               *[spec(backend, a, False, True, True) for a in args])  # fmt: skip
        run_args = args
    else:
        key, run_args = (id(fn), device, static), addresses
    kernel = _CACHE.get(key)
    if kernel is None:
        if len(_CACHE) > 16384:  # keys hold shapes: a long run over many distinct ones starts over (no recompiles)
            _CACHE.clear()
        check_signature(fn, args, constexprs)
        kernel = fn[grid](*args, **constexprs, **options)
        if hasattr(kernel, "result"):  # an asynchronous compile: its future
            kernel = kernel.result()
        _CACHE[key] = kernel
        return
    g = (*grid, 1, 1)
    kernel.run(g[0], g[1], g[2], st["get_stream"](device), kernel.function, kernel.packed_metadata, None, None, None,
               *run_args, *constexprs.values())  # fmt: skip
