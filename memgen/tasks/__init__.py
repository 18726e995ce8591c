"""Tasks: benchmark files to records, rewards in TRL's signature, and the sandbox code tasks run in.

| module | what |
| --- | --- |
| :mod:`~memgen.tasks.protocol` | the task protocol every task implements (evaluate, rollout, SFT step, reward), :class:`RolloutBatch` |
| :mod:`~memgen.tasks.registry` | :class:`Task`, :func:`load_task` and the names: gsm8k, math, math500, gpqa, qa, jsonl, kodcode, bigcodebench |
| :mod:`~memgen.tasks.answering` | how an answer task runs through the engine: evaluation, rollouts, SFT |
| :mod:`~memgen.tasks.answers` | answer-matched tasks (maths, multiple choice, QA, generic JSONL) |
| :mod:`~memgen.tasks.rewards` | reward functions ``f(prompts, completions, **columns) -> list[float]`` |
| :mod:`~memgen.tasks.code` | KodCode and BigCodeBench: prompts, programs, :class:`CodeReward` |
| :mod:`~memgen.tasks.code_extract` | which code of a completion runs |
| :mod:`~memgen.tasks.sandbox` | :class:`Sandbox`: kernel-enforced isolation for untrusted programs |
| :mod:`~memgen.tasks.domains` | the demo's synthetic domains A-D (also played by the ledger environment) |

Agent tasks (alfworld, ledger) live in :mod:`memgen.agents` and implement the same protocol.
"""

from .answers import gsm8k_records, math_records
from .registry import PLUGIN_TASKS, TASKS, Task, TaskOptions, load_named_task, load_task
from .sandbox import CodeExecutionFields, Program, Sandbox, SandboxConfig, SandboxError, SandboxResult

__all__ = [
    "Task",
    "TaskOptions",
    "TASKS",
    "PLUGIN_TASKS",
    "load_task",
    "load_named_task",
    "gsm8k_records",
    "math_records",
    "Sandbox",
    "SandboxConfig",
    "CodeExecutionFields",
    "SandboxError",
    "SandboxResult",
    "Program",
]
