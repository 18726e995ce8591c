"""``memgen eval``: batched generation on a task, scored per example, summarised as a table.

Greedy decoding (seeded) with the chosen memory policy. Each answer's text is cut at the
task's first stop string before scoring. Writes one JSON line per example (prompt,
completion, reward, insertions, seconds) and returns the summary: accuracy (mean reward),
extra metrics (e.g. F1 for QA), mean insertions per answer and decode time per answer.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from .config import GenerateConfig, MemoryPolicy
from .data import prompt_token_ids
from .errors import ConfigError, MemGenError
from .dataclass_cli import check_ranges, help_field
from .tasks import Task
from .tasks.sandbox import STATUSES, CodeExecutionFields
from .tasks.rewards import cut_at_stop


MEMORY_SOURCES = ("weaver", "weaver+retrieval", "expel", "awm")


@dataclass
class EvalConfig(CodeExecutionFields):
    task: str = help_field("gsm8k", "gsm8k | math | math500 | gpqa | qa | jsonl | kodcode | bigcodebench, or an "
                                    "agent task: alfworld | ledger")
    data: str = help_field("", "data file for the task (kodcode: a file or directory; alfworld: the directory of "
                               "the game archives)")
    split: str = help_field("", "bigcodebench: complete (default) | instruct; agent tasks: train | valid_seen "
                                "(default) | valid_unseen")
    max_turns: int = help_field(0, "agent tasks: turns per episode (0: the task's default, 50 for alfworld)", ge=0)
    step_timeout: float = help_field(30.0, "agent tasks: seconds an environment step may take", gt=0)
    limit: int | None = help_field(None, "evaluate the first N examples", ge=1)
    memory: str = help_field("trigger", "insertion policy: off | always | trigger | random:P")
    max_new_tokens: int = help_field(256, "longest answer (agent tasks: per turn)", ge=1)
    batch_size: int = help_field(8, "prompts (agent tasks: episodes) decoded together", ge=1)
    max_insertions: int = help_field(8, "cap on in-reasoning insertions per answer", ge=0)
    insert_at_prompt_end: bool = help_field(True, "weave at the prompt end (unless memory is off)")
    seed: int = help_field(0, "seed (GPQA option order, random:P decisions)", ge=0)
    skip_malformed: bool = help_field(False, "skip malformed data lines (reported as file:line) instead of stopping")
    use_chat_template: bool = help_field(False, "render prompts with the tokenizer's chat template (plain prompts "
                                                "become one user turn)")
    experience: str | None = help_field(None, "experience store: read by the weaver (--memory-source "
                                              "weaver+retrieval) or put in the prompt (expel, awm)")
    memory_source: str = help_field("weaver", "weaver (latents only) | weaver+retrieval (the weaver reads "
                                              "--experience) | expel (insights + similar successes in the prompt) "
                                              "| awm (workflows in the prompt)")
    experience_task: str = help_field("", "task name of the insights / workflows in --experience (default: --task)")
    experience_template: str = help_field("", "file with the expel / awm test-prompt template (default: the "
                                              "package's prompts/expel_task.txt or awm_task.txt)")
    experience_top_k: int = help_field(2, "expel: similar successful trajectories in the prompt", ge=0)
    experience_embedder: str = help_field("reasoner", "how --experience is searched: reasoner | bm25 | st:DIR")
    retrieval_top_p: int = help_field(3, "records retrieved per invocation with --experience", ge=1)
    retrieval_max_tokens: int = help_field(128, "most retrieved tokens the weaver reads per invocation", ge=1)
    retrieval_query: str = help_field("context", "retrieval query: prompt | context (prompt plus the answer so far)")
    output: str | None = help_field(None, "per-example JSONL path (default: none)")
    progress: bool = help_field(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_ranges(self)
        MemoryPolicy.parse(self.memory)
        if self.memory_source not in MEMORY_SOURCES:
            raise ConfigError(f"memory_source must be one of {', '.join(MEMORY_SOURCES)}, got {self.memory_source!r}")
        if self.memory_source != "weaver" and not self.experience:
            raise ConfigError(f"--memory-source {self.memory_source} needs --experience STORE")

    def policy_needs_adapter(self) -> bool:
        return self.memory != "off"


def evaluate(model, task: Task, config: EvalConfig, experience=None, insertion_filter=None, observe=None) -> dict:
    """Score ``model`` on ``task``; ``experience`` (an ExperienceReader) overrides ``config.experience``.

    ``insertion_filter`` goes to :meth:`MemGen.generate` (rows then count their withheld insertions as
    ``suppressed``). ``observe(records, completions, rows)``, called after each batch, sees the
    completions with their latents kept (how :mod:`memgen.analysis` collects them).
    """
    rewrite = None
    if experience is None and config.memory_source != "weaver":
        from .experience.weaving import open_reader

        experience = open_reader(config, model)
    if config.memory_source in ("expel", "awm"):
        rewrite = _prompt_memory(experience.store, config, config.experience_task or task.name)
        experience = None  # the store feeds the prompt, not the weaver

    records = task.records[: config.limit] if config.limit is not None else task.records
    if not records:
        raise MemGenError(f"task {task.name} has no records to evaluate")
    gen = GenerateConfig(memory=config.memory, max_new_tokens=config.max_new_tokens, stop=task.stop,
                         max_insertions=config.max_insertions, insert_at_prompt_end=config.insert_at_prompt_end,
                         seed=config.seed, return_latents=observe is not None)
    def score(batch):
        began = time.perf_counter()
        shown = [_rewritten(r, rewrite) for r in batch] if rewrite is not None else batch
        output = model.generate([prompt_token_ids(r, model.tokenizer, config.use_chat_template) for r in shown],
                                gen, experience=experience, insertion_filter=insertion_filter)
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
            row = {"source": record.source, "prompt": record.prompt, "completion": texts[i],
                   "reward": float(rewards[i]), "insertions": completion.num_insertions,
                   "decisions": len(decided),
                   "decided_insertions": sum(ins.inserted for ins in decided),
                   "insertion_positions": completion.insertion_positions,
                   "new_tokens": len(completion.token_ids), "seconds": seconds / len(batch)}
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

    rows, total_seconds = run_in_batches(model, records, config, f"eval {task.name} [{config.memory}]", score,
                                         ("acc", "reward"))
    n = len(rows)
    summary = {
        "task": task.name, "memory": config.memory, "n": n,
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


def evaluate_task(model, task, config: EvalConfig, insertion_filter=None, observe=None) -> dict:
    """:func:`evaluate` for answer tasks, :func:`memgen.agents.evaluate.evaluate_agent` for agent tasks (episodes)."""
    from .agents.tasks import EnvTask

    if isinstance(task, EnvTask):
        from .agents.evaluate import evaluate_agent

        return evaluate_agent(model, task, config, insertion_filter=insertion_filter, observe=observe)
    return evaluate(model, task, config, insertion_filter=insertion_filter, observe=observe)


def run_in_batches(model, records, config, desc: str, score_batch, shown: tuple[str, str]):
    """Score ``records`` in batches of ``config.batch_size`` with ``model`` in eval mode.

    ``score_batch(batch) -> (rows, seconds)``; every row goes to ``config.output`` (JSONL) as it
    comes, and the progress bar shows ``shown = (label, key)``: the running mean of ``row[key]``.
    Returns all rows and the seconds the batches reported.
    """
    from tqdm.auto import tqdm

    rows, total_seconds = [], 0.0
    handle = None
    if config.output:
        Path(config.output).parent.mkdir(parents=True, exist_ok=True)
        handle = open(config.output, "w")
    bar = tqdm(total=len(records), disable=not config.progress, desc=desc, dynamic_ncols=True)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(records), config.batch_size):
            batch = records[start: start + config.batch_size]
            batch_rows, seconds = score_batch(batch)
            total_seconds += seconds
            for row in batch_rows:
                rows.append(row)
                if handle:
                    handle.write(json.dumps(row) + "\n")
            bar.update(len(batch))
            label, key = shown
            bar.set_postfix({label: f"{sum(r[key] for r in rows) / len(rows):.3f}"})
    finally:
        bar.close()
        if handle:
            handle.close()
        model.train(was_training)
    return rows, total_seconds


def _rewritten(record, rewrite):
    """The record with its prompt (or its last user message) passed through ``rewrite``."""
    if record.messages:
        messages = [dict(m) for m in record.messages]
        last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
        messages[last]["content"] = rewrite(messages[last]["content"])
        return replace(record, messages=messages)
    return replace(record, prompt=rewrite(record.prompt))


def _prompt_memory(store, config: EvalConfig, task: str):
    """prompt -> prompt with ExpeL's insights and examples, or AWM's workflows, from ``store``."""
    template = Path(config.experience_template).read_text() if config.experience_template else ""
    if config.memory_source == "expel":
        from .experience.expel import ExpeLConfig, expel_prompt

        expel = ExpeLConfig(top_k=config.experience_top_k, task_template=template)
        return lambda prompt: expel_prompt(store, task, prompt, expel)
    from .experience.awm import AWMConfig, awm_prompt

    awm = AWMConfig(task_template=template)
    return lambda prompt: awm_prompt(store, task, prompt, awm)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (also valid Markdown)."""
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(b) for b in body])
