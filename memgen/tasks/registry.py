"""The task registry: a :class:`Task` (records, reward, stop strings) by name, from a data path.

:func:`load_named_task` also loads the agent environments (``alfworld``, ``ledger``), which
live in :mod:`memgen.agents`; they are found through :data:`PLUGIN_TASKS`, an import path
resolved on use (as entry points are), so this layer never imports the agents above it.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ..data import DataError, Record, report_skipped
from . import answering
from .answers import gpqa_records, gsm8k_records, jsonl_records, jsonl_reward, math_records, qa_records
from .rewards import (
    RewardFn,
    choice_failure_type,
    choice_reward,
    exact_match_reward,
    f1_reward,
    math_failure_type,
    math_reward,
    qa_failure_type,
)


@dataclass
class Task:
    name: str
    records: list[Record]
    reward: RewardFn
    extra_metrics: dict[str, RewardFn]
    stop: list[str]
    skipped: list[str] = field(default_factory=list)
    """``file:line: reason`` of every malformed line skipped with ``skip_malformed``."""
    unavailable: list[str] = field(default_factory=list)
    """items left out because this machine cannot score them (e.g. ``BigCodeBench/3: pandas not installed``)"""
    outcomes: Callable | None = None
    """code tasks: per-completion execution results (status, seconds, the limit hit), same signature as ``reward``"""
    failure_type: Callable[[str, str, object], str] | None = None
    """``(prompt, completion, gold) -> type`` ('correct' for a right answer): what kind of failure an answer is,
    so evaluation and ``memgen analyze`` can count outcomes by type; gold is :meth:`gold`"""

    episodic: ClassVar[bool] = False

    # ------------------------------------------------ the task protocol (memgen.tasks.protocol)
    def evaluate(self, model, config, memory=None, insertion_filter=None, observe=None) -> dict:
        return answering.evaluate_answers(model, self, config, memory, insertion_filter, observe)

    def rollout(self, run, records: list[Record], micro: int, memory: str, **generate_kwargs):
        return answering.answer_rollout(run, records, micro, run.reward_fn, memory, **generate_kwargs)

    def sft_step(self, run, micro: int):
        return answering.sft_step(run, micro)

    def reward_function(self, config) -> RewardFn:
        return answering.resolve_rewards(config, self)

    def decoded_spans(self, record: Record, output, tokenizer) -> list[tuple]:
        """One span: the answer to the prompt (see :meth:`memgen.tasks.protocol.TaskProtocol.decoded_spans`)."""
        return [(None, record.prompt, output)]

    def gold(self, record: Record):
        """What ``failure_type`` compares against: the record's ``answer`` column, else its aliases, else its
        reference completion."""
        for key in ("answer", "aliases"):
            if key in record.columns:
                return record.columns[key]
        return record.completion

    def score(self, prompts, completions, **columns) -> tuple[list[float], list | None]:
        """Rewards, and for code tasks each completion's execution result (None otherwise).

        Code tasks run every program once and read the reward from its status, so callers
        that also report statuses (eval tables, training logs) never run the tests twice.
        """
        if self.outcomes is None:
            return self.reward(prompts, completions, **columns), None
        results = self.outcomes(prompts, completions, **columns)
        return [1.0 if r.passed else 0.0 for r in results], results


@dataclass
class TaskOptions:
    """How to load a task; fields only some tasks read."""

    skip_malformed: bool = False
    seed: int = 0
    split: str = ""
    sandbox: object = None
    """a :class:`~memgen.tasks.sandbox.SandboxConfig` for code tasks (default: its defaults)"""


def _task(
    name: str,
    loaded: tuple[list[Record], list[str]],
    reward: RewardFn,
    stop: list[str],
    extra_metrics: dict[str, RewardFn] | None = None,
    failure_type=None,
) -> Task:
    records, skipped = loaded
    return Task(name, records, reward, extra_metrics or {}, stop, skipped, failure_type=failure_type)


def _code_task(name: str, path: Path, options: TaskOptions) -> Task:
    from .code import BIGCODEBENCH_COMPLETE_STOP, CodeReward, bigcodebench_records, kodcode_records
    from .sandbox import SandboxConfig

    if name == "kodcode":
        records, skipped, unavailable = kodcode_records(path, options.skip_malformed)
        stop = []
    else:
        split = options.split or "complete"
        records, skipped, unavailable = bigcodebench_records(path, split, options.skip_malformed)
        stop = BIGCODEBENCH_COMPLETE_STOP if split == "complete" else []
    if not records:  # before the sandbox starts: an empty task is a data problem
        return Task(name, records, lambda *a, **k: [], {}, stop, skipped, unavailable)
    reward = CodeReward(options.sandbox or SandboxConfig())
    return Task(name, records, reward, {}, stop, skipped, unavailable, reward.outcomes)


TASKS: dict[str, Callable[[Path, TaskOptions], Task]] = {
    "gsm8k": lambda path, o: _task(
        "gsm8k", gsm8k_records(path, o.skip_malformed), math_reward, ["\nQuestion:"], failure_type=math_failure_type
    ),
    "math": lambda path, o: _task(
        "math", math_records(path, o.skip_malformed), math_reward, ["\nProblem:"], failure_type=math_failure_type
    ),
    "math500": lambda path, o: _task(
        "math500", math_records(path, o.skip_malformed), math_reward, ["\nProblem:"], failure_type=math_failure_type
    ),
    "gpqa": lambda path, o: _task(
        "gpqa",
        (gpqa_records(path, "diamond", o.seed), []),
        choice_reward,
        ["\nQuestion:"],
        failure_type=choice_failure_type,
    ),
    "qa": lambda path, o: _task(
        "qa",
        qa_records(path, o.skip_malformed),
        exact_match_reward,
        ["\n"],
        {"f1": f1_reward},
        failure_type=qa_failure_type,
    ),
    "jsonl": lambda path, o: _task("jsonl", jsonl_records(path, o.skip_malformed), jsonl_reward, []),
    "kodcode": lambda path, o: _code_task("kodcode", path, o),
    "bigcodebench": lambda path, o: _code_task("bigcodebench", path, o),
}


# Tasks that live in a layer above this one, as "module:loader": resolved on use, so this module never
# imports them. Each loader takes (name, data, split, limit, max_turns, step_timeout).
PLUGIN_TASKS: dict[str, str] = {
    "alfworld": "memgen.agents.tasks:load_env_task",
    "ledger": "memgen.agents.tasks:load_env_task",
}


def load_named_task(config, env_split: str, limit: int | None = None):
    """The task a train or eval config names (``task``, ``data``, ``split``, ...): a :class:`Task`, or a
    plugin task (an agent environment). Answer tasks read ``config.split`` (bigcodebench); plugin
    tasks play the episodes of ``env_split``."""
    if config.task in PLUGIN_TASKS:
        module, _, attr = PLUGIN_TASKS[config.task].partition(":")
        loader = getattr(importlib.import_module(module), attr)
        return loader(config.task, config.data, env_split, limit, config.max_turns or None, config.step_timeout)
    return load_task(
        config.task, config.data, config.skip_malformed, config.seed, limit, config.split, config.sandbox_config()
    )


def load_task(
    name: str,
    path: str | Path,
    skip_malformed: bool = False,
    seed: int = 0,
    limit: int | None = None,
    split: str = "",
    sandbox=None,
) -> Task:
    """Load task ``name`` from ``path``.

    ``gpqa`` takes ``gpqa.zip`` or ``gpqa.zip:main``; ``bigcodebench`` reads ``split``
    (complete | instruct); code tasks run their tests under ``sandbox`` (a SandboxConfig).
    """
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    if split and name != "bigcodebench":
        raise DataError(f"task {name} has no splits (--split is for bigcodebench and agent tasks)")
    subset = None
    text = str(path)
    if name == "gpqa" and re.search(r"\.zip:\w+$", text):
        text, subset = text.rsplit(":", 1)
    path = Path(text)
    if subset:
        task = Task(
            "gpqa",
            gpqa_records(path, subset, seed),
            choice_reward,
            {},
            ["\nQuestion:"],
            failure_type=choice_failure_type,
        )
    else:
        task = TASKS[name](path, TaskOptions(skip_malformed, seed, split, sandbox))
    report_skipped(path, task.skipped)
    if task.unavailable:
        import sys

        print(
            f"memgen: {path}: left out {len(task.unavailable)} item(s) this machine cannot score "
            f"(e.g. {task.unavailable[0]})",
            file=sys.stderr,
        )
    if not task.records:
        raise DataError(f"{path}: no usable records for task {name}")
    if limit is not None:
        task.records = task.records[:limit]
    return task
