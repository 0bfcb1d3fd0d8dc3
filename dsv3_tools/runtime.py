"""Where work runs, resolved in one place: the device, the kernel engine, and the torchrun process group.

``--device auto`` means a CUDA GPU when torch sees one (and, for a stage that needs a Triton kernel, the kernel
imports), else the CPU; ``--engine auto`` means Triton on CUDA, plain torch on the CPU. Under ``torchrun``
(``WORLD_SIZE`` > 1) each process joins the default group (NCCL on CUDA, gloo on the CPU) and works on its
``LOCAL_RANK``'s GPU.
"""

from __future__ import annotations

import atexit
import os
import re
from collections.abc import Callable

from .errors import DeviceError

ENGINES = ("triton", "torch")


def check_device(device: str) -> None:
    """Raise a one-line ``DeviceError`` for a ``--device`` torch cannot use here (cpu, cuda, cuda:N)."""
    if device == "cpu":
        return
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if m is None:
        raise DeviceError(f"--device must be cpu, cuda or cuda:N (or auto), got {device!r}")
    import torch

    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu")
    if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")


def resolve_device(device: str, *, kernel: Callable[[bool], object | None] | None = None) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible (and ``kernel(False)`` finds the stage's GPU kernel), else ``cpu``;
    an explicit device is checked (``kernel(True)`` raises when its kernel is missing)."""
    if device == "auto":
        import torch

        gpu = torch.cuda.is_available() and (kernel is None or kernel(False) is not None)
        return "cuda" if gpu else "cpu"
    check_device(device)
    if device != "cpu" and kernel is not None:
        kernel(True)
    return device


def resolve_engine(engine: str, device: str) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` on the CPU; anything else must name an engine."""
    if engine == "auto":
        return "triton" if device.startswith("cuda") else "torch"
    if engine not in ENGINES:
        raise DeviceError(f"--engine must be auto, {' or '.join(ENGINES)}, got {engine!r}")
    return engine


DTYPES = ("float32", "bfloat16")


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> ``bfloat16`` on CUDA, ``float32`` on the CPU; anything else must name a compute dtype."""
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise DeviceError(f"--dtype must be auto, {' or '.join(DTYPES)}, got {dtype!r}")
    return dtype


def available_bytes(device: str) -> int | None:
    """Free memory where a model would live: the GPU's (``cuda``, ``cuda:N``), or the host's ``MemAvailable``."""
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def local_rank() -> int:
    """This process's GPU index on its node under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(device: str) -> tuple[int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU); return (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo")
        # Left to the interpreter's teardown, the group's C++ threads can still be joinable when they are destroyed,
        # which aborts the process (std::terminate) after its work is done: tear it down first.
        atexit.register(_destroy_group)
    return dist.get_rank(), dist.get_world_size()


def _destroy_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the initialized default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_device(device: str, world: int):
    """The torch device for this process: ``cuda`` means this rank's GPU (``LOCAL_RANK``) under torchrun."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and world > 1:
        return torch.device("cuda", local_rank() % max(torch.cuda.device_count(), 1))
    return dev
