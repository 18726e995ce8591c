"""Rollouts shared by weaver GRPO and trigger RL: collection through the task, metrics and group advantages.

Each task draws its own rollouts (:meth:`memgen.tasks.protocol.TaskProtocol.rollout`): sampled
answers (:func:`memgen.tasks.answering.answer_rollout`) or sampled episodes
(:mod:`memgen.agents.training`). :class:`RolloutBatch`, :func:`rollout` and
:func:`resolve_rewards` are re-exported from there.
"""

from __future__ import annotations

import torch

from ..tasks.answering import answer_rollout as rollout
from ..tasks.answering import resolve_rewards
from ..tasks.protocol import RolloutBatch
from ..tasks.sandbox import STATUSES

__all__ = ["RolloutBatch", "rollout", "resolve_rewards", "collect", "execution_metrics", "group_advantages"]


def collect(run, records, micro: int, memory: str, **generate_kwargs) -> RolloutBatch:
    """Rollouts of ``records`` by the run's task (:meth:`~memgen.tasks.protocol.TaskProtocol.rollout`)."""
    return run.task.rollout(run, records, micro, memory, **generate_kwargs)


def execution_metrics(run, batch: RolloutBatch) -> dict[str, float]:
    """Code tasks: how many of the step's programs passed, failed, timed out or crashed (all processes)."""
    if batch.statuses is None:
        return {}
    return {f"exec_{s}": run.global_sum(float(batch.statuses.count(s))) for s in STATUSES}


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """(r - group mean), divided by the group std when ``scale`` (GRPO); Dr. GRPO leaves it unscaled."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)
