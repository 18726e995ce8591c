"""Trigger RL with the reward-adaptive sparsity penalty (paper Eqs. 8-9), the weaver frozen.

During rollouts the trigger's decisions at delimiters are Bernoulli draws
(``sample_trigger=True``). For each group of G rollouts of one prompt:

- p̄ is the mean activation rate (invocations / decisions) of the rollouts whose task reward
  is at least the group median: how often memory is invoked when things go well. A rollout
  with no delimiter made no decision, so its rate is 0/0: it is left out of p̄ rather than
  counted as 0 (which would drag p̄ down for the others because of answers that simply had
  no delimiter). When no good rollout made a decision, p̄ is 0: none of them invoked memory;
- each rollout's reward is ``task reward - λ · Σ_j max(0, d_j - p̄)`` over its decisions
  d_j ∈ {0, 1}, so invoking more often than the good rollouts do costs reward;
- advantages are group-centred (not divided by the group std by default: see
  ``TriggerTrainConfig.scale_rewards``; measured on the demo, the std division drove the
  invocation rate from 0.51 to 0.00 in six steps while memory was worth +0.56 on B) and
  weight the log-probabilities of the sampled decisions, log σ(z) for an invocation and
  log σ(-z) for a skip, with z the trigger logit read from the teacher-forced forward at
  the decision token.

``init_prob`` sets where an untrained head starts (every state at that P(invoke)); the weaver
was trained with memory always on, and where the benefit of memory needs most of its insertions
together, a head starting at 0.5 samples rollouts in which memory rarely pays and the penalty
always does (measured on the real demo: docs/results.md).

Before the first update, each untrained head's input centre and scale are set from the
decision states of the first rollouts (see ``memgen.trigger``); without it the demo's head
went to always-invoke within 5 steps.

The authors' code has no such penalty and runs the trigger as a whole extra LLM pass.
"""

from __future__ import annotations

import contextlib
import statistics

import torch
import torch.nn.functional as F

from ..weaver import PROMPT
from .rollouts import collect, execution_metrics, group_advantages


def sparsity_penalties(task_rewards: list[float], decisions: list[list[bool]], group: int, lam: float):
    """Per-rollout penalties and per-group p̄ (paper Eq. 9)."""
    penalties, p_bars = [], []
    for start in range(0, len(task_rewards), group):
        rewards = task_rewards[start : start + group]
        flags = decisions[start : start + group]
        median = statistics.median(rewards)
        good = [sum(f) / len(f) for f, r in zip(flags, rewards) if r >= median and f]
        p_bar = sum(good) / len(good) if good else 0.0
        p_bars.append(p_bar)
        penalties += [lam * sum(max(0.0, float(d) - p_bar) for d in f) for f in flags]
    return penalties, p_bars


def calibrate_head(run, head, seen: list[torch.Tensor]) -> None:
    """Set an untrained head's input statistics from the decision states of every process's first rollouts.

    The head still outputs its initial probability everywhere, so the rollouts just drawn stay on-policy.
    """
    d = head.input_mean.numel()
    states = torch.cat(seen).double() if seen else torch.zeros(0, d, dtype=torch.float64)
    moments = torch.cat([states.new_tensor([len(states)]), states.sum(0), (states**2).sum(0)])
    moments = run.accelerator.reduce(moments.to(run.accelerator.device), reduction="sum")
    n = float(moments[0])
    if n < 2:  # no decision anywhere yet: try again on the next step
        return
    mean = moments[1 : 1 + d] / n
    # One scale for all features (their RMS spread), not one per feature: the prompt-end head sees only
    # one state per prompt in the first step, too few for d per-feature variances.
    spread = (moments[1 + d :] / n - mean**2).clamp_min(0.0).mean().sqrt()
    head.calibrate(mean.float(), spread.float())


def trigger_step(run, micro: int):
    config = run.config
    records, _ = run.next_batch()
    heads = [h for h in run.unwrapped.trigger_heads() if not bool(h.calibrated) and h.untrained]
    if config.init_prob is not None:  # only before the first update: a head with learnt weights is left alone
        for head in heads:
            head.start_at(config.init_prob)
    with contextlib.ExitStack() as stack:
        seen = [stack.enter_context(h.recording()) for h in heads]
        batch = collect(
            run, records, micro, "trigger", sample_trigger=True, insert_at_prompt_end=config.insert_at_prompt_end
        )
    for head, states in zip(heads, seen):
        calibrate_head(run, head, states)
    owner = batch.row_episode.tolist() if batch.row_episode is not None else list(range(len(batch.decisions)))
    flags = [[] for _ in range(len(batch.rewards))]  # per rollout (an episode's rows, in order)
    for r, d in enumerate(batch.decisions):
        flags[owner[r]] += [inserted for _, inserted, _ in d]
    task_rewards = batch.rewards.tolist()
    penalties, p_bars = sparsity_penalties(task_rewards, flags, config.num_generations, config.sparsity_lambda)
    total = batch.rewards - torch.tensor(penalties, device=batch.rewards.device)
    advantages = batch.per_row(group_advantages(total, config.num_generations, config.scale_rewards))

    out = run.model(
        batch.prompt_ids, batch.completion_ids, batch.insertions, config.temperature, batch.contexts, batch.kinds
    )
    rows = [r for r, d in enumerate(batch.decisions) for _ in d]
    positions = [pos for d in batch.decisions for pos, _, _ in d]
    turn_starts = [kind == PROMPT and pos > 0 for d in batch.decisions for pos, _, kind in d]
    taken = torch.tensor([float(ins) for d in batch.decisions for _, ins, _ in d], device=out.trigger_logits.device)
    global_decisions = run.global_sum(len(rows))
    if rows:
        r_t, pos_t = torch.tensor(rows), torch.tensor(positions)
        before = (pos_t - 1).clamp_min(0)
        # Position p >= 1 was decided at completion token p - 1 (by the prompt-end head at an agent turn's
        # start), position 0 at the last prompt token.
        z = torch.where(pos_t.to(taken.device) == 0, out.prompt_trigger_logits[r_t], out.trigger_logits[r_t, before])
        if any(turn_starts):
            z = torch.where(torch.tensor(turn_starts, device=z.device), out.turn_trigger_logits[r_t, before], z)
        logp = taken * F.logsigmoid(z) + (1 - taken) * F.logsigmoid(-z)
        loss = -(advantages[torch.tensor(rows)] * logp).sum() * run.world / max(global_decisions, 1.0)
    else:  # no decision anywhere in this micro-batch: a zero loss that still touches the head
        loss = sum(p.sum() for p in run.parameters) * 0.0

    n = run.global_sum(len(flags))
    reward_mean, reward_std = run.global_mean_std(total)
    with_decisions = [sum(f) / len(f) for f in flags if f]
    metrics = {
        "loss": float(loss.detach()),
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "task_reward_mean": run.global_sum(batch.rewards.sum()) / n,
        "penalty_mean": run.global_sum(sum(penalties)) / n,
        "p_bar": run.global_sum(sum(p_bars)) / run.global_sum(len(p_bars)),
        "invocation_rate": run.global_sum(sum(with_decisions)) / max(run.global_sum(len(with_decisions)), 1.0),
        "decisions_per_rollout": global_decisions / n,
        "latent_norm": float(out.latent_norm.detach()),
    }
    metrics.update(execution_metrics(run, batch))
    return loss, metrics
