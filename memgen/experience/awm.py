"""AWM, Agent Workflow Memory (Wang et al., ICML 2025), as a baseline: induce workflows, prompt with them.

- **Offline** (:func:`induce_workflows`): an LLM reads successful trajectories of a task
  (``awm_induce.txt``) and writes reusable workflows, named procedures with placeholders; each
  becomes a ``workflow`` record in the store, with the ids of the trajectories it came from.
- **Online** (:class:`OnlineAWM`): as test tasks are solved, each success is stored and
  workflows are induced from the newest successes, so memory grows with use (AWM's M ← M + W).
- **Test time** (:func:`awm_prompt`): the task's workflows go in front of the prompt
  (``awm_task.txt``).

Departures: AWM judges online successes with an LLM evaluator, since test rewards are hidden
from the agent; :class:`OnlineAWM` takes the success flag from its caller, so the caller
decides (the task reward, as a ceiling, or a judge). Workflows are parsed from ``## Workflow:``
blocks; an answer with none adds nothing, and is counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..dataclass_cli import check_ranges, help_field
from .expel import LLM, prompt_template
from .records import ExperienceRecord
from .store import ExperienceStore
from .weaving import render

_WORKFLOW = re.compile(r"^##\s*Workflow:\s*(.+)$", re.MULTILINE)


@dataclass
class AWMConfig:
    """Workflow induction and the test-time prompt."""

    induction_batch: int = help_field(8, "successful trajectories the LLM reads per induction", ge=1)
    max_workflows: int = help_field(8, "newest workflows put in the test prompt", ge=1)
    induce_every: int = help_field(4, "online: induce after this many new successes", ge=1)
    llm_max_new_tokens: int = help_field(256, "longest LLM answer when inducing", ge=1)
    task_template: str = help_field(
        "", "test-prompt template with {workflows} and {prompt} (default: prompts/awm_task.txt)"
    )

    def __post_init__(self) -> None:
        check_ranges(self)


def parse_workflows(text: str) -> list[str]:
    """The ``## Workflow: name`` blocks of an LLM answer, each with its steps, stripped."""
    starts = [m.start() for m in _WORKFLOW.finditer(text)]
    blocks = [text[a:b].strip() for a, b in zip(starts, starts[1:] + [len(text)])]
    return [b for b in blocks if len(b.splitlines()) > 1]  # a name without steps is no workflow


def induce_workflows(
    store: ExperienceStore,
    task: str,
    llm: LLM,
    config: AWMConfig,
    successes: list[ExperienceRecord] | None = None,
    run: str = "awm",
) -> dict:
    """Induce workflows from ``successes`` (default: the task's stored successes, newest first, in batches)."""
    successes = successes if successes is not None else store.records(kind="trajectory", success=True, task=task)[::-1]
    template = prompt_template("awm_induce")
    added = empty = 0
    for start in range(0, len(successes), config.induction_batch):
        batch = successes[start : start + config.induction_batch]
        answer = llm([template.format(task=task, successes="\n".join(render(r) for r in batch))])[0]
        found = parse_workflows(answer)
        empty += not found
        added += store.add_many(
            ExperienceRecord(
                kind="workflow", task=task, text=w, provenance={"source": run, "from": [r.id for r in batch]}
            )
            for w in found
        )
    return {
        "inductions": -(-len(successes) // config.induction_batch),
        "workflows_added": added,
        "answers_without_workflow": empty,
        "workflows": len(store.records(kind="workflow", task=task)),
    }


def awm_prompt(store: ExperienceStore, task: str, prompt: str, config: AWMConfig) -> str:
    """The test-time prompt: the task's newest workflows, then the task; with no workflow, the task alone
    (an empty memory leaves the agent as it was, rather than adding an empty header)."""
    workflows = store.records(kind="workflow", task=task)[-config.max_workflows :]
    if not workflows:
        return prompt
    body = "\n\n".join(r.text for r in workflows)
    return (config.task_template or prompt_template("awm_task")).format(workflows=body, prompt=prompt)


class OnlineAWM:
    """Online induction: store each success as it happens, induce from every ``induce_every`` new ones."""

    def __init__(self, store: ExperienceStore, task: str, llm: LLM, config: AWMConfig | None = None):
        self.store, self.task, self.llm = store, task, llm
        self.config = config or AWMConfig()
        self.pending: list[ExperienceRecord] = []
        self.stats = {"successes": 0, "inductions": 0, "workflows_added": 0}

    def prompt(self, prompt: str) -> str:
        return awm_prompt(self.store, self.task, prompt, self.config)

    def observe(self, prompt: str, trajectory: str, success: bool, reward: float = 0.0) -> None:
        record = ExperienceRecord(
            task=self.task,
            input=prompt,
            trajectory=trajectory,
            success=success,
            reward=reward,
            provenance={"source": "awm-online"},
        )
        self.store.add(record)
        if not success:
            return
        self.stats["successes"] += 1
        self.pending.append(record)
        if len(self.pending) >= self.config.induce_every:
            self.flush()

    def flush(self) -> None:
        """Induce from the successes not yet induced from."""
        if not self.pending:
            return
        got = induce_workflows(self.store, self.task, self.llm, self.config, self.pending, run="awm-online")
        self.stats["inductions"] += got["inductions"]
        self.stats["workflows_added"] += got["workflows_added"]
        self.pending = []
