"""Weaver GRPO: group-relative policy optimisation of the weaver, the reasoner frozen.

Rollouts come from the engine (memory ``always`` or ``random:P``; one prefill per prompt
shared by its G samples). Policy log-probs come from the batched teacher-forced forward
with each rollout's own insertion points, so gradients reach the weaver through the
latents. Old log-probs, as in TRL: with ``num_iterations == 1`` they are the policy's own
(detached), so the first ratio is exactly 1; with ``num_iterations > 1`` the same rollouts
serve that many optimizer steps and the old log-probs are those of the rollout policy. In
fp32 those are the sampler's (equal to teacher forcing, which the equivalence tests check);
on a half-precision reasoner the sampler's one-token-at-a-time decode and teacher forcing's
chunked forward round differently (0.012 nats apart on average with a bf16 base, up to
0.42), which would put tokens outside the clip range before any update, so they are
recomputed with the teacher-forced forward.

Loss normalisation follows TRL's ``loss_type``: ``grpo`` averages each sequence's tokens,
then the sequences; ``dr_grpo`` divides the token sum by (sequences x max_new_tokens);
``dapo`` divides by the number of completion tokens in the global batch. Padding after EOS
is never trained on (the teacher-forced mask ends at each completion's last token).
"""

from __future__ import annotations

import torch

from .rollouts import collect, execution_metrics, group_advantages


def grpo_step(run, micro: int):
    config = run.config
    cache = run.state["method"].setdefault("rollouts", {})
    if run.state["step"] % config.num_iterations == 0 or micro not in cache:
        records, _ = run.next_batch()
        batch = collect(run, records, micro, config.memory)
        if config.num_iterations > 1 and run.unwrapped.reasoner.dtype not in (torch.float32, torch.float64):
            with torch.no_grad():
                batch.old_logprobs = run.unwrapped.teacher_forced(
                    batch.prompt_ids,
                    batch.completion_ids,
                    batch.insertions,
                    config.temperature,
                    batch.contexts,
                    batch.kinds,
                ).logprobs
        ref = None
        if config.beta > 0:
            with torch.no_grad():
                ref = run.unwrapped.teacher_forced(
                    batch.prompt_ids, batch.completion_ids, [[] for _ in batch.completion_ids], config.temperature
                ).logprobs
        advantages = batch.per_row(group_advantages(batch.rewards, config.num_generations, config.scale_rewards))
        cache[micro] = (batch, ref, advantages)
    batch, ref, advantages = cache[micro]

    out = run.model(
        batch.prompt_ids, batch.completion_ids, batch.insertions, config.temperature, batch.contexts, batch.kinds
    )
    mask = out.mask.float()
    if batch.loss_mask is not None:  # agent episodes: observations are context, not actions
        mask = mask * batch.loss_mask
    if config.mask_truncated_completions:
        mask = mask * (~batch.truncated).float()[:, None]
    logp = out.logprobs
    old_logprobs = logp.detach() if config.num_iterations == 1 else batch.old_logprobs
    ratio = torch.exp(logp - old_logprobs)
    adv = advantages[:, None]
    low, high = config.epsilon, config.epsilon_high if config.epsilon_high is not None else config.epsilon
    clipped = ratio.clamp(1 - low, 1 + high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if ref is not None:
        delta = ref - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + config.beta * kl
    tokens = mask.sum()
    global_tokens = run.global_sum(tokens)
    if config.loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).mean()
    elif config.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (mask.shape[0] * config.max_new_tokens)
    else:  # dapo
        loss = (per_token * mask).sum() * run.world / max(global_tokens, 1.0)

    was_clipped = ((ratio < 1 - low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    n = run.global_sum(len(batch.completion_ids))
    reward_mean, reward_std = run.global_mean_std(batch.rewards)
    metrics = {
        "loss": float(loss.detach()),
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "clip_ratio": run.global_sum((was_clipped.float() * mask).sum()) / max(global_tokens, 1.0),
        # Largest |ratio - 1| on this process: 0 at the first iteration, by construction above.
        "ratio_max_deviation": float(((ratio.detach() - 1).abs() * mask).max()) if mask.numel() else 0.0,
        "latent_norm": float(out.latent_norm.detach()),
        "insertions_per_rollout": run.global_sum(sum(len(i) for i in batch.insertions)) / n,
        "completion_length": global_tokens / n,
        "tokens": global_tokens,
    }
    metrics.update(execution_metrics(run, batch))
    if kl is not None:
        metrics["kl"] = run.global_sum((kl.detach() * mask).sum()) / max(global_tokens, 1.0)
    return loss, metrics
