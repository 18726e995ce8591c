"""ExpeL (Zhao et al., AAAI 2024) as a baseline: gather experience, extract insights, prompt with both.

1. **Gather**: the agent attempts every training task (``attempts`` sampled answers each);
   successes and failures go into the store as trajectories, with their provenance.
2. **Extract insights** with an LLM, sequentially, on an insight list kept in the store:
   - each failure/success pair of the same task is compared (``expel_compare.txt``);
   - batches of successes of different tasks are summarised (``expel_successes.txt``);
   - the LLM answers with operations on the numbered list: ``ADD``, ``EDIT n``,
     ``UPVOTE n`` and ``DOWNVOTE n`` (ExpeL's ``AGREE`` / ``REMOVE`` are read as up/down votes).
     A new insight starts at 2 votes, an edit or upvote adds one, a downvote takes one, and an
     insight at 0 is removed (a tombstone in the store). Operations naming a missing rule, and
     ADDs beyond ``max_insights``, are dropped and counted.
3. **Test time**: the prompt carries the insights (most votes first) and the ``top_k`` most
   similar successful trajectories, retrieved from the store (``expel_task.txt``).

Departures: ExpeL gathers with Reflexion retries and picks pairs from them; here the attempts
are independent samples (the trigger-free reasoner, or any memory policy), which gives the
same success/failure pairs without a reflection prompt. The LLM is any ``texts -> texts``
callable: :func:`reasoner_llm` wraps the frozen reasoner itself (what the paper's comparison
uses); a stronger model can be passed instead. The prompts are our own wording of ExpeL's
(sources: ``prompts/SOURCES.md``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources

from ..dataclass_cli import check_ranges, help_field
from .records import ExperienceError, ExperienceRecord
from .store import ExperienceStore
from .weaving import render

LLM = Callable[[list[str]], list[str]]
_OPERATION = re.compile(r"^\s*(ADD|EDIT|UPVOTE|DOWNVOTE|AGREE|REMOVE)\s*(\d+)?\s*:\s*(.*?)\s*$", re.IGNORECASE)
_ALIASES = {"AGREE": "UPVOTE", "REMOVE": "DOWNVOTE"}


def prompt_template(name: str) -> str:
    """A prompt shipped as package data (``memgen/experience/prompts/NAME.txt``), without its final newline,
    so a rendered task prompt ends exactly as the task's own prompt does."""
    return resources.files("memgen.experience").joinpath("prompts", f"{name}.txt").read_text().rstrip("\n")


@dataclass
class ExpeLConfig:
    """ExpeL's gathering, insight extraction and test-time prompt."""

    attempts: int = help_field(2, "sampled attempts per training task while gathering", ge=1)
    temperature: float = help_field(0.7, "sampling temperature of the attempts", gt=0)
    max_new_tokens: int = help_field(256, "longest attempt", ge=1)
    compare_pairs: int = help_field(20, "failure/success pairs of the same task the LLM compares", ge=0)
    success_batches: int = help_field(5, "batches of successes the LLM summarises", ge=0)
    success_batch: int = help_field(4, "successes per summarised batch", ge=1)
    max_insights: int = help_field(20, "largest insight list (ADDs beyond it are dropped)", ge=1)
    max_operations: int = help_field(4, "operations the LLM may write per call", ge=1)
    llm_max_new_tokens: int = help_field(256, "longest LLM answer when extracting insights", ge=1)
    top_k: int = help_field(2, "similar successful trajectories in the test prompt", ge=0)
    task_template: str = help_field(
        "", "test-prompt template with {insights}, {examples} and {prompt} (default: prompts/expel_task.txt)"
    )
    seed: int = help_field(0, "seed for sampling attempts and picking pairs", ge=0)

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class Operation:
    kind: str
    """ADD | EDIT | UPVOTE | DOWNVOTE"""
    index: int | None
    """1-based rule number (None for ADD)"""
    text: str


def parse_operations(text: str) -> list[Operation]:
    """The operations in an LLM answer, one per line; other lines are ignored."""
    ops = []
    for line in text.splitlines():
        match = _OPERATION.match(line)
        if not match:
            continue
        kind = _ALIASES.get(match.group(1).upper(), match.group(1).upper())
        index = int(match.group(2)) if match.group(2) else None
        if kind != "ADD" and index is None:
            continue  # EDIT / UPVOTE / DOWNVOTE need a rule number (ExpeL's "ADD n:" number is ignored)
        if kind in ("ADD", "EDIT") and not match.group(3):
            continue
        ops.append(Operation(kind, None if kind == "ADD" else index, match.group(3)))
    return ops


def insights(store: ExperienceStore, task: str) -> list[ExperienceRecord]:
    """The task's live insights in list order (the numbering the LLM sees)."""
    return store.records(kind="insight", task=task)


def apply_operations(
    store: ExperienceStore, task: str, ops: list[Operation], max_insights: int, provenance: dict | None = None
) -> dict:
    """Apply ExpeL's operations to the task's insight list; returns counts per outcome."""
    counts = {"ADD": 0, "EDIT": 0, "UPVOTE": 0, "DOWNVOTE": 0, "removed": 0, "invalid": 0}
    listed = insights(store, task)  # numbering fixed at the time the LLM saw the list
    for op in ops:
        if op.kind == "ADD":
            if len(insights(store, task)) >= max_insights:
                counts["invalid"] += 1
                continue
            added = store.add(
                ExperienceRecord(kind="insight", task=task, text=op.text, votes=2, provenance=dict(provenance or {}))
            )
            counts["ADD" if added else "invalid"] += 1
            continue
        if not 1 <= op.index <= len(listed):
            counts["invalid"] += 1
            continue
        try:
            current = store.get(listed[op.index - 1].id)
        except ExperienceError:  # removed by an earlier operation of the same answer
            counts["invalid"] += 1
            continue
        if op.kind == "EDIT":
            store.update(replace(current, text=op.text, votes=current.votes + 1))
        elif op.kind == "UPVOTE":
            store.update(replace(current, votes=current.votes + 1))
        elif current.votes - 1 <= 0:
            store.remove(current.id)
            counts["removed"] += 1
        else:
            store.update(replace(current, votes=current.votes - 1))
        counts[op.kind] += 1
    return counts


def _numbered(records: list[ExperienceRecord]) -> str:
    return "\n".join(f"{i}. {r.text}" for i, r in enumerate(records, 1)) or "(none yet)"


def extract_insights(store: ExperienceStore, task: str, llm: LLM, config: ExpeLConfig) -> dict:
    """ExpeL's insight extraction over the task's stored trajectories; returns operation counts."""
    trajectories = store.records(kind="trajectory", task=task)
    by_input: dict[str, dict[bool, list[ExperienceRecord]]] = {}
    for r in trajectories:
        by_input.setdefault(r.input, {True: [], False: []})[r.success].append(r)
    rng = random.Random(config.seed)
    pairs = [(v[False][0], v[True][0]) for v in by_input.values() if v[True] and v[False]]
    rng.shuffle(pairs)
    totals: dict[str, int] = {}

    def step(prompt: str, sources: list[str]) -> None:
        answer = llm([prompt])[0]
        counts = apply_operations(
            store,
            task,
            parse_operations(answer)[: config.max_operations],
            config.max_insights,
            {"source": "expel", "from": sources},
        )
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value

    compare = prompt_template("expel_compare")
    for failure, success in pairs[: config.compare_pairs]:
        step(
            compare.format(
                insights=_numbered(insights(store, task)),
                input=success.input,
                failure=failure.trajectory,
                success=success.trajectory,
                max_operations=config.max_operations,
            ),
            [failure.id, success.id],
        )
    summarise = prompt_template("expel_successes")
    winners = [v[True][0] for v in by_input.values() if v[True]]
    rng.shuffle(winners)
    for b in range(config.success_batches):
        batch = winners[b * config.success_batch : (b + 1) * config.success_batch]
        if not batch:
            break
        text = "\n".join(render(r) for r in batch)
        step(
            summarise.format(
                insights=_numbered(insights(store, task)), successes=text, max_operations=config.max_operations
            ),
            [r.id for r in batch],
        )
    totals["pairs"] = min(len(pairs), config.compare_pairs)
    totals["insights"] = len(insights(store, task))
    return totals


def expel_prompt(store: ExperienceStore, task: str, prompt: str, config: ExpeLConfig) -> str:
    """The test-time prompt: insights (most votes first) and the top-k similar successful trajectories;
    the prompt unchanged when the store has neither."""
    ranked = sorted(insights(store, task), key=lambda r: -r.votes)[: config.max_insights]
    examples = []
    if config.top_k:
        hits = store.search(prompt, 4 * config.top_k, kind="trajectory", success=True, task=task)
        examples = [render(h.record) for h in hits if h.record.input != prompt][: config.top_k]
    if not ranked and not examples:  # an empty memory leaves the agent as it was
        return prompt
    template = config.task_template or prompt_template("expel_task")
    return template.format(insights=_numbered(ranked), examples="".join(examples) or "(none)\n", prompt=prompt)


def gather_experience(
    model,
    task,
    store: ExperienceStore,
    config: ExpeLConfig,
    memory: str = "off",
    batch_size: int = 8,
    run: str = "expel",
) -> dict:
    """Attempt every training task ``config.attempts`` times and store each attempt with its reward."""
    from ..config import GenerateConfig
    from ..tasks.rewards import cut_at_stop

    gen = GenerateConfig(
        memory=memory,
        do_sample=True,
        temperature=config.temperature,
        max_new_tokens=config.max_new_tokens,
        num_samples=config.attempts,
        stop=task.stop,
        seed=config.seed,
    )
    added = successes = 0
    for start in range(0, len(task.records), batch_size):
        batch = task.records[start : start + batch_size]
        out = model.generate([r.prompt for r in batch], gen)
        texts = [cut_at_stop(c.text, task.stop) for c in out.completions]
        columns = {k: [r.columns.get(k) for r in batch for _ in range(config.attempts)] for k in batch[0].columns}
        prompts = [r.prompt for r in batch for _ in range(config.attempts)]
        rewards = task.reward(prompts, texts, **columns)
        records = [
            ExperienceRecord(
                task=task.name,
                input=p,
                trajectory=t,
                reward=float(w),
                success=float(w) >= 1.0,
                provenance={"run": run, "index": start + i // config.attempts, "attempt": i % config.attempts},
            )
            for i, (p, t, w) in enumerate(zip(prompts, texts, rewards))
        ]
        added += store.add_many(records)
        successes += sum(r.success for r in records)
    return {"attempts": len(task.records) * config.attempts, "added": added, "successes": successes}


def reasoner_llm(model, max_new_tokens: int = 256, stop: list[str] | None = None, batch_size: int = 8) -> LLM:
    """The frozen reasoner as the insight/workflow LLM: greedy, memory off.

    A prompt longer than the model's context (less ``max_new_tokens``) keeps its last tokens: the
    instructions and the answer cue sit at the end of every template, the oldest trajectory text first.
    """
    context = model.reasoner.context_length
    room = None if context is None else max(context - max_new_tokens - 1, 1)

    def call(prompts: list[str]) -> list[str]:
        ids = [p if room is None else p[-room:] for p in model.encode_prompts(list(prompts))]
        out = []
        for start in range(0, len(ids), batch_size):
            result = model.generate(
                ids[start : start + batch_size], memory="off", max_new_tokens=max_new_tokens, stop=stop or []
            )
            out += result.texts
        return out

    return call
