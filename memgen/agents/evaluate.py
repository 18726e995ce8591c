"""``memgen eval`` on an agent task: play the episodes in batches, one JSONL line each, success by task type."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from ..errors import MemGenError
from .runner import run_episodes


def evaluate_agent(model, task, config, experience=None) -> dict:
    """Success rate of greedy episodes on ``task`` (an :class:`~memgen.agents.tasks.EnvTask`)."""
    from tqdm.auto import tqdm

    records = task.records[: config.limit] if config.limit is not None else task.records
    if not records:
        raise MemGenError(f"task {task.name} has no episodes to play")
    fmt = task.make_format(model.tokenizer, config.use_chat_template)
    agent = task.agent_config(memory=config.memory, max_turn_tokens=config.max_new_tokens,
                              max_insertions=config.max_insertions, seed=config.seed)
    handle = None
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        handle = open(config.output, "w")
    logs, seconds = [], 0.0
    bar = tqdm(total=len(records), disable=not config.progress, desc=f"eval {task.name} [{config.memory}]",
               dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(records), config.batch_size):
            batch = records[start: start + config.batch_size]
            envs = [task.make_env(r) for r in batch]
            began = time.perf_counter()
            try:
                episodes = run_episodes(model, envs, fmt, agent, seeds=[task.seed_of(r) for r in batch],
                                        experience=experience, env_ids=[r.source for r in batch])
            finally:
                for env in envs:
                    getattr(env, "close", lambda: None)()
            spent = time.perf_counter() - began
            seconds += spent
            for episode in episodes:
                row = dict(episode.as_log(), seconds=spent / len(batch))
                logs.append(row)
                if handle:
                    handle.write(json.dumps(row) + "\n")
            bar.update(len(batch))
            bar.set_postfix(success=f"{sum(r['success'] for r in logs) / len(logs):.3f}")
    finally:
        bar.close()
        if handle:
            handle.close()
        model.train(was_training)
    return summarize(task.name, config.memory, logs, seconds)


def summarize(task: str, memory: str, logs: list[dict], seconds: float) -> dict:
    n = len(logs)
    summary = {"task": task, "memory": memory, "n": n,
               "success": sum(r["success"] for r in logs) / n,
               "mean_turns": sum(r["turns"] for r in logs) / n,
               "mean_insertions": sum(r["insertions"] for r in logs) / n,
               "seconds_per_episode": seconds / n}
    by_type: dict[str, list[bool]] = {}
    for r in logs:
        by_type.setdefault(str(r["task_type"]), []).append(r["success"])
    for kind in sorted(by_type):
        summary[f"success_{kind}"] = sum(by_type[kind]) / len(by_type[kind])
    summary["end_reasons"] = dict(Counter(r["end_reason"] for r in logs))
    return summary
