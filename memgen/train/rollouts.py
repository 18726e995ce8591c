"""Rollouts and rewards shared by weaver GRPO and trigger RL.

Each prompt is prefilled once and its KV cache shared by its G samples
(``GenerateConfig.num_samples``). Rewards are computed on the completion text cut at the
first stop string, by reward functions in TRL's signature; dataset columns are repeated per
sample and passed as keyword lists. With ``--experience`` each insertion's retrieved tokens are
kept, so the teacher-forced forward replays exactly what the rollout's weaver read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from ..config import GenerateConfig
from ..errors import ConfigError
from ..tasks.rewards import RewardFn, combine_rewards, cut_at_stop
from ..weaver import INFERENCE, PROMPT


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


def resolve_rewards(config, task) -> RewardFn:
    """``--reward-funcs`` entries: 'task' (the task's reward) or 'package.module:function'."""
    names = config.reward_funcs or ["task"]
    functions = []
    for name in names:
        if name == "task":
            functions.append(task.reward)
            continue
        module, _, attr = name.partition(":")
        try:
            functions.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"cannot import reward function {name!r}: {exc}") from None
    weights = config.reward_weights or [1.0] * len(functions)
    return functions[0] if len(functions) == 1 and weights == [1.0] else combine_rewards(functions, weights)


def rollout(run, records, micro: int, reward_fn: RewardFn, memory: str, **generate_kwargs) -> RolloutBatch:
    config, model = run.config, run.unwrapped
    g = config.num_generations
    prompts = [run.encode_prompt(r) for r in records]
    stops = config.stop or run.task.stop
    gen_config = GenerateConfig(
        memory=memory, do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        max_new_tokens=config.max_new_tokens, max_insertions=config.max_insertions, num_samples=g,
        seed=run.rollout_seed(micro), return_logprobs=True, stop=stops, **generate_kwargs)
    was_training = model.training
    model.eval()
    output = model.generate(prompts, gen_config, experience=run.experience)
    model.train(was_training)
    completions = output.completions
    texts = [cut_at_stop(c.text, stops) for c in completions]
    columns = {}
    for key in records[0].columns:
        columns[key] = [r.columns.get(key) for r in records for _ in range(g)]
    prompt_texts = [r.prompt for r in records for _ in range(g)]
    if reward_fn is run.task.reward:  # the task's own reward: code tasks also give each run's status for the logs
        values, results = run.task.score(prompt_texts, texts, **columns)
    else:
        values, results = reward_fn(prompt_texts, texts, **columns), None
    rewards = torch.tensor(values, dtype=torch.float32)
    statuses = None if results is None else [r.status for r in results]
    width = max(len(c.token_ids) for c in completions)
    old = torch.zeros(len(completions), width)
    for i, c in enumerate(completions):
        old[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    return RolloutBatch(
        prompt_ids=[p for p in prompts for _ in range(g)],
        completion_ids=[c.token_ids for c in completions],
        insertions=[c.insertion_positions for c in completions],
        contexts=None if run.experience is None else [c.insertion_contexts for c in completions],
        decisions=[[(i.position, i.inserted, PROMPT if i.position == 0 else INFERENCE) for i in c.insertions
                    if i.probability is not None] for c in completions],
        old_logprobs=old.to(model.device),
        rewards=rewards.to(model.device),
        truncated=torch.tensor([c.finish_reason == "length" for c in completions], device=model.device),
        texts=texts,
        statuses=statuses,
    )


def collect(run, records, micro: int, memory: str, **generate_kwargs) -> RolloutBatch:
    """Rollouts of ``records``: sampled answers, or for agent tasks sampled episodes (:mod:`memgen.agents`)."""
    if getattr(run.task, "episodic", False):
        from ..agents.training import episode_rollout

        return episode_rollout(run, records, micro, memory, **generate_kwargs)
    return rollout(run, records, micro, run.reward_fn, memory, **generate_kwargs)


def execution_metrics(run, batch: RolloutBatch) -> dict[str, float]:
    """Code tasks: how many of the step's programs passed, failed, timed out or crashed (all processes)."""
    if batch.statuses is None:
        return {}
    from ..tasks.sandbox import STATUSES

    return {f"exec_{s}": run.global_sum(float(batch.statuses.count(s))) for s in STATUSES}


def group_advantages(rewards: torch.Tensor, group: int, scale: bool) -> torch.Tensor:
    """(r - group mean), divided by the group std when ``scale`` (GRPO); Dr. GRPO leaves it unscaled."""
    grouped = rewards.view(-1, group)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)
