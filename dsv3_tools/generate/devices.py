"""Where generation runs: device, engine, compute dtype, the torchrun process group, free memory.

Small self-contained versions of what ``verify`` does for itself (``verify.init_distributed``,
``verify._available`` and the ``auto`` choices of ``cli.verify``), kept here so that ``generate`` does not import
verify's private helpers while that code moves into a shared runtime module; merge them there.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import Dsv3Error, check_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve(device: str, engine: str, dtype: str) -> tuple[str, str, torch.dtype]:
    """``auto`` choices: cuda when visible, the Triton kernels on cuda and the torch references on the CPU,
    bfloat16 on cuda and float32 on the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    if engine == "auto":
        engine = "triton" if device.startswith("cuda") else "torch"
    if engine not in ("triton", "torch"):
        raise Dsv3Error(f"--engine must be auto, triton or torch, got {engine!r}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise Dsv3Error(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return device, engine, DTYPES[dtype]


def init_distributed(device: str) -> tuple[int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on the CPU); (rank, world)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def available_bytes(device: torch.device) -> int | None:
    """Free memory where the model will live: the GPU's, or the host's ``MemAvailable``."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
