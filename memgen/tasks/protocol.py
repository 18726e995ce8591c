"""The task protocol: what evaluation, training, the demo and the analysis ask of any task.

Every task, whatever it holds, implements the same four methods, where it lives:

- answer tasks (:class:`memgen.tasks.Task`: GSM8K, MATH, GPQA, QA, code) in :mod:`memgen.tasks.answering`;
- agent environments (:class:`memgen.agents.tasks.EnvTask`: ALFWorld, the ledger) in :mod:`memgen.agents`.

Prompt-augmenting memory sources (ExpeL, AWM, retrieval woven into the weaver) are not tasks:
they are a :class:`MemorySource` handed to :meth:`TaskProtocol.evaluate`, built by
:func:`memgen.experience.sources.memory_source`.

The shared entry points (:func:`memgen.evaluate.evaluate`, :func:`memgen.train.train_weaver`,
:func:`memgen.train.train_trigger`, :mod:`memgen.analysis`) call these methods and never ask
which kind of task they were given; this is the split lm-evaluation-harness makes between a
``Task`` and the ``LM`` that runs it, with the engine in the ``LM``'s place. The module also
holds the two pieces both kinds share: :class:`RolloutBatch` and :func:`run_in_batches`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..data import Record


@runtime_checkable
class TaskProtocol(Protocol):
    name: str
    records: list[Record]
    stop: list[str]
    episodic: bool
    """True when a record is an episode (evaluation rows then carry ``success`` and a turn log)"""

    def evaluate(self, model, config, memory: MemorySource | None = None, insertion_filter=None, observe=None) -> dict:
        """Run ``model`` on the records (``config``: an :class:`~memgen.evaluate.EvalConfig`), score them and
        return the summary; rows go to ``config.output`` as JSONL."""

    def rollout(self, run, records: list[Record], micro: int, memory: str, **generate_kwargs) -> RolloutBatch:
        """``run.config.num_generations`` sampled rollouts per record, rewarded, as teacher-forcing rows."""

    def sft_step(self, run, micro: int):
        """One SFT micro-step on ``run.next_batch()``: ``(loss, metrics)``."""

    def reward_function(self, config) -> Callable | None:
        """The reward RL maximises under ``config`` (its ``--reward-funcs``); None when the task rewards itself."""

    def decoded_spans(self, record: Record, output, tokenizer) -> list[tuple]:
        """``(turn number or None, the text fed before it, the completion)`` per span ``evaluate`` decoded for
        ``record`` (``output``: what ``observe`` received): how :mod:`memgen.analysis` reads latents in context."""


class MemorySource(Protocol):
    """What the memory adds to each prompt before the engine runs it (ExpeL, AWM), and what the weaver reads
    at each insertion (retrieval); the latent-only weaver adds nothing."""

    reader: object | None
    """an :class:`~memgen.experience.weaving.ExperienceReader` the weaver reads at every insertion, or None"""

    def rewrite(self, record: Record) -> Record:
        """The record as the model sees it."""


@dataclass
class RolloutBatch:
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    insertions: list[list[int]]
    contexts: list[list[list[int]]] | None
    """per rollout, the retrieved token ids each insertion's weaver read (None without --experience)"""
    decisions: list[list[tuple[int, bool, str]]]
    """per row, (position, inserted, query kind) of every trigger decision"""
    old_logprobs: torch.Tensor
    rewards: torch.Tensor
    """per rollout (per episode for agent tasks, whose episodes may span several rows)"""
    truncated: torch.Tensor
    texts: list[str]
    kinds: list[list[str]] | None = None
    """agent episodes: the query kind of each insertion (turn starts use prompt queries)"""
    loss_mask: torch.Tensor | None = None
    """agent episodes: (rows, L) 1 on assistant tokens, 0 on observations"""
    row_episode: torch.Tensor | None = None
    """agent episodes: the rollout (index into ``rewards``) each row belongs to"""
    statuses: list[str] | None = None
    """code tasks: each rollout's sandbox status (passed | failed | timeout | crashed)"""

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-rollout values (e.g. advantages) spread to the rows."""
        return values if self.row_episode is None else values[self.row_episode]


def run_in_batches(model, records, config, desc: str, score_batch, shown: tuple[str, str]):
    """Score ``records`` in batches of ``config.batch_size`` with ``model`` in eval mode.

    ``score_batch(batch) -> (rows, seconds)``; every row goes to ``config.output`` (JSONL) as it
    comes, and the progress bar shows ``shown = (label, key)``: the running mean of ``row[key]``.
    Returns all rows and the seconds the batches reported.
    """
    from tqdm.auto import tqdm

    rows, total_seconds = [], 0.0
    handle = None
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        handle = open(config.output, "w")  # noqa: SIM115 (closed in finally; rows are written as they come)
    bar = tqdm(total=len(records), disable=not config.progress, desc=desc, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(records), config.batch_size):
            batch = records[start : start + config.batch_size]
            batch_rows, seconds = score_batch(batch)
            total_seconds += seconds
            for row in batch_rows:
                rows.append(row)
                if handle:
                    handle.write(json.dumps(row) + "\n")
            bar.update(len(batch))
            label, key = shown
            bar.set_postfix({label: f"{sum(r[key] for r in rows) / len(rows):.3f}"})
    finally:
        bar.close()
        if handle:
            handle.close()
        model.train(was_training)
    return rows, total_seconds
