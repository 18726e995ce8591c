"""Reading evaluation rows of both kinds of task the analysis runs on: answers and agent episodes.

:func:`memgen.evaluate.evaluate_task` evaluates either. Answer rows carry ``reward`` and
``completion``; episode rows carry ``success`` and the turn log. The analysis compares runs by
:func:`outcome` and :func:`answer`.
"""

from __future__ import annotations

import json


def is_episodic(task) -> bool:
    """Whether ``task``'s rows are episodes (the protocol's ``episodic``)."""
    return task.episodic


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
