"""What ``verify`` found, as data: the report and its parts (``report.render_verify`` shows them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .metrics import LayerStats, LogitStats


@dataclass
class MemoryPlan:
    """What a run needs in memory, estimated from the tensor sizes before anything is loaded."""

    mode: str  # "stream" or "resident"
    device: str
    available_bytes: int | None
    weights_bytes: int  # the whole model's weights as the model holds them (compute dtype, or FP8 for --gemm fp8)
    largest_layer: int | None
    largest_layer_bytes: int
    top_bytes: int  # embedding, final norm, head
    activation_bytes: int
    resident_peak_bytes: int
    stream_peak_bytes: int
    prompts: int = 0
    tokens: int = 0

    @property
    def peak_bytes(self) -> int:
        return self.stream_peak_bytes if self.mode == "stream" else self.resident_peak_bytes


@dataclass
class PromptResult:
    index: int
    tokens: int
    stats: LogitStats
    mtp: LogitStats | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class Divergence:
    """Where the hidden states first leave the tolerance: ``layer`` -1 is the embedding output."""

    layer: int | None  # None: no layer exceeds the tolerance (the difference starts after the last layer)
    where: str
    error: float
    prompt: int | None = None
    position: int | None = None
    # Without teacher forcing: each hidden-state row's error (row 0: embedding, then layer 0, 1, ...); with it, each
    # judged layer's worst-position error (the MTP module's max KL), in the order of ``VerifyReport.layers``.
    layer_errors: list[float] = field(default_factory=list)


@dataclass
class LayerResult:
    """A layer judged alone (teacher-forced on the reference's input): a decoder layer by its output (``stats``),
    the MTP module by its logits (``logits``)."""

    layer: int
    where: str
    stats: LayerStats | None = None
    logits: LogitStats | None = None
    failures: list[str] = field(default_factory=list)


@dataclass
class TensorDiff:
    name: str
    kind: str  # missing / extra / shape / dtype / value
    detail: str
    rel_err: float | None = None


@dataclass
class VerifyReport:
    """Everything ``verify`` found; ``exit_code`` is 0 for pass and 1 for fail (bad input raises instead)."""

    path: str
    layout: str
    world: int
    verdict: str = "pass"
    problems: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checksums: dict | None = None
    reference: str | None = None
    reference_kind: str | None = None  # "file" | "checkpoint"
    saved_reference: str | None = None
    tier: str | None = None
    tier_reasons: list[str] = field(default_factory=list)
    thresholds: dict | None = None
    prompts: list[PromptResult] = field(default_factory=list)
    overall: LogitStats | None = None
    mtp_overall: LogitStats | None = None
    logits_ok: bool | None = None  # the main logits within their limits (None: not compared)
    mtp_logits_ok: bool | None = None
    layers: list[LayerResult] = field(default_factory=list)  # teacher-forced, when the reference holds the inputs
    failures: list[str] = field(default_factory=list)
    divergence: Divergence | None = None
    tensor_diffs: list[TensorDiff] = field(default_factory=list)
    suspect_files: dict[str, int] = field(default_factory=dict)  # this checkpoint's files holding differing tensors
    memory: MemoryPlan | None = None
    run: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "pass" else 1

    def as_dict(self) -> dict:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        if self.memory is not None:
            d["memory"]["peak_bytes"] = self.memory.peak_bytes
        return d
