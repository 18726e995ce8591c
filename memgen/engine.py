"""Batched decoding with latent memory, keeping the KV cache across insertions.

A :class:`DecodeSession` is a compact per-row state machine in the spirit of nanochat's
``engine.py``. Prompts are left-padded and prefilled once (and, with ``num_samples > 1``,
the prefilled cache is shared by the samples). Each step picks one token per row, feeds it,
and, for rows whose fed token is a delimiter, asks the insertion policy. Rows that insert
get K latents appended to the cache at their own next positions; rows that do not get K
masked pad slots, so the batch stays one tensor. Nothing is ever re-prefilled (the authors'
code re-encodes the whole sequence after each insertion). Masked pad slots are squeezed out
by :func:`memgen.reasoner.compact_cache` once ``compact_after`` of them pile up.

An insertion filter (``insertion_filter``) sees each woven insertion's latents before they are
fed and may withhold them: the weaver has run, but the row gets masked pad slots exactly as a
row that did not insert (its positions do not advance, its next token is read from the
delimiter's state, and the insertion does not count against ``max_insertions``). So withholding
every insertion is memory off, token for token (:mod:`memgen.analysis` ablates clusters so).

A step where the fed token is a delimiter and the row inserts: the reasoner's logits for the
next token come from the last latent slot, i.e. the next token is conditioned on the memory.
Finished rows stop decoding (they are fed masked pad slots until the batch ends) and stop
triggering.

:class:`TurnSession` runs the same state machine over the turns of agent episodes: between turns
each continuing row appends its observation to its own cache row and weaves at the new turn's
start, so a multi-turn episode is never re-prefilled (:mod:`memgen.agents`).

Forced decoding (``forced``): the same state machine, fed given continuation tokens instead of
chosen ones, so a continuation is scored with latents woven exactly where the policy weaves them
while reading it (:mod:`memgen.forced`; lm-eval's ``loglikelihood`` under memory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .config import GenerateConfig
from .errors import InputError
from .reasoner import compact_cache
from .sampling import select_tokens, token_logprobs
from .weaver import INFERENCE, PROMPT, pack_context

# Insertion decisions draw from their own generator, seeded ``seed + DECISION_SEED_OFFSET``.
DECISION_SEED_OFFSET = 1_000_003


@dataclass
class Insertion:
    """One insertion decision: latents sit before completion token ``position`` (0 = prompt end)."""

    position: int
    probability: float | None
    inserted: bool
    latents: torch.Tensor | None = None
    retrieved: list[str] | None = None
    """ids of the experience records the weaver read (retrieval-augmented weaving), best first"""
    context_ids: list[int] | None = None
    """the token ids of the retrieved text the weaver read, as teacher forcing replays them"""
    suppressed: bool = False
    """the weaver ran here but an insertion filter withheld its latents (``inserted`` is then False)"""


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    insertions: list[Insertion]
    logprobs: list[float] | None = None
    logits: torch.Tensor | None = None

    @property
    def num_insertions(self) -> int:
        return sum(1 for ins in self.insertions if ins.inserted)

    @property
    def insertion_positions(self) -> list[int]:
        """Where latents were woven, in the form :meth:`MemGen.teacher_forced` takes."""
        return [ins.position for ins in self.insertions if ins.inserted]

    @property
    def insertion_contexts(self) -> list[list[int]]:
        """The retrieved token ids read at each woven insertion (empty without retrieval), for teacher forcing."""
        return [list(ins.context_ids or []) for ins in self.insertions if ins.inserted]


@dataclass
class GenerationOutput:
    completions: list[Completion]
    stats: dict = field(default_factory=dict)

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


@dataclass
class TokenEvent:
    row: int
    token_id: int
    text: str
    finished: bool


@dataclass
class _Rows:
    """The batch's decoding state: the shared cache and, per row, its mask, next position and next-token logits."""

    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    logits: torch.Tensor
    last: torch.Tensor
    """(B, d) each row's reasoner state at its last fed token (where a prompt-end decision reads)"""
    logs: list[list[Insertion]]
    token_gen: torch.Generator | None
    decision_gen: torch.Generator
    stats: dict
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    step_logits: list[torch.Tensor] = field(default_factory=list)
    turn_logs: list[list[Insertion]] = field(default_factory=list)
    turn_start: list[int] = field(default_factory=list)
    """per row, where its current turn's entries begin in ``logs``"""


def insert_decisions(config: GenerateConfig, probs: torch.Tensor, draw) -> torch.Tensor:
    """Whether each decision with trigger probability ``probs`` inserts under ``config``'s memory policy.

    ``draw()`` returns uniform draws shaped like ``probs``; it is called only by the policies that
    sample (``random``, a sampled trigger), so a greedy policy leaves the decision generator
    untouched. Both engines decide through this one rule.
    """
    policy = config.policy
    if policy.kind == "always":
        return torch.ones_like(probs, dtype=torch.bool)
    if policy.kind == "random":
        return draw() < policy.p
    if config.sample_trigger:
        return draw() < probs
    return probs >= config.trigger_threshold


class DecodeSession:
    """Iterate to decode; each item is a :class:`TokenEvent`; ``output`` holds the result afterwards."""

    def __init__(
        self,
        memgen,
        prompts: list[list[int]],
        config: GenerateConfig,
        stream_text: bool = False,
        experience=None,
        insertion_filter=None,
        forced: list[list[int]] | None = None,
    ):
        self.m = memgen
        self.cfg = config
        self.forced = forced
        self.forced_greedy: list[list[bool]] = []
        """with ``forced``: per row, whether each forced token was the argmax of its logits"""
        self.insertion_filter = insertion_filter
        self.prompts = prompts
        self.stream_text = stream_text
        self.output: GenerationOutput | None = None
        reasoner = memgen.reasoner
        self.k_prompt = memgen.weaver.num_latents(PROMPT)
        self.k_infer = memgen.weaver.num_latents(INFERENCE)
        self.memory_on = config.policy.kind != "off"
        self.reader = experience if self.memory_on else None
        self.prompt_texts = (
            [memgen.tokenizer.decode(p, skip_special_tokens=True) for p in prompts] if self.reader else []
        )
        self.prompt_insert = self.memory_on and config.insert_at_prompt_end
        # A prompt-end decision is drawn per sample, so it comes after the prompt's cache is shared out.
        self.prompt_decides = (
            self.prompt_insert and memgen.config.trigger_at_prompt_end and config.policy.kind in ("trigger", "random")
        )
        context = reasoner.context_length
        check_prompt_fits(max(len(p) for p in prompts), self.k_prompt if self.prompt_insert else 0, context)
        self.context = context
        tok = memgen.tokenizer
        eos = eos_token_ids(memgen)
        self.eos_ids = torch.tensor(
            sorted(eos) if not (config.ignore_eos or forced is not None) else [],
            dtype=torch.long,
            device=reasoner.device,
        )
        pad = tok.pad_token_id if tok.pad_token_id is not None else (sorted(eos)[0] if eos else 0)
        self.pad_id = pad
        if forced is not None:
            self._check_forced(forced)

    def _check_forced(self, forced: list[list[int]]) -> None:
        """Forced decoding feeds the given tokens instead of choosing them (:mod:`memgen.forced`)."""
        cfg = self.cfg
        if len(forced) != len(self.prompts) or cfg.num_samples != 1:
            raise InputError(f"forced decoding needs one continuation per prompt ({len(self.prompts)}) and one sample")
        if any(not c for c in forced) or max(len(c) for c in forced) > cfg.max_new_tokens:
            raise InputError("every forced continuation needs 1..max_new_tokens tokens")
        width = max(len(c) for c in forced)
        ids = torch.full((len(forced), width), self.pad_id, dtype=torch.long)
        for r, c in enumerate(forced):
            ids[r, : len(c)] = torch.tensor(c, dtype=torch.long)
        self._forced_ids = ids.to(self.m.device)
        self._forced_last = torch.tensor([len(c) - 1 for c in forced], device=self.m.device)

    # ------------------------------------------------------------------ helpers
    def _prefill_batch(self):
        device = self.m.device
        width = max(len(p) for p in self.prompts)
        ids = torch.full((len(self.prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.prompts), width), dtype=torch.long)
        for i, p in enumerate(self.prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        positions = (mask.cumsum(dim=1) - 1).masked_fill(mask == 0, 1)
        return ids.to(device), mask.to(device), positions.to(device)

    def _generators(self):
        device = self.m.device
        if self.cfg.seed is None:
            token_gen = None
            seed = int(torch.randint(0, 2**62, (1,))) if self._needs_decision_rng() else 0
        else:
            token_gen = torch.Generator(device=device).manual_seed(self.cfg.seed)
            seed = self.cfg.seed + DECISION_SEED_OFFSET
        # A separate stream for insertion decisions keeps token sampling identical to memory-off runs.
        decision_gen = torch.Generator(device=device).manual_seed(seed)
        return token_gen, decision_gen

    def _needs_decision_rng(self) -> bool:
        kind = self.cfg.policy.kind
        return kind == "random" or (kind == "trigger" and self.cfg.sample_trigger)

    def _decide(self, candidates: torch.Tensor, hidden: torch.Tensor, gen: torch.Generator, prompt_end: bool):
        """Per-row (insert?, P(invoke)) for the candidate rows (P is 0 for the other rows)."""
        # Only candidates' states reach the head, so what it reads (and records) are decisions.
        probs = torch.zeros(candidates.shape, device=candidates.device)
        probs[candidates] = torch.sigmoid(self.m.decision_head(prompt_end)(hidden[candidates]))
        insert = candidates & insert_decisions(
            self.cfg, probs, lambda: torch.rand(candidates.shape, generator=gen, device=candidates.device)
        )
        return insert, probs

    def _retrieve(self, insert: torch.Tensor, answer_so_far):
        """The retrieved text for each inserting row: ((ids, valid) (B, S) or None, per-row Retrieved or None).

        ``answer_so_far(r)`` is row r's completion text so far (queried only for inserting rows).
        """
        batch = insert.shape[0]
        found = [None] * batch
        if self.reader is None or not bool(insert.any()):
            return None, found
        rows = insert.nonzero().squeeze(1).tolist()
        per_prompt = batch // len(self.prompts)  # samples per prompt once the prompt cache is shared out
        queries = [self.reader.query_text(self.prompt_texts[r // per_prompt], answer_so_far(r)) for r in rows]
        for r, got in zip(rows, self.reader.read(queries)):
            found[r] = got
        return pack_context({r: found[r].token_ids for r in rows}, batch, self.pad_id, self.m.device), found

    def _weave_prompt_end(self, cache, mask, next_pos, logits, last, logs, insert, probs, rows=None):
        """Weave prompt latents for the rows in ``insert`` and log each row's prompt-end entry.

        ``probs`` is each row's P(invoke) where the trigger decided, or None where the prompt end is always woven.
        ``rows`` (default: all) are the rows that reached a prompt end; only they are logged.
        Returns the grown mask, the advanced positions and the logits of the next token.
        """
        m = self.m
        latents = None
        context, found = self._retrieve(insert, lambda r: "")
        woven = insert
        if bool(insert.any()):
            latents, hidden, mask, next_pos, insert = m.weave_and_feed(
                cache, mask, next_pos, insert, PROMPT, last, allow_subset=True, context=context, gate=self._gate(PROMPT)
            )
            logits = torch.where(insert[:, None], m.reasoner.logits(hidden[:, -1]), logits)
        for r, (was_woven, inserted) in enumerate(zip(woven.tolist(), insert.tolist())):
            if rows is not None and not rows[r]:
                continue
            keep = latents[r].float().cpu() if (self.cfg.return_latents and was_woven) else None
            logs[r].append(
                _logged(
                    Insertion(
                        0, None if probs is None else probs[r], inserted, keep, suppressed=was_woven and not inserted
                    ),
                    found[r],
                )
            )
        return mask, next_pos, logits

    def _gate(self, kind: str):
        """The insertion filter as ``weave_and_feed``'s gate for ``kind`` insertions (None without a filter)."""
        keep = self.insertion_filter
        if keep is None:
            return None

        def gate(latents: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            fed = rows.clone()
            index = rows.nonzero().squeeze(1)
            if index.numel():
                fed[index] = torch.as_tensor(keep(latents[index], kind), dtype=torch.bool, device=rows.device)
            return fed

        return gate

    # ------------------------------------------------------------------ main loop
    def __iter__(self):
        started = time.perf_counter()
        with torch.inference_mode():
            state = self._open()
            yield from self._decode(state)
        self.output = self._close(state, started)

    def _open(self) -> _Rows:
        """Prefill the prompts, weave at the prompt end, share the cache out to the samples."""
        cfg, m, reasoner = self.cfg, self.m, self.m.reasoner
        token_gen, decision_gen = self._generators()
        ids, mask, positions = self._prefill_batch()
        cache = reasoner.new_cache()
        hidden = reasoner.hidden(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
        logits = reasoner.logits(hidden[:, -1])
        next_pos = mask.sum(dim=1)
        logs = [[] for _ in self.prompts]
        last = hidden[:, -1]
        if self.prompt_insert and not self.prompt_decides:
            every = torch.ones(len(self.prompts), dtype=torch.bool, device=m.device)
            mask, next_pos, logits = self._weave_prompt_end(cache, mask, next_pos, logits, last, logs, every, None)
        if cfg.num_samples > 1:
            g = cfg.num_samples
            cache.batch_repeat_interleave(g)
            mask, next_pos = mask.repeat_interleave(g, 0), next_pos.repeat_interleave(g, 0)
            logits, last = logits.repeat_interleave(g, 0), last.repeat_interleave(g, 0)
            logs = [list(logs[i // g]) for i in range(len(logs) * g)]
        state = _Rows(
            cache,
            mask,
            next_pos,
            logits,
            last,
            logs,
            token_gen,
            decision_gen,
            {"steps": 0, "compactions": 0, "max_cache_slots": int(mask.shape[1]), "max_pad_slots": 0},
            turn_start=[0] * mask.shape[0],
        )
        if self.prompt_decides:
            candidates = torch.ones(mask.shape[0], dtype=torch.bool, device=m.device)
            self._decide_prompt_end(state, candidates)
        return state

    def _decide_prompt_end(self, state: _Rows, candidates: torch.Tensor) -> None:
        insert, probs = self._decide(candidates, state.last, state.decision_gen, prompt_end=True)
        state.mask, state.next_pos, state.logits = self._weave_prompt_end(
            state.cache,
            state.mask,
            state.next_pos,
            state.logits,
            state.last,
            state.logs,
            insert,
            probs.tolist(),
            rows=candidates.tolist(),
        )

    def _decode(self, state: _Rows, active: list[bool] | None = None):
        """Decode until every row in ``active`` (default: all) has finished; yield a TokenEvent per token.

        Leaves each row's tokens, log-probs and finish reason in ``state``; its last token is not fed.
        """
        cfg, m, reasoner = self.cfg, self.m, self.m.reasoner
        device = m.device
        batch = state.mask.shape[0]
        if active is None:
            active = [True] * batch
        finished = ~torch.tensor(active, dtype=torch.bool, device=device)
        reasons = [""] * batch
        n_inserted = torch.zeros(batch, dtype=torch.long, device=device)
        tokens: list[list[int]] = [[] for _ in range(batch)]
        logprobs: list[list[float]] = [[] for _ in range(batch)]
        step_logits: list[torch.Tensor] = []
        offsets = [[0, 0] for _ in range(batch)]
        pad = torch.full((batch,), self.pad_id, dtype=torch.long, device=device)
        stats, logits, logs = state.stats, state.logits, state.logs

        greedy: list[list[bool]] = [[] for _ in range(batch)]
        for step in range(cfg.max_new_tokens):
            if self.forced is not None:
                chosen = self._forced_ids[:, min(step, self._forced_ids.shape[1] - 1)]
                was_greedy = (torch.argmax(logits, dim=-1) == chosen).tolist()
            else:
                chosen = select_tokens(logits, cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, state.token_gen)
            chosen = torch.where(finished, pad, chosen)
            if cfg.output_logits:
                step_logits.append(logits.float().cpu())
            lp = token_logprobs(logits, chosen, cfg.temperature).tolist() if cfg.return_logprobs else None
            was_active = (~finished).tolist()
            chosen_list = chosen.tolist()
            is_eos = torch.isin(chosen, self.eos_ids) & ~finished
            now_done = is_eos.clone()
            if self.context is not None:
                now_done |= state.next_pos + 1 >= self.context
            if step == cfg.max_new_tokens - 1:
                now_done |= ~finished
            if self.forced is not None:
                now_done |= self._forced_last == step
            eos_list = is_eos.tolist()
            for r in range(batch):
                if not was_active[r]:
                    continue
                tokens[r].append(chosen_list[r])
                if self.forced is not None:
                    greedy[r].append(was_greedy[r])
                if lp is not None:
                    logprobs[r].append(lp[r])
                if eos_list[r]:
                    reasons[r] = "eos"
                elif cfg.stop and hit_stop(self.m.tokenizer, tokens[r], cfg.stop):
                    reasons[r] = "stop"
                    now_done[r] = True
                elif now_done[r]:
                    reasons[r] = "length"
            stats["steps"] += 1
            newly_done = now_done & ~finished
            finished = finished | now_done
            for r in range(batch):
                if was_active[r]:
                    yield TokenEvent(
                        r,
                        chosen_list[r],
                        self._delta(tokens[r], offsets[r]) if self.stream_text else "",
                        bool(newly_done[r]),
                    )
            if bool(finished.all()):
                break

            running = ~finished
            feed = torch.where(running, chosen, pad)
            state.mask = torch.cat([state.mask, running.long()[:, None]], dim=1)
            hidden = reasoner.hidden(
                input_ids=feed[:, None],
                attention_mask=state.mask,
                position_ids=state.next_pos[:, None],
                cache=state.cache,
            )
            state.next_pos = state.next_pos + running.long()
            logits = reasoner.logits(hidden[:, -1])

            if self.memory_on and cfg.max_insertions > 0:
                candidates = running & m.delimiter_lookup[feed] & (n_inserted < cfg.max_insertions)
                if self.context is not None:
                    candidates &= state.next_pos + self.k_infer + 1 < self.context
                if bool(candidates.any()):
                    insert, probs = self._decide(candidates, hidden[:, -1], state.decision_gen, prompt_end=False)
                    latents, woven = None, insert
                    context, found = self._retrieve(insert, lambda r: m.tokenizer.decode(tokens[r]))
                    if bool(insert.any()):
                        latents, lat_hidden, state.mask, state.next_pos, insert = m.weave_and_feed(
                            state.cache,
                            state.mask,
                            state.next_pos,
                            insert,
                            INFERENCE,
                            hidden[:, -1],
                            allow_subset=True,
                            context=context,
                            gate=self._gate(INFERENCE),
                        )
                        logits = torch.where(insert[:, None], reasoner.logits(lat_hidden[:, -1]), logits)
                        # A withheld insertion counts as a declined one: it does not use up max_insertions.
                        n_inserted += insert.long()
                    cand_list, ins_list, prob_list = candidates.tolist(), insert.tolist(), probs.tolist()
                    woven_list = woven.tolist()
                    for r in range(batch):
                        if cand_list[r]:
                            keep = latents[r].float().cpu() if (cfg.return_latents and woven_list[r]) else None
                            logs[r].append(
                                _logged(
                                    Insertion(
                                        len(tokens[r]),
                                        prob_list[r],
                                        ins_list[r],
                                        keep,
                                        suppressed=woven_list[r] and not ins_list[r],
                                    ),
                                    found[r],
                                )
                            )

            slots = state.mask.shape[1]
            pad_slots = slots - int(state.mask.sum(dim=1).max())
            stats["max_cache_slots"] = max(stats["max_cache_slots"], slots)
            stats["max_pad_slots"] = max(stats["max_pad_slots"], pad_slots)
            if cfg.compact_after and pad_slots >= cfg.compact_after:
                state.mask = compact_cache(state.cache, state.mask)
                stats["compactions"] += 1

        state.logits = logits
        self.forced_greedy = greedy
        state.tokens, state.logprobs, state.reasons = tokens, logprobs, [r or "length" for r in reasons]
        state.step_logits = step_logits
        state.turn_logs = [log[start:] for log, start in zip(logs, state.turn_start)]

    def _completions(self, state: _Rows, rows=None) -> list[Completion]:
        cfg = self.cfg
        logits_by_row = torch.stack(state.step_logits, dim=1) if state.step_logits else None
        out = []
        for r in range(len(state.tokens)) if rows is None else rows:
            out.append(
                Completion(
                    token_ids=state.tokens[r],
                    text=self.m.tokenizer.decode(state.tokens[r], skip_special_tokens=True),
                    finish_reason=state.reasons[r],
                    insertions=state.turn_logs[r],
                    logprobs=state.logprobs[r] if cfg.return_logprobs else None,
                    logits=logits_by_row[r, : len(state.tokens[r])] if logits_by_row is not None else None,
                )
            )
        return out

    def _close(self, state: _Rows, started: float) -> GenerationOutput:
        stats = state.stats
        stats["seconds"] = time.perf_counter() - started
        stats["new_tokens"] = sum(len(t) for t in state.tokens)
        return GenerationOutput(self._completions(state), stats)

    def _delta(self, tokens: list[int], offsets: list[int]) -> str:
        """Incremental detokenisation: hold back text until it decodes cleanly (no partial UTF-8)."""
        decode = self.m.tokenizer.decode
        prefix_offset, read_offset = offsets
        before = decode(tokens[prefix_offset:read_offset], skip_special_tokens=True)
        now = decode(tokens[prefix_offset:], skip_special_tokens=True)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            offsets[0], offsets[1] = read_offset, len(tokens)
            return now[len(before) :]
        return ""


def check_prompt_fits(prompt_tokens: int, prompt_latents: int, context: int | None) -> None:
    """Refuse a prompt that, with the latents woven at its end, leaves no position to generate in."""
    if context is not None and prompt_tokens + prompt_latents >= context:
        raise InputError(
            f"prompt of {prompt_tokens} tokens"
            + (f" plus {prompt_latents} prompt latents" if prompt_latents else "")
            + f" does not fit the model's context of {context} positions"
        )


def hit_stop(tokenizer, tokens: list[int], stops: list[str]) -> bool:
    """Whether the text of ``tokens`` now contains a stop string (only the tail that could is decoded)."""
    window = max(len(s) for s in stops) + 2
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    return any(s in tail for s in stops)


def eos_token_ids(memgen) -> set[int]:
    """The ids that end a row: the generation config's EOS ids and the tokenizer's."""
    eos = set()
    for source in (
        getattr(memgen.reasoner_model.generation_config, "eos_token_id", None),
        memgen.tokenizer.eos_token_id,
    ):
        if isinstance(source, int):
            eos.add(source)
        elif source:
            eos.update(source)
    return eos


def _logged(insertion: Insertion, found) -> Insertion:
    """The insertion with what its weaver retrieved, if it retrieved."""
    if found is not None and insertion.inserted:
        insertion.retrieved, insertion.context_ids = list(found.record_ids), list(found.token_ids)
    return insertion


class TurnSession(DecodeSession):
    """Multi-turn decoding for agents: one KV cache per row lives across turns.

    :meth:`first_turn` decodes the first assistant turn of every row (prompts prefilled once,
    shared by ``num_samples``). :meth:`next_turn` appends each continuing row's segment (the
    previous turn's last token, which decoding never feeds, then the observation and the next
    turn's header) with masked pad slots for the other rows, weaves at the new turn's start as at a
    prompt end (a trigger decision with ``trigger_at_prompt_end``), and decodes that turn. Latents
    woven in earlier turns stay in the cache, so later turns are conditioned on them, and nothing is
    re-prefilled. A row listed in ``restart`` first has every cached slot masked and starts again
    at position 0 from its segment (how the agent runner truncates old turns).
    """

    def first_turn(self, on_token=None) -> list[Completion]:
        self._started = time.perf_counter()
        with torch.inference_mode():
            self.state = self._open()
            for event in self._decode(self.state):
                if on_token is not None:
                    on_token(event)
        return self._completions(self.state)

    def next_turn(
        self, segments: dict[int, list[int]], restart: set[int] = frozenset(), on_token=None
    ) -> dict[int, Completion]:
        """Feed ``segments`` (row -> token ids) and decode one turn for those rows; returns row -> Completion."""
        state, m = self.state, self.m
        batch = state.mask.shape[0]
        rows = sorted(segments)
        if not rows:
            return {}
        bad = [r for r in rows if not 0 <= r < batch or not segments[r]]
        if bad:
            raise InputError(f"rows {bad}: a segment needs a row in 0..{batch - 1} and at least one token")
        k = self.k_prompt if self.prompt_insert else 0
        with torch.inference_mode():
            for r in restart:
                state.mask[r] = 0
                state.next_pos[r] = 0
            if self.context is not None:
                over = [r for r in rows if int(state.next_pos[r]) + len(segments[r]) + k + 1 >= self.context]
                if over:
                    raise InputError(
                        f"rows {over}: the next turn does not fit the model's context of "
                        f"{self.context} positions; truncate old turns first"
                    )
            self._feed(state, {r: segments[r] for r in rows})
            for r in rows:
                state.turn_start[r] = len(state.logs[r])
            chosen = torch.zeros(batch, dtype=torch.bool, device=m.device)
            chosen[torch.tensor(rows, device=m.device)] = True
            if self.prompt_insert and self.prompt_decides:
                self._decide_prompt_end(state, chosen)
            elif self.prompt_insert:
                state.mask, state.next_pos, state.logits = self._weave_prompt_end(
                    state.cache,
                    state.mask,
                    state.next_pos,
                    state.logits,
                    state.last,
                    state.logs,
                    chosen,
                    None,
                    rows=chosen.tolist(),
                )
            for event in self._decode(state, active=chosen.tolist()):
                if on_token is not None:
                    on_token(event)
        return dict(zip(rows, self._completions(state, rows)))

    def _feed(self, state: _Rows, segments: dict[int, list[int]]) -> None:
        """Append each row's tokens to the cache (right-padded with masked slots) and read its next-token logits."""
        reasoner, device = self.m.reasoner, self.m.device
        batch = state.mask.shape[0]
        width = max(len(t) for t in segments.values())
        ids = torch.full((batch, width), self.pad_id, dtype=torch.long)
        valid = torch.zeros((batch, width), dtype=torch.long)
        for r, toks in segments.items():
            ids[r, : len(toks)] = torch.tensor(toks)
            valid[r, : len(toks)] = 1
        ids, valid = ids.to(device), valid.to(device)
        positions = state.next_pos[:, None] + (valid.cumsum(dim=1) - 1).clamp_min(0)
        state.mask = torch.cat([state.mask, valid], dim=1)
        hidden = reasoner.hidden(input_ids=ids, attention_mask=state.mask, position_ids=positions, cache=state.cache)
        fed = valid.sum(dim=1)
        state.next_pos = state.next_pos + fed
        last = hidden[torch.arange(batch, device=device), (fed - 1).clamp_min(0)]
        was_fed = (fed > 0)[:, None]
        state.last = torch.where(was_fed, last, state.last)
        state.logits = torch.where(was_fed, reasoner.logits(last), state.logits)

    def close(self) -> dict:
        """Decoding stats over every turn."""
        stats = self.state.stats
        stats["seconds"] = time.perf_counter() - self._started
        return stats
