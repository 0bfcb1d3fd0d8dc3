"""Shared fixtures: tiny synthetic checkpoints in the exact HF format, made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton has no CPU backend: its interpreter runs the kernels on numpy. Must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsv3_tools.synth import synth  # noqa: E402


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config, FP8 with f32 scales, 4 files (one scale stored apart from its weight). Read-only."""
    p = tmp_path_factory.mktemp("ck") / "tiny-fp8"
    synth(p, "tiny", dtype="fp8", seed=0, shards=4)
    return p


@pytest.fixture(scope="session")
def tiny_fp8_ue8m0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config, FP8 with power-of-two (ue8m0) scales, V3.1 style. Read-only."""
    p = tmp_path_factory.mktemp("ck") / "tiny-fp8-ue8m0"
    synth(p, "tiny", dtype="fp8", seed=1, shards=3, scale_fmt="ue8m0")
    return p


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config in BF16 (no scales), 2 files. Read-only."""
    p = tmp_path_factory.mktemp("ck") / "tiny-bf16"
    synth(p, "tiny", dtype="bf16", seed=0, shards=2)
    return p


@pytest.fixture(scope="session")
def tiny_v4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeepSeek-V4 geometry in the released format (FP4 experts, E8M0 scales), one file per layer. Read-only."""
    p = tmp_path_factory.mktemp("ck") / "tiny-v4"
    synth(p, "tiny-v4", seed=0)
    return p


@pytest.fixture(scope="session")
def tiny_v4_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeepSeek-V4 geometry in the -Base format (FP8 experts, F32 scales). Read-only."""
    p = tmp_path_factory.mktemp("ck") / "tiny-v4-base"
    synth(p, "tiny-v4", dtype="fp8", seed=1)
    return p


@pytest.fixture(scope="session")
def tiny_trained_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny config, FP8 with f32 scales, synth's well-conditioned ``trained`` profile (small residual branches,
    router margins): where quantization noise stays small and verify's quantized tier is calibrated. Read-only."""
    p = tmp_path_factory.mktemp("ck") / "tiny-trained-fp8"
    synth(p, "tiny", dtype="fp8", seed=0, shards=4, profile="trained")
    return p


@pytest.fixture
def one_thread():
    """Decode steps on the tiny model: one torch thread is faster than two, and unaffected by other processes on
    the machine (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
