"""Continuous batching: requests join the running batch between decode steps and leave it when done.

:class:`memgen.engine.DecodeSession` decodes a fixed batch from start to end. A server cannot
wait for a batch to finish before it starts the next request, so :class:`ContinuousEngine`
keeps one running batch whose rows come and go. Each :meth:`ContinuousEngine.step`:

1. drops the rows of cancelled requests (their cache rows are freed at once);
2. admits waiting requests while rows are free (a request with ``num_samples = n`` takes n rows);
3. prefills at most ``prefill_chunk`` prompt tokens of admitted requests, each request in a cache
   of its own, so admitting a long prompt stalls the running rows for one chunk at most;
4. moves each fully prefilled request into the running batch: it weaves at the prompt end (or the
   trigger decides there), shares its cache out to its samples and is joined to the batch by
   left-padding (:func:`memgen.reasoner.join_rows`); running rows are never re-prefilled;
5. decodes one token for every running row, weaves at delimiters per row as ``DecodeSession``
   does, and drops finished rows from the cache.

Every row carries its own settings (sampling, stop strings, memory policy, insertion cap,
seed), its own token and decision generators and its own insertion log, so a request's tokens
and insertions under greedy decoding do not depend on which other rows shared its steps: the
only difference from running it alone is masked pad slots, which attention never reads
(``tests/test_continuous.py`` proves it in float64 for memory off, always and the trigger,
joining at every step). With a seed, a row's samples are those of ``DecodeSession`` on that
prompt alone, up to float rounding of the logits.

Departures from ``DecodeSession``: log-probs are the raw model's (temperature 1, as OpenAI and
vLLM report them), the insertion filter and ``return_latents`` are not offered, and a request's
samples draw from generators seeded ``seed``, ``seed + 1``, ... (one per sample) instead of one
generator shared by the batch.

A :class:`ContinuousEngine` runs either in the caller's thread (:meth:`run_until_idle`) or in a
background thread (:meth:`start`), which is how ``memgen serve`` uses it; :meth:`submit` and
:meth:`EngineRequest.cancel` are thread-safe.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .config import GenerateConfig
from .dataclass_cli import help_field
from .engine import (
    DECISION_SEED_OFFSET,
    Completion,
    Insertion,
    _logged,
    check_prompt_fits,
    eos_token_ids,
    hit_stop,
    insert_decisions,
)
from .errors import InputError, MemGenError
from .reasoner import compact_cache, join_rows, select_rows
from .sampling import select_tokens
from .weaver import INFERENCE, PROMPT, pack_context


class QueueFullError(MemGenError):
    """The engine's waiting queue is full; try again later."""


class EngineStoppedError(MemGenError):
    """The engine is shutting down and admits no more requests."""


@dataclass
class ContinuousConfig:
    """Capacity of a continuous-batching engine."""

    max_rows: int = help_field(16, "most rows decoding at once (a request with n samples takes n rows)", ge=1)
    max_queue: int = help_field(64, "most requests waiting for rows; further requests are refused", ge=0)
    prefill_chunk: int = help_field(
        256, "prompt tokens prefilled per engine step (bounds the stall of running rows)", ge=1
    )
    compact_after: int = help_field(64, "compact the KV cache once this many masked pad slots have accumulated", ge=1)


@dataclass
class StepEvent:
    """One generated token of one sample of a request, with the insertions logged since its previous token."""

    request: EngineRequest
    index: int
    """which sample of the request (0 .. num_samples - 1)"""
    token_id: int
    logprob: float | None
    """log p(token) under the raw model (None unless the request asked for log-probs)"""
    top_logprobs: list[tuple[int, float]] | None
    """the ``top_logprobs`` most likely (token id, log p) at this step, when asked for"""
    insertions: list[Insertion]
    """decisions logged since this sample's previous token; ``position`` says which token they precede"""
    finish_reason: str | None
    """None while the sample runs; ``eos``, ``stop`` or ``length`` on its last token"""


_ids = itertools.count()


class EngineRequest:
    """A prompt and its :class:`GenerateConfig`, as submitted to a :class:`ContinuousEngine`.

    ``on_event(StepEvent)`` is called from the engine's thread for every token, and
    ``on_done(request)`` once the request has finished, failed or been cancelled; ``result()``
    waits for every sample's :class:`memgen.engine.Completion`.
    """

    def __init__(
        self,
        prompt_ids: list[int],
        config: GenerateConfig | None = None,
        on_event=None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        on_done=None,
    ) -> None:
        if not prompt_ids:
            raise InputError("empty prompt: memgen needs at least one prompt token to condition on")
        self.id = next(_ids)
        self.prompt_ids = list(prompt_ids)
        self.config = config or GenerateConfig()
        self.on_event = on_event
        self.on_done = on_done
        self.logprobs = logprobs or top_logprobs > 0
        self.top_logprobs = top_logprobs
        self.completions: list[Completion | None] = [None] * self.config.num_samples
        self.error: BaseException | None = None
        self.cancelled = False
        self.submitted_at = time.perf_counter()
        self._done = threading.Event()

    @property
    def num_samples(self) -> int:
        return self.config.num_samples

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this request; its rows are dropped at the engine's next step."""
        self.cancelled = True

    def result(self, timeout: float | None = None) -> list[Completion]:
        """Every sample's completion; raises the engine's error if decoding failed."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.error is not None:
            raise self.error
        if self.cancelled and any(c is None for c in self.completions):
            raise InputError(f"request {self.id} was cancelled")
        return list(self.completions)

    def _finish(self, error: BaseException | None = None) -> None:
        if error is not None and self.error is None:
            self.error = error
        self._done.set()
        if self.on_done is not None:
            self.on_done(self)


@dataclass
class _Row:
    """One sample's decoding state (its cache row lives in the batch at the row's index)."""

    request: EngineRequest
    index: int
    token_gen: torch.Generator | None
    decision_gen: torch.Generator
    prompt_text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    logs: list[Insertion] = field(default_factory=list)
    reported: int = 0
    inserted: int = 0

    @property
    def config(self) -> GenerateConfig:
        return self.request.config


@dataclass
class _Prefill:
    """A request whose prompt is being prefilled, chunk by chunk, in a cache of its own."""

    request: EngineRequest
    cache: object
    fed: int = 0
    last: torch.Tensor | None = None


class ContinuousEngine:
    """A running batch that requests join and leave between decode steps (see the module docstring)."""

    def __init__(self, memgen, config: ContinuousConfig | None = None, experience=None) -> None:
        self.m = memgen
        self.cfg = config or ContinuousConfig()
        self.reader = experience
        self.k_prompt = memgen.weaver.num_latents(PROMPT)
        self.k_infer = memgen.weaver.num_latents(INFERENCE)
        self.context = memgen.reasoner.context_length
        tok = memgen.tokenizer
        eos = eos_token_ids(memgen)
        self.eos_ids = frozenset(eos)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (min(eos) if eos else 0)
        self._lock = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._prefilling: list[_Prefill] = []
        self._rows: list[_Row] = []
        self._cache = None
        self._mask = self._next_pos = self._logits = None
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.counters = {
            "requests": 0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "decisions": 0,
            "invoked": 0,
            "insertions": 0,
            "latent_slots": 0,
            "steps": 0,
            "compactions": 0,
        }

    # ------------------------------------------------------------------ submission (any thread)
    def check(self, request: EngineRequest) -> None:
        """Raise :class:`InputError` if the request can never run on this engine."""
        cfg = request.config
        if cfg.num_samples > self.cfg.max_rows:
            raise InputError(f"{cfg.num_samples} samples need more rows than the engine's {self.cfg.max_rows}")
        self.m.encode_prompts([request.prompt_ids])  # token ids inside the vocabulary
        prompt_latents = self.k_prompt if (cfg.policy.kind != "off" and cfg.insert_at_prompt_end) else 0
        check_prompt_fits(len(request.prompt_ids), prompt_latents, self.context)

    def submit(self, request: EngineRequest) -> EngineRequest:
        """Queue ``request``; raises :class:`QueueFullError` or :class:`EngineStoppedError` when refused."""
        self.check(request)
        with self._lock:
            if not self._accepting:
                raise EngineStoppedError("the engine is shutting down and admits no new requests")
            if self._queue_full():
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting (max_queue)")
            self._waiting.append(request)
            self.counters["requests"] += 1
            self._lock.notify_all()
        return request

    def _queue_full(self) -> bool:
        """True when ``max_queue`` requests already wait beyond the rows that are free now."""
        free = max(0, self.cfg.max_rows - self._rows_in_use())
        return len(self._waiting) >= self.cfg.max_queue + free

    def _rows_in_use(self) -> int:
        return len(self._rows) + sum(p.request.num_samples for p in self._prefilling)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._rows)

    def load(self) -> dict:
        """Queue length and running rows, for metrics."""
        return {"waiting": len(self._waiting), "prefilling": len(self._prefilling), "running_rows": len(self._rows)}

    # ------------------------------------------------------------------ running
    def run_until_idle(self) -> None:
        """Step in the calling thread until no request is left."""
        while self.busy:
            self.step()

    def start(self) -> None:
        """Step in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="memgen-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Admit nothing more; with ``drain`` finish every admitted request first, else cancel them."""
        with self._lock:
            self._accepting = False
            if not drain:
                for request in self._all_requests():
                    request.cancel()
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """Let a waiting engine thread notice a cancellation now."""
        with self._lock:
            self._lock.notify_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.busy and not self._stop:
                    self._lock.wait()
                if not self.busy and self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # a failed step fails its requests, never the engine
                self._fail_all(exc)

    def _all_requests(self) -> list[EngineRequest]:
        seen = {}
        for request in [*self._waiting, *(p.request for p in self._prefilling), *(r.request for r in self._rows)]:
            seen[request.id] = request
        return list(seen.values())

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            requests = self._all_requests()
            self._waiting.clear()
        self._prefilling, self._rows = [], []
        self._cache = self._mask = self._next_pos = self._logits = None
        for request in requests:
            self.counters["failed"] += 1
            request._finish(exc)

    def step(self) -> None:
        """One engine step: drop cancelled rows, admit, prefill one chunk, decode one token per running row."""
        with torch.inference_mode():
            self._drop_cancelled()
            self._admit()
            self._prefill()
            if self._rows:
                self._decode()
            self.counters["steps"] += 1

    # ------------------------------------------------------------------ admission and prefill
    def _drop_cancelled(self) -> None:
        with self._lock:
            gone = [r for r in self._waiting if r.cancelled]
            for request in gone:
                self._waiting.remove(request)
        dropped = {p.request.id: p.request for p in self._prefilling if p.request.cancelled}
        self._prefilling = [p for p in self._prefilling if not p.request.cancelled]
        keep = [i for i, row in enumerate(self._rows) if not row.request.cancelled]
        dropped.update({row.request.id: row.request for row in self._rows if row.request.cancelled})
        if len(keep) < len(self._rows):
            self._keep_rows(keep)
        for request in [*gone, *dropped.values()]:
            self.counters["cancelled"] += 1
            request._finish()

    def _admit(self) -> None:
        with self._lock:
            while self._waiting and self._rows_in_use() + self._waiting[0].num_samples <= self.cfg.max_rows:
                request = self._waiting.popleft()
                self._prefilling.append(_Prefill(request, self.m.reasoner.new_cache()))
                self.counters["prompt_tokens"] += len(request.prompt_ids)

    def _prefill(self) -> None:
        budget = self.cfg.prefill_chunk
        reasoner, device = self.m.reasoner, self.m.device
        for pending in list(self._prefilling):
            if budget <= 0:
                break
            prompt = pending.request.prompt_ids
            take = min(budget, len(prompt) - pending.fed)
            end = pending.fed + take
            hidden = reasoner.hidden(
                input_ids=torch.tensor([prompt[pending.fed : end]], device=device),
                attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                position_ids=torch.arange(pending.fed, end, device=device)[None],
                cache=pending.cache,
            )
            pending.fed, pending.last = end, hidden[:, -1]
            budget -= take
            if end == len(prompt):
                self._prefilling.remove(pending)
                self._join(pending)

    def _generators(self, config: GenerateConfig, index: int):
        device = self.m.device
        if config.seed is None:
            return None, torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,))))
        seed = config.seed + index
        return (
            torch.Generator(device=device).manual_seed(seed),
            torch.Generator(device=device).manual_seed(seed + DECISION_SEED_OFFSET),
        )

    def _join(self, pending: _Prefill) -> None:
        """Weave at the prompt end, share the prompt out to the request's samples, join the running batch."""
        m, request = self.m, pending.request
        cfg = request.config
        device = m.device
        length = len(request.prompt_ids)
        cache, last = pending.cache, pending.last
        mask = torch.ones((1, length), dtype=torch.long, device=device)
        next_pos = torch.tensor([length], device=device)
        logits = m.reasoner.logits(last)
        prompt_text = m.tokenizer.decode(request.prompt_ids, skip_special_tokens=True) if self._reads(cfg) else ""
        insert_here = cfg.policy.kind != "off" and cfg.insert_at_prompt_end
        decides = insert_here and m.config.trigger_at_prompt_end and cfg.policy.kind in ("trigger", "random")
        logs: list[Insertion] = []
        if insert_here and not decides:
            every = torch.ones(1, dtype=torch.bool, device=device)
            (found,) = self._found([prompt_text], [""], [True]) if self._reads(cfg) else (None,)
            context = self._context({0: found}, 1)
            _, hidden, mask, next_pos, _ = m.weave_and_feed(cache, mask, next_pos, every, PROMPT, last, context=context)
            logits = m.reasoner.logits(hidden[:, -1])
            logs.append(_logged(Insertion(0, None, True), found))
            self.counters["insertions"] += 1
            self.counters["latent_slots"] += self.k_prompt
        n = request.num_samples
        if n > 1:
            cache.batch_repeat_interleave(n)
            mask, next_pos = mask.repeat_interleave(n, 0), next_pos.repeat_interleave(n, 0)
            logits, last = logits.repeat_interleave(n, 0), last.repeat_interleave(n, 0)
        rows = []
        for i in range(n):
            token_gen, decision_gen = self._generators(cfg, i)
            rows.append(_Row(request, i, token_gen, decision_gen, prompt_text, logs=list(logs)))
        if decides:
            candidates = torch.ones(n, dtype=torch.bool, device=device)
            mask, next_pos, logits = self._weave(
                rows, cache, mask, next_pos, logits, last, candidates, PROMPT, lambda row: 0
            )
        if self._cache is None:
            self._cache, self._mask, self._next_pos, self._logits = cache, mask, next_pos, logits
        else:
            self._cache, self._mask = join_rows(m.reasoner, self._cache, self._mask, cache, mask)
            self._next_pos = torch.cat([self._next_pos, next_pos])
            self._logits = torch.cat([self._logits, logits])
        self._rows.extend(rows)

    # ------------------------------------------------------------------ insertion decisions
    def _reads(self, config: GenerateConfig) -> bool:
        return self.reader is not None and config.policy.kind != "off"

    def _found(self, prompts: list[str], answers: list[str], wanted: list[bool]):
        """What the experience reader returns for each wanted (prompt, answer so far); None elsewhere."""
        found = [None] * len(prompts)
        index = [i for i, w in enumerate(wanted) if w]
        if index:
            queries = [self.reader.query_text(prompts[i], answers[i]) for i in index]
            for i, got in zip(index, self.reader.read(queries)):
                found[i] = got
        return found

    def _context(self, found: dict, batch: int):
        rows = {r: got.token_ids for r, got in found.items() if got is not None}
        return pack_context(rows, batch, self.pad_id, self.m.device)

    def _weave(self, rows, cache, mask, next_pos, logits, anchor, candidates, kind, position):
        """Decide for the candidate rows, each under its own policy, weave for those that insert, log every decision.

        Returns the grown mask, the advanced positions and the logits of the next token.
        """
        m, device = self.m, self.m.device
        index = candidates.nonzero().squeeze(1)
        probs = torch.zeros(candidates.shape, device=device)
        probs[index] = torch.sigmoid(m.decision_head(kind == PROMPT)(anchor[index])).float().view(-1)
        prob_list = probs.tolist()
        insert = torch.zeros_like(candidates)
        for r in index.tolist():  # each row under its own policy, drawing from its own generator
            gen = rows[r].decision_gen
            insert[r] = bool(
                insert_decisions(rows[r].config, probs[r], lambda: torch.rand((1,), generator=gen, device=device))
            )
        insert_list = insert.tolist()
        reading = [insert_list[r] and self._reads(rows[r].config) for r in range(len(rows))]
        found = [None] * len(rows)
        if any(reading):
            answers = [m.tokenizer.decode(row.tokens) if reading[r] else "" for r, row in enumerate(rows)]
            found = self._found([row.prompt_text for row in rows], answers, reading)
        if any(insert_list):
            context = self._context(dict(enumerate(found)), len(rows))
            _, hidden, mask, next_pos, insert = m.weave_and_feed(
                cache, mask, next_pos, insert, kind, anchor, allow_subset=True, context=context
            )
            logits = torch.where(insert[:, None], m.reasoner.logits(hidden[:, -1]), logits)
        k = self.k_prompt if kind == PROMPT else self.k_infer
        for r in index.tolist():
            row, inserted = rows[r], bool(insert[r])
            row.logs.append(_logged(Insertion(position(row), prob_list[r], inserted), found[r]))
            self.counters["decisions"] += 1
            if inserted:
                self.counters["invoked"] += 1
                self.counters["insertions"] += 1
                self.counters["latent_slots"] += k
                if kind == INFERENCE:
                    row.inserted += 1
        return mask, next_pos, logits

    # ------------------------------------------------------------------ decoding
    def _choose(self) -> torch.Tensor:
        logits = self._logits
        chosen = torch.argmax(logits, dim=-1)
        for r, row in enumerate(self._rows):
            cfg = row.config
            if cfg.do_sample:
                chosen[r] = select_tokens(
                    logits[r : r + 1], True, cfg.temperature, cfg.top_k, cfg.top_p, row.token_gen
                )[0]
        return chosen

    def _decode(self) -> None:
        m, reasoner, device = self.m, self.m.reasoner, self.m.device
        rows = self._rows
        chosen = self._choose()
        chosen_list = chosen.tolist()
        wants = [r for r, row in enumerate(rows) if row.request.logprobs]
        scored = {}
        if wants:
            logp = self._logits[wants].log_softmax(dim=-1)
            picked = logp.gather(1, chosen[wants][:, None]).squeeze(1).tolist()
            top_n = max(rows[r].request.top_logprobs for r in wants)
            top = logp.topk(top_n, dim=-1) if top_n > 0 else None
            for j, r in enumerate(wants):
                n = rows[r].request.top_logprobs
                tops = (
                    list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist()))
                    if n and top is not None
                    else None
                )
                scored[r] = (picked[j], tops)
        next_pos = self._next_pos.tolist()
        keep, events = [], []
        for r, row in enumerate(rows):
            cfg, token = row.config, chosen_list[r]
            row.tokens.append(token)
            lp, tops = scored.get(r, (None, None))
            if lp is not None:
                row.logprobs.append(lp)
            reason = None
            if token in self.eos_ids and not cfg.ignore_eos:
                reason = "eos"
            elif cfg.stop and hit_stop(self.m.tokenizer, row.tokens, cfg.stop):
                reason = "stop"
            elif len(row.tokens) >= cfg.max_new_tokens or (
                self.context is not None and next_pos[r] + 1 >= self.context
            ):
                reason = "length"
            fresh, row.reported = row.logs[row.reported :], len(row.logs)
            events.append(StepEvent(row.request, row.index, token, lp, tops, fresh, reason))
            if reason is None:
                keep.append(r)
            else:
                self._complete(row, reason)
        self.counters["generated_tokens"] += len(rows)
        for event in events:
            if event.request.on_event is not None:
                event.request.on_event(event)
        kept = set(keep)
        finished_requests = {row.request.id: row.request for r, row in enumerate(rows) if r not in kept}
        for request in finished_requests.values():
            if all(c is not None for c in request.completions):
                self.counters["finished"] += 1
                request._finish()
        if len(keep) < len(rows):
            self._keep_rows(keep)
            chosen = chosen[torch.tensor(keep, dtype=torch.long, device=device)] if keep else chosen[:0]
        if not self._rows:
            return
        rows = self._rows
        batch = len(rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones(batch, 1)], dim=1)
        hidden = reasoner.hidden(
            input_ids=chosen[:, None],
            attention_mask=self._mask,
            position_ids=self._next_pos[:, None],
            cache=self._cache,
        )
        self._next_pos = self._next_pos + 1
        self._logits = reasoner.logits(hidden[:, -1])
        candidates = torch.zeros(batch, dtype=torch.bool, device=device)
        delimiters = m.delimiter_lookup[chosen].tolist()
        next_pos = self._next_pos.tolist()
        for r, row in enumerate(rows):
            cfg = row.config
            candidates[r] = (
                cfg.policy.kind != "off"
                and delimiters[r]
                and row.inserted < cfg.max_insertions
                and (self.context is None or next_pos[r] + self.k_infer + 1 < self.context)
            )
        if bool(candidates.any()):
            self._mask, self._next_pos, self._logits = self._weave(
                rows,
                self._cache,
                self._mask,
                self._next_pos,
                self._logits,
                hidden[:, -1],
                candidates,
                INFERENCE,
                lambda row: len(row.tokens),
            )
        pad_slots = self._mask.shape[1] - int(self._mask.sum(dim=1).max())
        if pad_slots >= self.cfg.compact_after:
            self._mask = compact_cache(self._cache, self._mask)
            self.counters["compactions"] += 1

    def _complete(self, row: _Row, reason: str) -> None:
        row.request.completions[row.index] = Completion(
            token_ids=row.tokens,
            text=self.m.tokenizer.decode(row.tokens, skip_special_tokens=True),
            finish_reason=reason,
            insertions=row.logs,
            logprobs=row.logprobs if row.request.logprobs else None,
        )

    def _keep_rows(self, keep: list[int]) -> None:
        """Free the cache rows not in ``keep`` (the batch keeps its order)."""
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._next_pos = self._logits = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.m.device)
        self._cache = select_rows(self._cache, index, self.m.reasoner)
        self._mask = self._mask.index_select(0, index)
        self._next_pos = self._next_pos.index_select(0, index)
        self._logits = self._logits.index_select(0, index)
        # Columns no remaining row uses are dropped now rather than carried to the next compaction.
        if int(self._mask.sum(dim=1).max()) < self._mask.shape[1] and not bool(self._mask[:, 0].any()):
            self._mask = compact_cache(self._cache, self._mask)
            self.counters["compactions"] += 1
