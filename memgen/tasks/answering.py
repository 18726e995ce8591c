"""How an answer task runs through the engine: evaluation, RL rollouts and SFT steps.

This is :class:`memgen.tasks.Task`'s side of the task protocol (:mod:`memgen.tasks.protocol`);
agent environments implement the same methods in :mod:`memgen.agents`.

- **Evaluation**: greedy decoding (seeded) with the chosen memory policy. Each answer's text is
  cut at the task's first stop string before scoring. One JSON line per example (prompt,
  completion, reward, insertions, seconds) and a summary: accuracy (mean reward), extra metrics
  (e.g. F1 for QA), mean insertions per answer and decode time per answer.
- **Rollouts** (weaver GRPO, trigger RL): each prompt is prefilled once and its KV cache shared by
  its G samples (``GenerateConfig.num_samples``). Rewards are computed on the completion text cut
  at the first stop string, by reward functions in TRL's signature; dataset columns are repeated
  per sample and passed as keyword lists. With ``--experience`` each insertion's retrieved tokens
  are kept, so the teacher-forced forward replays exactly what the rollout's weaver read.
- **SFT**: completion-token NLL with latents at the prompt end and at the completion's
  delimiters. With ``--experience`` every insertion reads what a rollout would retrieve there (the
  query built from the gold prefix up to that point). Insertion points are every delimiter
  (``insertion="all"``) or each kept with probability ``insertion_prob`` (``"random"``), then
  capped at ``max_insertions`` keeping the earliest, which is what the engine's cap does at
  inference. Subsets are drawn per (seed, step, example), so they do not depend on how the batch
  is split across processes. The loss is the token-mean NLL over the *global* batch (the token
  count is summed across processes), so DDP's gradient averaging reproduces a single-process run
  with the same global batch.
"""

from __future__ import annotations

import importlib
import random
import time
from collections import Counter

import torch

from ..config import GenerateConfig
from ..data import prompt_token_ids
from ..errors import ConfigError, MemGenError
from ..weaver import INFERENCE, PROMPT
from .protocol import RolloutBatch, run_in_batches
from .rewards import RewardFn, combine_rewards, cut_at_stop
from .sandbox import STATUSES


# ------------------------------------------------------------------ evaluation
def evaluate_answers(model, task, config, memory=None, insertion_filter=None, observe=None) -> dict:
    """Score ``model`` on answer task ``task``; ``memory`` (a MemorySource) rewrites prompts and feeds the weaver.

    ``insertion_filter`` goes to :meth:`MemGen.generate` (rows then count their withheld insertions as
    ``suppressed``). ``observe(records, completions, rows)``, called after each batch, sees the
    completions with their latents kept (how :mod:`memgen.analysis` collects them).
    """
    experience = None if memory is None else memory.reader
    records = task.records[: config.limit] if config.limit is not None else task.records
    if not records:
        raise MemGenError(f"task {task.name} has no records to evaluate")
    gen = GenerateConfig(
        memory=config.memory,
        max_new_tokens=config.max_new_tokens,
        stop=task.stop,
        max_insertions=config.max_insertions,
        insert_at_prompt_end=config.insert_at_prompt_end,
        seed=config.seed,
        return_latents=observe is not None,
    )

    def score(batch):
        began = time.perf_counter()
        shown = [memory.rewrite(r) for r in batch] if memory is not None else batch
        output = model.generate(
            [prompt_token_ids(r, model.tokenizer, config.use_chat_template) for r in shown],
            gen,
            experience=experience,
            insertion_filter=insertion_filter,
        )
        seconds = time.perf_counter() - began
        texts = [cut_at_stop(c.text, task.stop) for c in output.completions]
        columns = {k: [r.columns.get(k) for r in batch] for k in batch[0].columns}
        prompts = [r.prompt for r in batch]
        rewards, outcomes = task.score(prompts, texts, **columns)
        extras = {name: fn(prompts, texts, **columns) for name, fn in task.extra_metrics.items()}
        rows = []
        for i, (record, completion) in enumerate(zip(batch, output.completions)):
            # Decisions: every delimiter reached, and the prompt end where the trigger decides it.
            decided = [ins for ins in completion.insertions if ins.position > 0 or ins.probability is not None]
            row = {
                "source": record.source,
                "prompt": record.prompt,
                "completion": texts[i],
                "reward": float(rewards[i]),
                "insertions": completion.num_insertions,
                "decisions": len(decided),
                "decided_insertions": sum(ins.inserted for ins in decided),
                "insertion_positions": completion.insertion_positions,
                "new_tokens": len(completion.token_ids),
                "seconds": seconds / len(batch),
            }
            row.update({name: float(values[i]) for name, values in extras.items()})
            if outcomes is not None:
                o = outcomes[i]
                row.update({"status": o.status, "limit": o.limit, "exec_seconds": o.seconds, "detail": o.detail})
            if experience is not None:  # the records each woven insertion read, in insertion order
                row["retrieved"] = [ins.retrieved for ins in completion.insertions if ins.inserted]
            if task.failure_type is not None:
                row["failure"] = task.failure_type(record.prompt, texts[i], task.gold(record))
            if insertion_filter is not None:
                row["suppressed"] = sum(ins.suppressed for ins in completion.insertions)
            rows.append(row)
        if observe is not None:
            observe(batch, output.completions, rows)
        return rows, seconds

    rows, total_seconds = run_in_batches(
        model, records, config, f"eval {task.name} [{config.memory}]", score, ("acc", "reward")
    )
    n = len(rows)
    summary = {
        "task": task.name,
        "memory": config.memory,
        "n": n,
        "accuracy": sum(r["reward"] for r in rows) / n,
        "mean_insertions": sum(r["insertions"] for r in rows) / n,
        "seconds_per_answer": total_seconds / n,
        "mean_new_tokens": sum(r["new_tokens"] for r in rows) / n,
    }
    decisions = sum(r["decisions"] for r in rows)
    # Share of delimiter decision points where memory was woven (None when memory is off).
    summary["invocation_rate"] = sum(r["decided_insertions"] for r in rows) / decisions if decisions else None
    for name in task.extra_metrics:
        summary[name] = sum(r[name] for r in rows) / n
    if task.failure_type is not None:
        summary["failures"] = dict(sorted(Counter(r["failure"] for r in rows).items()))
    if task.outcomes is not None:
        summary["pass@1"] = summary["accuracy"]
        for status in (s for s in STATUSES if s != "passed"):
            summary[status] = sum(r["status"] == status for r in rows)
        summary["skipped"] = len(task.unavailable)  # left out at load: this machine cannot score them
    return summary


# ------------------------------------------------------------------ RL rollouts
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


def answer_rollout(run, records, micro: int, reward_fn: RewardFn, memory: str, **generate_kwargs) -> RolloutBatch:
    """``num_generations`` sampled answers per record, rewarded by ``reward_fn``."""
    config, model = run.config, run.unwrapped
    g = config.num_generations
    prompts = [run.encode_prompt(r) for r in records]
    stops = config.stop or run.task.stop
    gen_config = GenerateConfig(
        memory=memory,
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_new_tokens=config.max_new_tokens,
        max_insertions=config.max_insertions,
        num_samples=g,
        seed=run.rollout_seed(micro),
        return_logprobs=True,
        stop=stops,
        **generate_kwargs,
    )
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
        decisions=[
            [
                (i.position, i.inserted, PROMPT if i.position == 0 else INFERENCE)
                for i in c.insertions
                if i.probability is not None
            ]
            for c in completions
        ],
        old_logprobs=old.to(model.device),
        rewards=rewards.to(model.device),
        truncated=torch.tensor([c.finish_reason == "length" for c in completions], device=model.device),
        texts=texts,
        statuses=statuses,
    )


# ------------------------------------------------------------------ SFT
def contexts_at(
    reader, prompt_text: str, tokenizer, completion: list[int], insertions: list[int]
) -> list[list[int]] | None:
    """What the weaver reads at each of ``insertions`` of a known completion (SFT), as a rollout would."""
    if reader is None:
        return None
    queries = [reader.query_text(prompt_text, tokenizer.decode(completion[:pos])) for pos in insertions]
    return [got.token_ids for got in reader.read(queries)] if queries else []


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
    contexts = contexts_at(
        run.experience, tokenizer.decode(prompt, skip_special_tokens=True), tokenizer, completion, points
    )
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
