"""One evaluation call for both kinds of task the analysis runs on: answers and agent episodes.

Single-turn tasks go through :func:`memgen.evaluate.evaluate` (rows carry ``reward`` and
``completion``); agent tasks through :func:`memgen.agents.evaluate.evaluate_agent` (rows carry
``success`` and the turn log). The analysis compares runs by :func:`outcome` and :func:`answer`.
"""

from __future__ import annotations

import json


def is_episodic(task) -> bool:
    from ..agents.tasks import EnvTask

    return isinstance(task, EnvTask)


def run_evaluation(model, task, config, insertion_filter=None, observe=None) -> dict:
    """Evaluate ``task`` (answers or episodes) with an optional insertion filter and batch observer."""
    if is_episodic(task):
        from ..agents.evaluate import evaluate_agent

        return evaluate_agent(model, task, config, insertion_filter=insertion_filter, observe=observe)
    from ..evaluate import evaluate

    return evaluate(model, task, config, insertion_filter=insertion_filter, observe=observe)


def outcome(row: dict) -> float:
    """1.0 for a right answer or a won episode (an episode's ``reward`` is the environment's sum, not this)."""
    return float(row["success"]) if "success" in row else float(row["reward"])


def answer(row: dict) -> str:
    """What the model wrote: the completion, or an episode's replies in order."""
    if "completion" in row:
        return row["completion"]
    return json.dumps([turn["reply"] for turn in row.get("log", [])])


def summary_accuracy(summary: dict) -> float:
    return summary["success"] if "success" in summary else summary["accuracy"]
