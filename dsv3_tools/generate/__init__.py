"""``generate``: talk to a converted checkpoint (chat, batch files, torchrun) on a real KV cache.

The order of a run: resolve the device, join the torchrun group, open the checkpoint, and on rank 0 read the
tokenizer, the chat template and the input, and build every request (bad input raises here, on every rank, before
any weight is read); then the memory plan on every rank (a one-line error if it does not fit); then load the
weights and run: rank 0 chats or runs the batch file and prints, the other ranks follow it.

Modules: ``sampling`` (choosing tokens), ``chat`` (tokenizer, Jinja template, incremental text, stop strings),
``batch`` (input files, requests, results), ``engine`` (prefill and decode steps, rank 0 leading), ``session``
(the interactive chat), ``plan`` (memory), ``graphs`` (CUDA graph of the step); device, engine and dtype come
from ``runtime``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, Dsv3Error
from .batch import SAMPLING_FIELDS, Entry, Request, Result, entries_from_prompts, read_input_file
from .chat import Tokenizer
from .plan import GeneratePlan, PlanError, check_plan, make_plan
from .sampling import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_MAX_SEQ_LEN = 4096
DEFAULT_MAX_BATCH = 8


@dataclass
class Options:
    """Everything ``dsv3-tools generate`` takes (``None``: the checkpoint's default, or the built-in one)."""

    ckpt: Path
    prompts: list[str] = field(default_factory=list)
    input_file: Path | None = None
    system: str | None = None
    raw: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    max_seq_len: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH
    json: bool = False
    device: str = "auto"
    engine: str = "auto"
    gemm: str = "bf16"
    dtype: str = "auto"
    cuda_graph: bool | None = None  # default: on for CUDA
    batch_invariant: bool | None = None  # decode on kernels/rowwise.py (default: model.BATCH_INVARIANT)
    ignore_eos: bool = False
    speculative: str | None = None  # "mtp": greedy decoding with the MTP module's drafts

    @property
    def interactive(self) -> bool:
        return not self.prompts and self.input_file is None


@dataclass
class UI:
    """How results reach the user (the CLI wires these to ``report``)."""

    info: Callable[[str], None]
    write: Callable[[str], None]
    read: Callable[[str], str]
    plan: Callable[[GeneratePlan], None]
    result: Callable[[Result, bool], None]  # (result, whether its text was already streamed)


def defaults(tok: Tokenizer, opts: Options) -> tuple[SamplingParams, int]:
    """Sampling and ``max_new_tokens`` from ``generation_config.json``, overridden by the options. Without
    ``do_sample: true`` there the default is greedy (temperature 0), as in transformers."""
    gc = tok.generation_config
    sample = gc.get("do_sample") is True

    def num(key: str, default: float) -> float:
        v = gc.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default

    base = SamplingParams(
        temperature=float(num("temperature", 1.0)) if sample else 0.0,
        top_p=float(num("top_p", 1.0)),
        top_k=int(num("top_k", 0)),
        min_p=float(num("min_p", 0.0)),
        repetition_penalty=float(num("repetition_penalty", 1.0)),
    )
    params = base.override(**{k: getattr(opts, k) for k in SAMPLING_FIELDS}).check()
    max_new = opts.max_new_tokens
    if max_new is None:
        max_new = int(num("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    if max_new < 1:
        raise Dsv3Error(f"--max-new-tokens must be >= 1, got {max_new}")
    return params, max_new


def max_seq_len(opts: Options, cfg) -> int:
    """The cache length: ``--max-seq-len``, else 4096; never beyond the model's positions, nor (V3.2) the dense
    window of its sparse attention."""
    limit = cfg.max_position_embeddings
    why = "max_position_embeddings"
    if cfg.has_indexer and cfg.index_topk < limit:
        limit, why = cfg.index_topk, "index_topk (sparse attention beyond it is not modelled)"
    n = opts.max_seq_len if opts.max_seq_len is not None else min(DEFAULT_MAX_SEQ_LEN, limit)
    if n < 2:
        raise Dsv3Error(f"--max-seq-len must be >= 2, got {n}")
    if n > limit:
        raise Dsv3Error(f"--max-seq-len {n} is beyond the model's {why} = {limit}")
    return n


def build_requests(entries: list[Entry], tok: Tokenizer, opts: Options, vocab: int, max_len: int) -> list[Request]:
    """Every entry rendered (template or raw), with its sampling, limits and seed (a one-line error naming it)."""
    params, max_new = defaults(tok, opts)
    base_seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
    out = []
    for i, e in enumerate(entries):
        ov = e.overrides
        p = params.override(**{k: ov.get(k) for k in SAMPLING_FIELDS}).check(e.where)
        n_new = ov.get("max_new_tokens", max_new)
        if n_new < 1:
            raise Dsv3Error(f"{e.where}: max_new_tokens must be >= 1, got {n_new}")
        system = e.system if e.system is not None else opts.system
        if opts.raw:
            if e.messages is not None or system is not None:
                raise Dsv3Error(f"{e.where}: --raw sends plain text: 'messages' and a system prompt need the template")
            ids = tok.raw_ids(e.prompt)
            prompt = e.prompt
        else:
            msgs = e.messages if e.messages is not None else [{"role": "user", "content": e.prompt}]
            if system is not None and not any(m["role"] == "system" for m in msgs):
                msgs = [{"role": "system", "content": system}] + msgs
            ids = tok.chat_ids(msgs)
            prompt = e.prompt if e.messages is None else e.messages
        if not ids:
            raise Dsv3Error(f"{e.where}: the prompt has no tokens")
        if len(ids) >= max_len:
            raise Dsv3Error(
                f"{e.where}: the prompt is {len(ids)} tokens and --max-seq-len is {max_len} (prompt and answer "
                "together): raise --max-seq-len or shorten the prompt"
            )
        if max(ids) >= vocab:
            raise Dsv3Error(f"{e.where}: token id {max(ids)} is outside the model's vocabulary [0, {vocab})")
        seed = ov.get("seed", base_seed + i)
        out.append(Request(i, prompt, ids, p, n_new, ov.get("stop", tuple(opts.stop)), seed))
    return out


def _broadcast(obj: object, world: int) -> object:
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _read_input(opts: Options, folder: Path, vocab: int, max_len: int) -> tuple[Tokenizer, list[Request]]:
    """Rank 0's part: the tokenizer and template, and every request (none in the chat)."""
    tok = Tokenizer.load(folder)
    if opts.interactive:
        if tok.template is None and not opts.raw:
            raise Dsv3Error(tok.no_template_message())
        defaults(tok, opts)  # (checks the sampling options now)
        return tok, []
    entries = entries_from_prompts(opts.prompts) if opts.prompts else read_input_file(opts.input_file)
    return tok, build_requests(entries, tok, opts, vocab, max_len)


def _checked_plan(cfg, opts: Options, device: str, dtype, world: int, batch: int, max_len: int) -> GeneratePlan:
    """This rank's memory plan; ``PlanError`` on every rank when any rank's does not fit."""
    import torch

    from ..runtime import available_bytes

    dev = torch.device(device)
    if dev.type == "cuda" and world > 1 and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    plan = make_plan(
        cfg, world=world, batch=batch, max_len=max_len, dtype=dtype, gemm=opts.gemm, device=str(dev),
        available=available_bytes(str(dev)), mtp=opts.speculative == "mtp",
    )  # fmt: skip
    problem = None
    try:
        check_plan(plan, cfg)
    except PlanError as e:
        problem = str(e)
    problems = [problem]
    if world > 1:
        import torch.distributed as dist

        problems = [None] * world
        dist.all_gather_object(problems, problem)
    bad = next((p for p in problems if p is not None), None)
    if bad is not None:
        raise PlanError(bad)
    return plan


def _check_speculative(ck, opts: Options) -> None:
    """``--speculative mtp`` needs the checkpoint's MTP module and one process (a one-line error otherwise)."""
    import os

    cfg = ck.config
    n = cfg.num_hidden_layers
    if cfg.num_nextn_predict_layers < 1 or not any(k.startswith(f"model.layers.{n}.eh_proj") for k in ck.tensors):
        raise Dsv3Error(
            f"{opts.ckpt}: --speculative mtp drafts with the MTP module (model.layers.{n}.*), which this checkpoint "
            "does not have (cast and shard keep it with --mtp keep, the default)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise Dsv3Error("--speculative mtp runs in one process for now (not under torchrun)")


def run_generate(opts: Options, ui: UI) -> int:
    """Run ``generate``; returns the exit code (bad input raises ``Dsv3Error``)."""
    from ..checkpoint import open_checkpoint
    from ..family import is_v4
    from ..runtime import init_distributed, resolve_device, resolve_dtype, resolve_engine
    from .batch import batches

    if opts.prompts and opts.input_file is not None:
        raise Dsv3Error("--prompt and --input-file are exclusive")
    if opts.json and opts.interactive:
        raise Dsv3Error("--json writes batch results: give --prompt or --input-file")
    if opts.max_batch_size < 1:
        raise Dsv3Error(f"--max-batch-size must be >= 1, got {opts.max_batch_size}")
    if opts.gemm not in ("bf16", "fp8"):
        raise Dsv3Error(f"--gemm must be bf16 or fp8, got {opts.gemm!r}")
    if opts.speculative not in (None, "mtp"):
        raise Dsv3Error(f"--speculative must be mtp, got {opts.speculative!r}")
    ck = open_checkpoint(opts.ckpt)  # a bad path answers before torch is imported
    if opts.speculative and ck.config is not None:
        _check_speculative(ck, opts)
    if is_v4(ck.config):
        raise Dsv3Error(f"{opts.ckpt}: generate does not run DeepSeek-V4 yet (its model is not implemented here)")
    import torch

    from ..model import load_model
    from .engine import Engine

    device = resolve_device(opts.device)
    engine_name = resolve_engine(opts.engine, device)
    if opts.batch_invariant and engine_name != "triton":
        raise Dsv3Error("--batch-invariant runs the Triton decode kernels: --engine triton (on a CUDA device)")
    dtype = getattr(torch, resolve_dtype(opts.dtype, device))
    rank, world = init_distributed(device)
    lead = rank == 0
    cfg = ck.config
    if cfg is None:
        raise ConfigError(f"{opts.ckpt}: no model config (config.json)")
    if world > 1 and ck.layout == "mp" and ck.world != world:
        raise Dsv3Error(f"torchrun started {world} processes but {opts.ckpt} is MP-{ck.world}: use {ck.world}")
    max_len = max_seq_len(opts, cfg)

    # Rank 0 reads the input; every rank learns whether it was good before anything heavy happens.
    tok, requests, failure = None, [], None
    if lead:
        try:
            tok, requests = _read_input(opts, ck.path, cfg.vocab_size, max_len)
            if opts.speculative and not all(r.params.greedy for r in requests):
                bad = next(r for r in requests if not r.params.greedy)
                raise Dsv3Error(f"request {bad.index}: --speculative mtp decodes greedily: give --temperature 0")
            if opts.speculative and opts.interactive and not defaults(tok, opts)[0].greedy:
                raise Dsv3Error("--speculative mtp decodes greedily: give --temperature 0")
        except Dsv3Error as e:
            failure = str(e)
    batch = 1 if opts.interactive else min(opts.max_batch_size, max(len(requests), 1))
    failure, batch = _broadcast((failure, batch), world)
    if failure is not None:
        raise Dsv3Error(failure)
    plan = _checked_plan(cfg, opts, device, dtype, world, batch, max_len)
    if lead:
        ui.plan(plan)

    model = load_model(ck, device=device, engine=engine_name, gemm=opts.gemm, stream=False, dtype=dtype,
                       batch_invariant=opts.batch_invariant)  # fmt: skip
    graphs = opts.cuda_graph if opts.cuda_graph is not None else model.env.device.type == "cuda"
    engine = Engine(model, tok, batch, max_len, cuda_graph=graphs, ignore_eos=opts.ignore_eos,
                    speculative=opts.speculative == "mtp")  # fmt: skip
    if not lead:
        if opts.interactive:
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 passes Ctrl-C on with the step's tokens
        engine.follow()
        return 0
    if opts.interactive:
        params, max_new = defaults(tok, opts)
        seed = opts.seed if opts.seed is not None else secrets.randbelow(2**31)
        from .session import ChatIO, chat

        io = ChatIO(ui.read, ui.write, ui.info)
        chat(engine, tok, io, params=params, max_new_tokens=max_new, stop=tuple(opts.stop), seed=seed,
             system=opts.system, raw=opts.raw)  # fmt: skip
    else:
        stream = len(requests) == 1 and not opts.json
        on_text = (lambda _, piece: ui.write(piece)) if stream else None
        for group in batches(requests, batch):  # each batch's results as soon as it ends
            for result in engine.run(group, on_text=on_text):
                ui.result(result, stream)
    engine.close()  # (not after an error: the other ranks stop with torchrun)
    return 0
