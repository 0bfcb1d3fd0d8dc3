"""A short launch path for the project's Triton and Gluon kernels: the compiled variant is looked up by the same
specialization the JIT computes, and launched directly.

``kernel[grid](...)`` costs tens of microseconds of host time per call on these Xeon VMs (binding the arguments,
building the cache key as a string, checking the kernel's globals, fetching device and stream). For a GEMM whose
kernel takes 8 us (M = 128) that host time, not the GPU, bounds the call rate. Here the first call of each variant
goes through the JIT (which compiles it) and records the compiled kernel under a key made of Triton's own
per-argument specialization (``native_specialize_impl``: the dtype and 16-byte alignment of each pointer, the
integer width and divisibility by 16 of each integer, equality to 1, a descriptor's block and layout), the
constexprs and the compile options. Later calls with the same key launch that kernel at once.

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
        _STATE["tensor"] = torch.Tensor
        _STATE["knobs"] = knobs.runtime
    except Exception as e:  # interpreter, or a Triton whose internals differ: the JIT path every time
        _STATE["off"] = f"{type(e).__name__}: {e}"
        return False
    return True


def check_signature(fn: Any, args: tuple, constexprs: dict) -> None:
    """The compiled kernel takes its parameters by position: ``args`` then ``constexprs`` must be exactly the
    kernel's parameters, in order (a JIT call by keyword would hide a wrong order until the second call)."""
    names = getattr(fn, "arg_names", None)
    if names is not None and (len(names) != len(args) + len(constexprs) or list(constexprs) != names[len(args) :]):
        raise TypeError(f"{len(args)} arguments then constexprs {list(constexprs)} do not match the parameters {names}")


def launch(fn: Any, grid: tuple[int, ...], args: tuple, constexprs: dict, static: Any = None, **options: Any) -> None:
    """``fn[grid](*args, **constexprs, **options)``, with the JIT's binding skipped after the first call of each
    specialization. ``args`` are the kernel's runtime parameters in order, ``constexprs`` the rest, also in order
    (the compiled kernel takes every parameter by position).

    ``static``: a hashable value from the caller that fixes everything the specialization depends on except the
    tensors' 16-byte alignment (the constexprs and options, every integer argument, each tensor's dtype, each
    descriptor's block) and guarantees that every tensor is in CUDA device memory: then only the alignment of the
    tensor arguments is looked at, and they are passed as bare addresses (the launcher's own check of each pointer,
    which would catch a CPU tensor, is skipped), which is cheaper."""
    st = _STATE
    if not _resolve() or _hooked(st["knobs"].launch_enter_hook) or _hooked(st["knobs"].launch_exit_hook):
        fn[grid](*args, **constexprs, **options)
        return
    device = st["get_device"]()
    if static is None:
        spec, backend = st["specialize"], st["backend"]
        key = (id(fn), device, tuple(constexprs.values()), tuple(options.items()),
               *[spec(backend, a, False, True, True) for a in args])  # fmt: skip
    else:
        # The tensors go to the launcher as their addresses, read here once for the alignment: it then skips its
        # own data_ptr() call and pointer query per tensor (the caller has checked the operands' device).
        tensor, bits, run_args = st["tensor"], [], []
        for a in args:
            if isinstance(a, tensor):
                a = a.data_ptr()
                bits.append(a % 16 == 0)
            run_args.append(a)
        key = (id(fn), device, static, *bits)
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
               *(args if static is None else run_args), *constexprs.values())  # fmt: skip
