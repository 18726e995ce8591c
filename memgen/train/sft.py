"""Weaver SFT: completion-token NLL with latents at the prompt end and at the completion's delimiters.

The reasoner is frozen and the trigger unused. With ``--experience`` every insertion reads what
a rollout would retrieve there (the query built from the gold prefix up to that point).
Insertion points are every delimiter (``insertion="all"``) or each kept with probability
``insertion_prob`` (``"random"``), then capped at ``max_insertions`` keeping the earliest, which
is what the engine's cap does at inference. Subsets are drawn per (seed, step, example), so they do not depend on how the
batch is split across processes. The loss is the token-mean NLL over the *global* batch
(the token count is summed across processes), so DDP's gradient averaging reproduces a
single-process run with the same global batch.
"""

from __future__ import annotations

import random

import torch

from ..experience.weaving import contexts_at


def sft_example(run, record, index: int, micro: int):
    """(prompt ids, completion ids, insertion points, retrieved contexts or None) of one record."""
    config, model = run.config, run.unwrapped
    tokenizer = model.tokenizer
    prompt = run.encode_prompt(record)
    completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"][: config.max_completion_tokens - 1]
    completion = completion + [tokenizer.eos_token_id]
    points = model.delimiter_positions(completion, prompt_end=True)
    inner = points[1:]
    if config.insertion == "random":
        rng = random.Random(f"{config.seed}:{run.state['step']}:{micro}:{index}")
        inner = [p for p in inner if rng.random() < config.insertion_prob]
    points = [0] + inner[: config.max_insertions]
    contexts = contexts_at(run.experience, tokenizer.decode(prompt, skip_special_tokens=True), tokenizer,
                           completion, points)
    return prompt, completion, points, contexts


def sft_step(run, micro: int):
    records, indices = run.next_batch()
    examples = [sft_example(run, r, i, micro) for r, i in zip(records, indices)]
    prompts, completions, insertions, contexts = map(list, zip(*examples))
    out = run.model(prompts, completions, insertions, contexts=None if run.experience is None else contexts)
    local_tokens = out.mask.sum()
    global_tokens = run.global_sum(local_tokens)
    nll_sum = -(out.logprobs * out.mask).sum()
    loss = nll_sum * run.world / global_tokens
    metrics = {
        "loss": run.global_sum(nll_sum.detach()) / global_tokens,
        "latent_norm": float(out.latent_norm.detach()),
        "tokens": global_tokens,
        "insertions_per_example": run.global_sum(sum(len(i) for i in insertions)) / run.global_sum(len(insertions)),
    }
    if run.experience is not None:
        read = [len(c) for row in contexts for c in row]
        metrics["retrieved_tokens_per_insertion"] = run.global_sum(sum(read)) / max(run.global_sum(len(read)), 1.0)
    return loss, metrics


def sft_eval_loss(model, examples) -> float:
    """Token-mean NLL of (prompt, completion, insertions) examples without gradients."""
    prompts, completions, insertions = map(list, zip(*examples))
    with torch.no_grad():
        out = model.teacher_forced(prompts, completions, insertions)
    return float(-(out.logprobs * out.mask).sum() / out.mask.sum())
