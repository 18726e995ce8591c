"""``memgen eval`` on an agent task: play the episodes in batches, one JSONL line each, success by task type."""

from __future__ import annotations

import time
from collections import Counter

from ..errors import MemGenError
from ..tasks.protocol import run_in_batches
from .runner import run_episodes


def evaluate_agent(model, task, config, experience=None, insertion_filter=None, observe=None) -> dict:
    """Success rate of greedy episodes on ``task`` (an :class:`~memgen.agents.tasks.EnvTask`).

    ``insertion_filter`` and ``observe(records, episodes, logs)`` work as in :func:`memgen.evaluate.evaluate`
    (episodes then keep their latents).
    """
    records = task.records[: config.limit] if config.limit is not None else task.records
    if not records:
        raise MemGenError(f"task {task.name} has no episodes to play")
    fmt = task.make_format(model.tokenizer, config.use_chat_template)
    agent = task.agent_config(
        memory=config.memory,
        max_turn_tokens=config.max_new_tokens,
        max_insertions=config.max_insertions,
        seed=config.seed,
    )

    def play(batch):
        envs = [task.make_env(r) for r in batch]
        began = time.perf_counter()
        try:
            episodes = run_episodes(
                model,
                envs,
                fmt,
                agent,
                seeds=[task.seed_of(r) for r in batch],
                experience=experience,
                env_ids=[r.source for r in batch],
                insertion_filter=insertion_filter,
                return_latents=observe is not None,
            )
        finally:
            for env in envs:
                getattr(env, "close", lambda: None)()
        spent = time.perf_counter() - began
        logs = [dict(e.as_log(), seconds=spent / len(batch), failure=failure_type(e)) for e in episodes]
        if insertion_filter is not None:
            for log, e in zip(logs, episodes):
                log["suppressed"] = sum(ins.suppressed for t in e.turns for ins in t.completion.insertions)
        if observe is not None:
            observe(batch, episodes, logs)
        return logs, spent

    logs, seconds = run_in_batches(
        model, records, config, f"eval {task.name} [{config.memory}]", play, ("success", "success")
    )
    return summarize(task.name, config.memory, logs, seconds)


def failure_type(episode) -> str:
    """An episode's outcome as a failure type: correct, lost (the environment ended it unwon), or why it stopped
    (max_turns, context, timeout, error)."""
    if episode.success:
        return "correct"
    return "lost" if episode.end_reason == "done" else episode.end_reason


def summarize(task: str, memory: str, logs: list[dict], seconds: float) -> dict:
    n = len(logs)
    summary = {
        "task": task,
        "memory": memory,
        "n": n,
        "success": sum(r["success"] for r in logs) / n,
        "mean_turns": sum(r["turns"] for r in logs) / n,
        "mean_insertions": sum(r["insertions"] for r in logs) / n,
        "seconds_per_episode": seconds / n,
    }
    by_type: dict[str, list[bool]] = {}
    for r in logs:
        by_type.setdefault(str(r["task_type"]), []).append(r["success"])
    for kind in sorted(by_type):
        summary[f"success_{kind}"] = sum(by_type[kind]) / len(by_type[kind])
    summary["end_reasons"] = dict(Counter(r["end_reason"] for r in logs))
    summary["failures"] = dict(sorted(Counter(r["failure"] for r in logs).items()))
    return summary
