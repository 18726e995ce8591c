"""``memgen eval``: the evaluation config, and one entry point that scores any task.

The task runs itself through the engine (:meth:`memgen.tasks.protocol.TaskProtocol.evaluate`):
answer tasks decode greedily (seeded) with the chosen memory policy and score each answer
(:mod:`memgen.tasks.answering`); agent tasks play episodes (:mod:`memgen.agents.evaluate`).
Both write one JSON line per example and return a summary.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MemoryPolicy
from .dataclass_cli import check_ranges, help_field
from .errors import ConfigError
from .experience.sources import memory_source
from .experience.weaving import RetrievalFields
from .tables import format_table
from .tasks.protocol import run_in_batches
from .tasks.sandbox import CodeExecutionFields

__all__ = ["EvalConfig", "evaluate", "evaluate_task", "format_table", "run_in_batches", "MEMORY_SOURCES"]


MEMORY_SOURCES = ("weaver", "weaver+retrieval", "expel", "awm")


@dataclass
class EvalConfig(CodeExecutionFields, RetrievalFields):
    task: str = help_field(
        "gsm8k",
        "gsm8k | math | math500 | gpqa | qa | jsonl | kodcode | bigcodebench, or an agent task: alfworld | ledger",
    )
    data: str = help_field(
        "", "data file for the task (kodcode: a file or directory; alfworld: the directory of the game archives)"
    )
    split: str = help_field(
        "", "bigcodebench: complete (default) | instruct; agent tasks: train | valid_seen (default) | valid_unseen"
    )
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
    use_chat_template: bool = help_field(
        False, "render prompts with the tokenizer's chat template (plain prompts become one user turn)"
    )
    experience: str | None = help_field(
        None,
        "experience store: read by the weaver (--memory-source weaver+retrieval) or put in the prompt (expel, awm)",
    )
    memory_source: str = help_field(
        "weaver",
        "weaver (latents only) | weaver+retrieval (the weaver reads "
        "--experience) | expel (insights + similar successes in the prompt) "
        "| awm (workflows in the prompt)",
    )
    experience_task: str = help_field("", "task name of the insights / workflows in --experience (default: --task)")
    experience_template: str = help_field(
        "",
        "file with the expel / awm test-prompt template (default: the "
        "package's prompts/expel_task.txt or awm_task.txt)",
    )
    experience_top_k: int = help_field(2, "expel: similar successful trajectories in the prompt", ge=0)
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


def evaluate(model, task, config: EvalConfig, experience=None, insertion_filter=None, observe=None) -> dict:
    """Score ``model`` on ``task`` (any task: answers or episodes) and return the summary.

    ``experience`` (an ExperienceReader) overrides ``config.experience``. ``insertion_filter`` goes to
    :meth:`MemGen.generate` (rows then count their withheld insertions as ``suppressed``).
    ``observe(records, outputs, rows)``, called after each batch, sees the completions (or
    episodes) with their latents kept (how :mod:`memgen.analysis` collects them).
    """
    memory = memory_source(config, model, task.name, experience)
    return task.evaluate(model, config, memory, insertion_filter=insertion_filter, observe=observe)


def evaluate_task(model, task, config: EvalConfig, insertion_filter=None, observe=None) -> dict:
    """:func:`evaluate` (kept for callers that named it for agent tasks)."""
    return evaluate(model, task, config, insertion_filter=insertion_filter, observe=observe)
