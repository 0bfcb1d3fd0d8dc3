"""Running requests on the model: prefill a batch, then one token per sequence per step on the KV cache.

Rank 0 leads: it samples, decodes text, applies the stops and decides when a batch ends; every step it broadcasts
the tokens to feed (with their positions and the attended length), so the other ranks (``follow``) only run the
model on what they receive and never sample themselves. On one process the same code runs without broadcasts.

Each sequence stops on its own (EOS, a stop string, ``max_new_tokens``, the cache length); a finished sequence
keeps its slot until the batch ends, fed its last token at its last position (its output is ignored), so that
shapes stay fixed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..errors import ConfigError
from ..model import Model
from .batch import Request, Result, batches
from .chat import IncrementalText, StopText, Tokenizer
from .sampling import make_generator, next_tokens

OnText = Callable[[int, str], None]  # (request index, new text)


class _Sequence:
    """One request's progress in a batch (rank 0)."""

    def __init__(self, req: Request, tok: Tokenizer, eos: frozenset[int], max_len: int):
        self.req, self.eos, self.max_len = req, eos, max_len
        self.out: list[int] = []
        self.text = IncrementalText(tok)
        self.stops = StopText(req.stop)
        self.generator = make_generator(req.seed)
        self.finish: str | None = None
        self.seconds = 0.0
        self.drafted = self.accepted = 0  # speculative decoding

    @property
    def position(self) -> int:
        """Where the last token goes when fed (clamped once finished: the slot is idle)."""
        return min(len(self.req.ids) + len(self.out) - 1, self.max_len - 1)

    def seen(self) -> torch.Tensor:
        return torch.tensor(self.req.ids + self.out, dtype=torch.long)

    def push(self, token: int) -> str:
        """Take the sampled token; return the text that may be shown now."""
        self.out.append(token)
        if token in self.eos:
            self.finish = "eos"
            return self.stops.feed(self.text.flush()) + self.stops.finish()
        shown = self.stops.feed(self.text.add(token))
        if self.stops.hit:
            self.finish = "stop"
        elif len(self.out) >= self.req.max_new_tokens or len(self.req.ids) + len(self.out) >= self.max_len:
            shown += self.stops.feed(self.text.flush())
            if not self.stops.hit:
                shown += self.stops.finish()
            self.finish = "stop" if self.stops.hit else "length"
        return shown

    def choose(self, logits: torch.Tensor) -> int:
        """The next token from this sequence's logits [vocab], as plain decoding chooses it."""
        p = self.req.params
        seen = self.seen() if p.repetition_penalty != 1 else None
        return next_tokens(logits[None], [p], [seen], [self.generator])[0]

    def result(self, prefill_seconds: float, speculative: bool = False) -> Result:
        r = self.req
        spec = {"drafted": self.drafted, "accepted": self.accepted} if speculative else None
        return Result(
            r.index, r.prompt, r.ids, self.out, self.stops.text, self.finish or "interrupted", prefill_seconds,
            self.seconds, r.seed, spec,
        )  # fmt: skip


def _chooser(seqs: list[_Sequence], logits: torch.Tensor) -> Callable[[int, int], int]:
    """``pick(i, r)``: greedy sequence i's next token from row r of a step's ``logits``, as ``choose`` makes it,
    with one copy to the host per step: of every row's argmax when no sequence has a repetition penalty (made where
    the logits are), else of the logits (the penalty needs the history, token by token)."""
    if all(s.req.params.repetition_penalty == 1 for s in seqs):
        best = logits.argmax(-1).tolist()
        return lambda i, r: best[r]
    rows = logits.to("cpu", torch.float64)
    return lambda i, r: seqs[i].choose(rows[r])


class Engine:
    """A resident model with its KV cache for ``max_batch`` sequences of up to ``max_len`` tokens."""

    def __init__(
        self,
        model: Model,
        tok: Tokenizer | None,
        max_batch: int,
        max_len: int,
        *,
        cuda_graph: bool = False,
        ignore_eos: bool = False,
        speculative: bool = False,
    ):
        self.model, self.tok = model, tok
        self.speculative = speculative
        if speculative:
            if model.env.group.active:
                raise ConfigError("--speculative mtp runs in one process for now (not under torchrun)")
            model.load_drafter()  # before the cache: it adds the MTP module's cache layer
        self.group, self.device = model.env.group, model.env.device
        self.cache = model.new_cache(max_batch, max_len)
        self.eos = frozenset() if ignore_eos or tok is None else tok.eos_ids
        self.graphs = self.spec_graphs = None
        # (speculative steps in CUDA graphs only on the batch-invariant kernels: the pair that has run on a GPU)
        if cuda_graph and speculative and model.env.invariant_decode:
            from .graphs import SpeculativeGraphs

            self.spec_graphs = SpeculativeGraphs(model, self.cache)
        elif cuda_graph and not speculative:
            from .graphs import GraphDecoder

            self.graphs = GraphDecoder(model, self.cache)

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    # ------------------------------------------------------------------ what every rank runs
    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        if self.graphs is not None:
            self.graphs.ensure(len(prompts))  # captured before the prefill: capturing writes cache rows
        return self.model.prefill(prompts, self.cache)

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        if self.graphs is not None:
            return self.graphs(tokens, positions)
        return self.model.decode(tokens, positions, self.cache, kv_len)

    def _send(self, obj: object) -> object:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _step_message(self, n: int, msg: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens [n], positions [n], attended length, go on (1) or end the batch (0), from rank 0."""
        import torch.distributed as dist

        if msg is None:
            msg = torch.empty(2 * n + 2, dtype=torch.long, device=self.device)
        dist.broadcast(msg, src=0)
        return msg

    # ------------------------------------------------------------------ rank 0
    def run(
        self,
        requests: list[Request],
        on_text: OnText | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Result]:
        """Run every request, ``max_batch`` at a time; ``on_text`` gets text as it is produced, ``should_stop``
        is asked after each step (True ends the batch: its sequences finish as ``interrupted``)."""
        out: list[Result] = []
        for group in batches(requests, self.cache.batch):
            out += self._run_batch(group, on_text, should_stop)
        return out

    def _run_batch(self, reqs: list[Request], on_text: OnText | None, should_stop) -> list[Result]:
        assert self.tok is not None, "rank 0 needs the tokenizer"
        if self.speculative:
            return self._run_batch_speculative(reqs, on_text, should_stop)
        n, active = len(reqs), self.group.active
        seqs = [_Sequence(r, self.tok, self.eos, self.max_len) for r in reqs]
        if active:
            self._send(("batch", [r.ids for r in reqs]))
        t0 = time.perf_counter()
        logits = self._prefill([r.ids for r in reqs])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t1 = time.perf_counter()
        prefill_seconds = t1 - t0
        while True:
            live = [i for i, s in enumerate(seqs) if s.finish is None]
            tokens = next_tokens(
                logits[live],
                [seqs[i].req.params for i in live],
                [seqs[i].seen() if seqs[i].req.params.repetition_penalty != 1 else None for i in live],
                [seqs[i].generator for i in live],
            )
            now = time.perf_counter() - t1
            for i, t in zip(live, tokens):
                shown = seqs[i].push(t)
                seqs[i].seconds = now
                if shown and on_text is not None:
                    on_text(seqs[i].req.index, shown)
            if should_stop is not None and should_stop():
                for s in seqs:
                    if s.finish is None:
                        s.finish, s.seconds = "interrupted", now
            if all(s.finish is not None for s in seqs):
                break
            feed = [s.out[-1] for s in seqs]
            pos = [s.position for s in seqs]
            kv_len = max(pos) + 1
            msg = torch.tensor(feed + pos + [kv_len, 1], dtype=torch.long, device=self.device)
            if active:
                self._step_message(n, msg)
            logits = self._decode(msg[:n], msg[n : 2 * n], kv_len)
        if active:
            self._step_message(n, torch.zeros(2 * n + 2, dtype=torch.long, device=self.device))
        return [s.result(prefill_seconds) for s in seqs]

    def _run_batch_speculative(self, reqs: list[Request], on_text: OnText | None, should_stop) -> list[Result]:
        """Greedy decoding with the MTP module drafting the token after next (one process).

        After the prefill, the MTP module reads each prompt position's final hidden state and the token after it
        (the last one: the token just chosen) and drafts the next-but-one token. Each step then feeds, per
        sequence, its last token and the draft at the next position (two rows of the same cache slot; the
        draft's row attends to the token's row written in the same step). The token's logits give the next token
        exactly as plain decoding would (same prefix, same choice function); when it equals the draft, the
        draft's logits were computed on the true prefix too, so they give a second token for the same step.
        A wrong draft is dropped: its cache row is rewritten by the next step before any position attends to it.
        The MTP module then runs on the new rows (its own cache rows, position by position) for the next drafts.

        With CUDA graphs (``SpeculativeGraphs``) both steps have fixed shapes: every sequence of the batch gets two
        rows in each, the finished ones too (at their last position, outputs ignored), and the MTP module also runs
        the rows whose output is not used (a wrong draft's row: its MTP cache row is rewritten by the next step
        before any position attends to it, as the main model's).
        """
        model, dev = self.model, self.device
        drafter = model.drafter
        assert drafter is not None
        graphs = self.spec_graphs
        seqs = [_Sequence(r, self.tok, self.eos, self.max_len) for r in reqs]
        for s in seqs:
            if not s.req.params.greedy:
                raise ConfigError(f"request {s.req.index}: --speculative mtp decodes greedily (temperature 0)")
        prompts = [r.ids for r in reqs]
        if graphs is not None:
            graphs.ensure(len(prompts))  # captured before the prefill: capturing writes cache rows
        t0 = time.perf_counter()
        logits, h = model.prefill(prompts, self.cache, hidden=True)
        pick = _chooser(seqs, logits)
        chosen = [pick(i, i) for i in range(len(seqs))]
        nxt = torch.tensor([t for p, c in zip(prompts, chosen) for t in p[1:] + [c]], device=dev)
        drafts = drafter.prefill(h, nxt, [len(p) for p in prompts], self.cache).argmax(-1).tolist()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t1 = time.perf_counter()

        def emit(i: int, token: int) -> None:
            shown = seqs[i].push(token)
            seqs[i].seconds = time.perf_counter() - t1
            if shown and on_text is not None:
                on_text(seqs[i].req.index, shown)

        for i, c in enumerate(chosen):
            emit(i, c)
        while True:
            if should_stop is not None and should_stop():
                for s in seqs:
                    if s.finish is None:
                        s.finish, s.seconds = "interrupted", time.perf_counter() - t1
            live = [i for i, s in enumerate(seqs) if s.finish is None]
            if not live:
                break
            fed = list(range(len(seqs))) if graphs is not None else live
            feed, pos = [], []
            for i in fed:
                p = seqs[i].position  # (a live sequence has p + 1 < max_len: it would have ended at its length)
                if seqs[i].finish is None:
                    feed += [seqs[i].out[-1], drafts[i]]
                    pos += [p, p + 1]
                else:  # an idle slot (fixed shapes): both rows at its last position, outputs ignored
                    feed += [seqs[i].out[-1]] * 2
                    pos += [p, p]
            tokens_t, pos_t = torch.tensor(feed, device=dev), torch.tensor(pos, device=dev)
            slots_t = None if graphs is not None else torch.tensor([i for i in fed for _ in (0, 1)], device=dev)
            if slots_t is None:  # (the graphs hold their slots: sequence i in rows 2i and 2i + 1)
                logits, h = graphs.verify(tokens_t, pos_t)
            else:
                logits, h = model.decode(tokens_t, pos_t, self.cache, max(pos) + 1, slots=slots_t, hidden=True)
            pick = _chooser(seqs, logits)
            after = list(feed)  # the token after each row (the MTP module's input), where known
            used: dict[int, int] = {}  # sequence -> the row whose MTP output is its next draft
            for k, i in enumerate(fed):
                s = seqs[i]
                if i not in live:
                    continue
                token = pick(i, 2 * k)
                s.drafted += 1
                emit(i, token)
                after[2 * k] = after[2 * k + 1] = token
                used[i] = 2 * k
                if token == drafts[i] and s.finish is None:
                    s.accepted += 1
                    second = pick(i, 2 * k + 1)
                    emit(i, second)
                    after[2 * k + 1] = second
                    used[i] = 2 * k + 1
            wanted = [i for i in used if seqs[i].finish is None]
            if not wanted:
                continue
            if graphs is not None:
                out = graphs.draft(h, torch.tensor(after, device=dev), pos_t).argmax(-1).tolist()
                for i in wanted:
                    drafts[i] = out[used[i]]
                continue
            # eagerly: only the rows whose tokens are known (a row per emitted token of a live sequence)
            rows = [r for k, i in enumerate(fed) if i in wanted for r in range(2 * k, used[i] + 1)]
            sel = torch.tensor(rows, device=dev)
            out = drafter.decode(
                h[sel], torch.tensor([after[r] for r in rows], device=dev), pos_t[sel], slots_t[sel], self.cache,
                max(pos[r] for r in rows) + 1,
            ).argmax(-1).tolist()  # fmt: skip
            for j, r in enumerate(rows):
                if used[fed[r // 2]] == r:
                    drafts[fed[r // 2]] = out[j]
        return [s.result(t1 - t0, speculative=True) for s in seqs]

    def close(self) -> None:
        """Release the other ranks from ``follow``."""
        if self.group.active:
            self._send(("exit", None))

    # ------------------------------------------------------------------ ranks 1 ..
    def follow(self) -> None:
        """Run what rank 0 sends until it closes."""
        while True:
            kind, prompts = self._send(None)
            if kind == "exit":
                return
            n = len(prompts)
            self._prefill(prompts)
            while True:
                msg = self._step_message(n)
                if int(msg[-1]) == 0:
                    break
                self._decode(msg[:n], msg[n : 2 * n], int(msg[-2]))
